"""Instruction data: prompt/response rows or chat conversations, with the loss on the response tokens only.

`data.instruct.format`:
    prompt_response  each row holds a prompt and a response string (`prompt_field`, `response_field`); the
                     token ids are prompt + response + eos (each tokenized on its own, no special tokens but a
                     bos when the tokenizer adds one), and the targets are the response and the eos.
    chat             each row holds `messages`, a list of {role, content}, rendered with the tokenizer's chat
                     template (`apply_chat_template`); the targets are the assistant turns, each with what the
                     template writes after its content (the end-of-turn marker the model must learn to emit).

Where the assistant turns lie is found by rendering prefixes: turn i spans the characters between the
rendering of the messages before it (with the generation prompt) and the rendering that includes it, and a
token of the whole conversation is a target when it starts in such a span. Unlike the template's
`return_assistant_tokens_mask` (which needs `{% generation %}` markers that few templates have), this works
with any template that renders a conversation's beginning as a prefix of the whole; one that does not is
reported with the row.

Every row is one document: never split, truncated to `data.seq_len` tokens (a document left without a target
is dropped). Its first token is never a target: within the document nothing predicts it. Unpacked
(`data.packing: false`), each row of a batch holds one document, padded. Packed, documents are placed whole
into rows of `seq_len` tokens in order, and each document's `position_ids` restart at 0: with no attention
mask, transformers (sdpa and eager attention, LLaMA, GPT-2 and the other families built on its masking
utilities; the flash-attention varlen path likewise) then attends within each document only, so a packed row
gives every token the loss it has when its document runs alone (tests/train/test_finetune.py checks this).

The held-out split is the existing hash split, on each row's JSON text; the training order and its
checkpointed position are those of `lowmem.data.batches.MapStyleBatches`, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, ClassVar, Iterator

import numpy as np
import torch

from lowmem.config.schema import Registry
from lowmem.data.batches import MapStyleBatches, is_held_out
from lowmem.data.sources import data_source
from lowmem.errors import DataError

if TYPE_CHECKING:
    from lowmem.data.config import DataConfig, InstructConfig

log = logging.getLogger(__name__)
IGNORE = -100

# A document: its token ids and, for each, whether it carries a loss.
Document = tuple[list[int], list[bool]]


# ---------------------------------------------------------------------------------------------------------
# Rows, with where each one is (for the errors)


def iter_rows(cfg: DataConfig) -> Iterator[tuple[dict, str]]:
    """Every row of the source, in order, with a description of where it is ("line 3 of 'a.jsonl'")."""
    return data_source(cfg).rows()


def iter_split(cfg: DataConfig, split: str) -> Iterator[tuple[dict, str]]:
    """The rows of the train or eval split: a row is held out by a stable hash of its JSON text."""
    count = 0
    for row, where in iter_rows(cfg):
        held = is_held_out(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str), cfg.eval_fraction)
        if held != (split == "eval"):
            continue
        if split == "train" and cfg.max_docs is not None and count >= cfg.max_docs:
            return
        count += 1
        yield row, where


# ---------------------------------------------------------------------------------------------------------
# Rows -> documents (token ids and targets), one encoder per format


def _field(row: dict, key: str, config_key: str, where: str, hint: str = "") -> str:
    value = row.get(key)
    if not isinstance(value, str):
        found = "no such field" if key not in row else f"found {'null' if value is None else type(value).__name__}"
        raise DataError(f"data.instruct.{config_key}: {where} has no string '{key}' ({found}; fields: "
                        f"{sorted(row)}){hint}")
    return value


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    """A bos id when the tokenizer puts one before its texts (LLaMA's do, GPT-2's do not)."""
    bos = tokenizer.bos_token_id
    adds = getattr(tokenizer, "add_bos_token", False)
    return [bos] if adds and bos is not None and bos != tokenizer.eos_token_id else []


def encode_prompt_response(row: dict, where: str, tokenizer, cfg: InstructConfig) -> Document:
    hint = "; set data.instruct.format=chat for rows holding messages" if cfg.messages_field in row else ""
    prompt = _bos(tokenizer) + _ids(tokenizer, _field(row, cfg.prompt_field, "prompt_field", where, hint))
    response = _ids(tokenizer, _field(row, cfg.response_field, "response_field", where, hint))
    response.append(tokenizer.eos_token_id)  # learnt, so that generation stops
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.instruct.format: 'chat' renders messages with the tokenizer's chat template, but "
                        f"the tokenizer '{tokenizer.name_or_path}' has no chat template (its chat_template is unset); "
                        f"use a tokenizer that has one (tokenizer.name=...), or prompt/response rows "
                        f"(data.instruct.format=prompt_response)")


def _render(tokenizer, messages: list, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(row: dict, where: str, tokenizer, cfg: InstructConfig) -> Document:
    messages = row.get(cfg.messages_field)
    if not isinstance(messages, list):
        hint = ("; set data.instruct.format=prompt_response for prompt/response rows"
                if cfg.prompt_field in row else "")
        raise DataError(f"data.instruct.messages_field: {where} has no '{cfg.messages_field}' list of "
                        f"{{role, content}} messages (fields: {sorted(row)}){hint}")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"data.instruct.messages_field: message {number} of {where} is not a mapping with "
                            f"a 'role' (found {str(message)[:60]!r})")
    try:
        whole = _render(tokenizer, messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], generation_prompt=True)
            through = _render(tokenizer, messages[: i + 1])
            if not (whole.startswith(through) and through.startswith(before)):
                raise DataError(f"data.instruct: the chat template of '{tokenizer.name_or_path}' does not render "
                                f"the beginning of the conversation in {where} as a prefix of the whole, so its "
                                f"assistant turns cannot be located")
            spans.append((len(before), len(through)))
    except DataError:
        raise
    except Exception as err:  # the template's own checks (roles alternating, ...) raise jinja errors
        raise DataError(f"data.instruct: the chat template cannot render {where}: {type(err).__name__}: "
                        f"{err}") from err
    encoding = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    targets = [any(start <= begin < end for start, end in spans) for begin, _ in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), targets


# ---------------------------------------------------------------------------------------------------------
# The formats


class InstructFormat:
    """One `data.instruct.format`: what it needs of the tokenizer, and how a row becomes a document."""

    name: ClassVar[str]

    def check(self, tokenizer) -> None:
        """DataError when `tokenizer` cannot encode this format's rows."""

    def encode(self, row: dict, where: str, tokenizer, cfg: InstructConfig) -> Document:
        raise NotImplementedError


# data.instruct.format name -> class. Adding a format is one new InstructFormat subclass with a `name`,
# registered with `@INSTRUCT_FORMATS.register`; `INSTRUCT_FORMATS.lookup(name)` refuses an unknown name.
INSTRUCT_FORMATS = Registry("data.instruct.format")


@INSTRUCT_FORMATS.register
class PromptResponseFormat(InstructFormat):
    name = "prompt_response"

    def encode(self, row: dict, where: str, tokenizer, cfg: InstructConfig) -> Document:
        return encode_prompt_response(row, where, tokenizer, cfg)


@INSTRUCT_FORMATS.register
class ChatFormat(InstructFormat):
    name = "chat"

    def check(self, tokenizer) -> None:
        check_chat_template(tokenizer)

    def encode(self, row: dict, where: str, tokenizer, cfg: InstructConfig) -> Document:
        return encode_chat(row, where, tokenizer, cfg)


def iter_documents(cfg: DataConfig, tokenizer, split: str, counts: dict[str, int] | None = None
                   ) -> Iterator[Document]:
    """The split's documents, truncated to `seq_len`, first token never a target; rows left without a
    target are dropped (with a warning counting them). `counts` receives rows read and dropped."""
    instruct_format = INSTRUCT_FORMATS.lookup(cfg.instruct.format)()
    instruct_format.check(tokenizer)
    dropped = read = 0
    for row, where in iter_split(cfg, split):
        read += 1
        ids, targets = instruct_format.encode(row, where, tokenizer, cfg.instruct)
        ids, targets = ids[: cfg.seq_len], targets[: cfg.seq_len]
        if targets:
            targets[0] = False
        if not any(targets):
            dropped += 1
            continue
        yield ids, targets
    if dropped:
        log.warning("data.instruct: %d %s rows have no response token within data.seq_len %d and were dropped",
                    dropped, split, cfg.seq_len)
    if counts is not None:
        counts.update(read=read, dropped=dropped)


def describe_rows(documents: list[Document], counts: dict[str, int], tokenizer, rows: int, cfg: DataConfig) -> list[str]:
    """What a fine-tuning run reads, as LLaMA-Factory shows it: rows read and dropped, the share of response
    tokens (what the loss covers), and the first document decoded with its loss mask marked."""
    tokens = sum(len(ids) for ids, _ in documents)
    response = sum(sum(targets) for _, targets in documents)
    lines = [f"data: {counts['read']} instruction rows read, {counts['dropped']} dropped (no response token within "
             f"data.seq_len {cfg.seq_len}), {rows} training rows of {cfg.seq_len} tokens"
             f"{' (packed)' if cfg.packing else ''}; {response / max(tokens, 1):.1%} of the tokens are response "
             f"tokens, which the loss covers"]
    if documents:
        ids, targets = documents[0]
        pieces, start = [], 0
        for end in range(1, len(ids) + 1):  # runs of tokens with the same mask, decoded together
            if end == len(ids) or targets[end] != targets[start]:
                text = tokenizer.decode(ids[start:end])
                pieces.append(f"[[{text}]]" if targets[start] else text)
                start = end
        lines.append("example (the loss covers the text in [[ ]]): " + "".join(pieces).replace("\n", "\\n"))
    return lines


# ---------------------------------------------------------------------------------------------------------
# Documents -> rows of seq_len tokens


def build_rows(documents: list[Document], seq_len: int, pad_id: int,
               packing: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids, labels, position ids), each int32 [rows, seq_len]. Packed: documents whole and in order,
    a new row when the next one does not fit; unpacked: one document per row. Padding has label -100 and
    positions of its own, so it is a segment that no document attends to."""
    rows: list[list[Document]] = []
    used = seq_len  # start a new row for the first document
    for doc in documents:
        if not packing or used + len(doc[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += len(doc[0])
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int32)
    labels = np.full((len(rows), seq_len), IGNORE, dtype=np.int32)
    positions = np.zeros((len(rows), seq_len), dtype=np.int32)
    for r, row in enumerate(rows):
        start = 0
        for doc_ids, targets in row:
            end = start + len(doc_ids)
            ids[r, start:end] = doc_ids
            labels[r, start:end] = np.where(targets, doc_ids, IGNORE)
            positions[r, start:end] = np.arange(len(doc_ids))
            start = end
        positions[r, start:] = np.arange(seq_len - start)
    return ids, labels, positions


def split_rows(cfg: DataConfig, tokenizer, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return build_rows(list(iter_documents(cfg, tokenizer, split)), cfg.seq_len, tokenizer.pad_token_id,
                      cfg.packing)


def collate(ids: np.ndarray, labels: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
    as_long = lambda array: torch.from_numpy(np.asarray(array, dtype=np.int64))  # noqa: E731
    return {"input_ids": as_long(ids), "labels": as_long(labels), "position_ids": as_long(positions)}


class InstructBatches(MapStyleBatches):
    """Training batches of instruction rows: `input_ids`, `labels` (-100 off the responses) and `position_ids`
    (restarting per document); order and resumable position as every map-style source."""

    @classmethod
    def build(cls, cfg: DataConfig, tokenizer, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1) -> InstructBatches:
        counts: dict[str, int] = {}
        documents = list(iter_documents(cfg, tokenizer, "train", counts))
        rows = build_rows(documents, cfg.seq_len, tokenizer.pad_token_id, cfg.packing)
        if len(rows[0]) == 0:
            raise DataError(f"data.instruct: no training rows with a response in data.files {cfg.files or cfg.name}")
        for line in describe_rows(documents, counts, tokenizer, len(rows[0]), cfg):
            log.info(line)
        return cls([rows], cfg.seq_len, batch_size, seed, rank, world_size)

    def collate(self, rows: list[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
        return collate(*(np.stack(column) for column in zip(*rows)))


def instruct_eval_batches(cfg: DataConfig, tokenizer, batch_size: int,
                          max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """The first held-out rows holding at least `max_tokens` target tokens (all when fewer), in batches."""
    ids, labels, positions = split_rows(cfg, tokenizer, "eval")
    if len(ids) == 0:
        raise DataError("the eval split has no instruction rows with a response: raise data.eval_fraction or "
                        "add rows")
    targets = np.cumsum((labels[:, 1:] != IGNORE).sum(axis=1))
    count = min(len(ids), int(np.searchsorted(targets, max_tokens)) + 1)
    return [collate(ids[i:i + batch_size], labels[i:i + batch_size], positions[i:i + batch_size])
            for i in range(0, count, batch_size)]
