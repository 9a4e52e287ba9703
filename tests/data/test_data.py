"""The data pipeline: documents, packing/padding, order, resume, held-out split, sources, ranks, prepared shards."""
import dataclasses
import importlib.util
import io
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from lowmem.data.batches import is_held_out, iter_documents, tokenize
from lowmem.data.config import BPEConfig, DataConfig, TokenizerConfig
from lowmem.data.loaders import build_train_batches, eval_batches
from lowmem.data.sources import embedded_paths
from lowmem.data.tokenizer import build_tokenizer, train_bpe
from lowmem.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
SEQ_LEN = 16


def make_documents(count: int = 40, seed: int = 0) -> list[str]:
    """Documents of 3 to 60 words: some shorter than a sequence, some several sequences long."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for i in range(count)]


DOCUMENTS = make_documents()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(BPEConfig(vocab_size=300, min_frequency=1), iter(make_documents(seed=1)))


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i, text in enumerate(DOCUMENTS):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def files_config(folder: Path, pattern: str = "*.txt", **changes) -> DataConfig:
    return DataConfig(**{"source": "files", "files": [str(folder / pattern)], "seq_len": SEQ_LEN, "eval_fraction": 0.2,
                         **changes})


def save_and_load(state: dict) -> dict:
    """A checkpoint round trip: only tensors and Python primitives survive weights_only loading."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def take(batches, count: int) -> list[dict]:
    return [next(batches) for _ in range(count)]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def expected_stream(cfg: DataConfig, tokenizer) -> list[int]:
    stream = []
    for ids in tokenize(tokenizer, list(iter_documents(cfg, "train"))):
        stream += ids + [tokenizer.eos_token_id]
    return stream


# ---------------------------------------------------------------------------------------------------------
# Shapes, packing, padding


def test_packed_batches_shape_dtype_and_no_padding(text_dir, tokenizer):
    batches = build_train_batches(files_config(text_dir), tokenizer, batch_size=4, seed=0)
    batch = next(batches)
    assert batch["input_ids"].shape == (4, SEQ_LEN) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batches.tokens_per_batch == 4 * SEQ_LEN


def test_packing_loses_no_tokens(text_dir, tokenizer):
    cfg = files_config(text_dir)
    batches = build_train_batches(cfg, tokenizer, batch_size=1, seed=5)
    count = batches.num_sequences
    rows = torch.cat([b["input_ids"] for b in take(batches, count)])
    in_source_order = torch.empty_like(rows)
    in_source_order[batches.epoch_order(0)] = rows
    stream = expected_stream(cfg, tokenizer)
    assert count == len(stream) // SEQ_LEN
    assert in_source_order.flatten().tolist() == stream[: count * SEQ_LEN]


def test_padded_mode_truncates_and_pads_each_document(text_dir, tokenizer):
    cfg = files_config(text_dir, packing=False)
    documents = tokenize(tokenizer, list(iter_documents(cfg, "train")))
    batches = build_train_batches(cfg, tokenizer, batch_size=1, seed=0)
    assert batches.num_sequences == len(documents)
    rows = take(batches, len(documents))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert any(len(ids) >= SEQ_LEN for ids in documents) and any(len(ids) < SEQ_LEN - 1 for ids in documents)
    for position, index in enumerate(batches.epoch_order(0).tolist()):
        kept = documents[index][: SEQ_LEN - 1] + [eos]
        expected = kept + [pad] * (SEQ_LEN - len(kept))
        input_ids, labels = rows[position]["input_ids"][0], rows[position]["labels"][0]
        assert input_ids.tolist() == expected
        assert labels.tolist() == kept + [-100] * (SEQ_LEN - len(kept))  # -100 exactly at the padding


def test_padding_mask_is_by_position_when_pad_is_eos(text_dir, tokenizer):
    cfg = files_config(text_dir, packing=False)
    tokenizer = train_bpe(BPEConfig(vocab_size=300, min_frequency=1), iter(make_documents(seed=1)))
    tokenizer.pad_token = tokenizer.eos_token  # gpt2-like
    batch = next(build_train_batches(cfg, tokenizer, batch_size=8, seed=0))
    targets = batch["labels"] != -100
    lengths = targets.sum(dim=1)
    ends = batch["input_ids"].gather(1, (lengths - 1)[:, None]).squeeze(1)
    assert (ends == tokenizer.eos_token_id).all()  # the document's eos keeps its loss


# ---------------------------------------------------------------------------------------------------------
# Order


def test_order_depends_on_seed_and_epoch(text_dir, tokenizer):
    cfg = files_config(text_dir)
    first = take(build_train_batches(cfg, tokenizer, 4, seed=0), 3)
    assert_same_batches(first, take(build_train_batches(cfg, tokenizer, 4, seed=0), 3))
    other = take(build_train_batches(cfg, tokenizer, 4, seed=1), 3)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))

    batches = build_train_batches(cfg, tokenizer, 1, seed=0)
    count = batches.num_sequences
    epoch0 = [tuple(b["input_ids"][0].tolist()) for b in take(batches, count)]
    epoch1 = [tuple(b["input_ids"][0].tolist()) for b in take(batches, count)]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # reshuffled, same sequences
    assert (batches.epoch, batches.position) == (1, count)  # at the end of epoch 1


# ---------------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("packing", [True, False])
def test_map_style_resume_is_exact(text_dir, tokenizer, packing):
    cfg = files_config(text_dir, packing=packing)
    uninterrupted = build_train_batches(cfg, tokenizer, 3, seed=7)
    steps = uninterrupted.num_sequences // 3 + 2  # crosses an epoch boundary
    take(uninterrupted, steps)
    state = save_and_load(uninterrupted.state_dict())
    resumed = build_train_batches(cfg, tokenizer, 3, seed=7)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 6), take(uninterrupted, 6))


def test_map_style_resume_rejects_other_data(text_dir, tokenizer):
    batches = build_train_batches(files_config(text_dir), tokenizer, 3, seed=7)
    other = build_train_batches(files_config(text_dir, max_docs=10), tokenizer, 3, seed=7)
    with pytest.raises(ValueError, match="num_sequences"):
        other.load_state_dict(batches.state_dict())


@pytest.mark.parametrize("packing", [True, False])
def test_streaming_resume_is_exact(text_dir, tokenizer, packing):
    cfg = files_config(text_dir, streaming=True, shuffle_buffer=8, packing=packing)
    uninterrupted = build_train_batches(cfg, tokenizer, 2, seed=3)
    assert uninterrupted.num_sequences is None
    for steps in (3, 100):  # inside the first epoch, then past its end
        take(uninterrupted, steps)
        state = save_and_load(uninterrupted.state_dict())
        resumed = build_train_batches(cfg, tokenizer, 2, seed=3)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 12), take(uninterrupted, 12))
    assert uninterrupted.epoch >= 1


def test_streaming_epoch_holds_every_training_document_once(text_dir, tokenizer):
    cfg = files_config(text_dir, streaming=True, shuffle_buffer=5, packing=False, seq_len=256)
    batches = build_train_batches(cfg, tokenizer, 1, seed=0)
    documents = list(iter_documents(files_config(text_dir), "train"))
    rows = [next(batches)["input_ids"][0] for _ in range(len(documents))]
    decoded = [tokenizer.decode(row[row != tokenizer.pad_token_id][:-1]) for row in rows]
    assert sorted(decoded) == sorted(documents) and decoded != documents  # shuffled
    assert batches.epoch == 0


# ---------------------------------------------------------------------------------------------------------
# Held-out split and eval batches


def test_held_out_documents_never_train(text_dir, tokenizer):
    cfg = files_config(text_dir)
    train = list(iter_documents(cfg, "train"))
    held_out = list(iter_documents(cfg, "eval"))
    assert held_out and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(DOCUMENTS)
    assert all(is_held_out(text, cfg.eval_fraction) for text in held_out)
    # The choice is by content: the same documents in another order give the same split.
    for i, text in enumerate(reversed(DOCUMENTS)):
        (text_dir / f"doc{i:02d}.txt").write_text(text)
    assert set(iter_documents(cfg, "eval")) == set(held_out)


@pytest.mark.parametrize("packing", [True, False])
def test_eval_batches_are_fixed_and_sized(text_dir, tokenizer, packing):
    cfg = files_config(text_dir, packing=packing, eval_fraction=0.5)
    first = eval_batches(cfg, tokenizer, batch_size=4, max_tokens=100)
    assert_same_batches(first, eval_batches(cfg, tokenizer, batch_size=4, max_tokens=100))
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in first)
    assert 100 <= targets < 100 + SEQ_LEN
    assert all(b["input_ids"].shape[1] == SEQ_LEN for b in first)
    held_out_ids = set()
    for ids in tokenize(tokenizer, list(iter_documents(cfg, "eval"))):
        held_out_ids.update(ids)
    assert set(first[0]["input_ids"][0].tolist()) - {tokenizer.eos_token_id, tokenizer.pad_token_id} <= held_out_ids


def test_eval_batches_take_the_whole_small_split_with_a_padded_tail(text_dir, tokenizer):
    cfg = files_config(text_dir)
    batches = eval_batches(cfg, tokenizer, batch_size=3, max_tokens=10**9)
    stream = []
    for ids in tokenize(tokenizer, list(iter_documents(cfg, "eval"))):
        stream += ids + [tokenizer.eos_token_id]
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    assert labels[labels != -100].tolist() == stream  # every eval token, the tail row padded
    assert len(batches[-1]["input_ids"]) <= 3


def test_empty_eval_split_is_an_error(text_dir, tokenizer):
    with pytest.raises(ValueError, match="eval split has no documents"):
        eval_batches(files_config(text_dir, pattern="doc00.txt"), tokenizer, 4, 100)


# ---------------------------------------------------------------------------------------------------------
# Sources


def test_embedded_source_yields_stdlib_documents():
    cfg = DataConfig(source="embedded", max_docs=5)
    documents = list(iter_documents(cfg, "train"))
    assert len(documents) == 5 and all(text.strip() for text in documents)
    assert documents == list(iter_documents(cfg, "train"))
    paths = embedded_paths()
    assert len(paths) > 500 and all(p.suffix == ".py" and "site-packages" not in p.parts for p in paths)
    assert documents[0] in {p.read_text(encoding="utf-8", errors="replace") for p in paths[:10]}


def test_a_registered_source_class_is_a_data_source(monkeypatch, text_dir, tokenizer):
    """A new source is one DataSource subclass in DATA_SOURCES: configs accept its name, and its documents
    train and evaluate as a built-in source's do."""
    from lowmem.data import sources
    from lowmem.train.config import load_config

    class ListedSource(sources.DataSource):
        name = "listed"

        def documents(self, split_name):
            yield from DOCUMENTS

    monkeypatch.setitem(sources.DATA_SOURCES, "listed", ListedSource)
    assert load_config(None, ["data.source=listed", "tokenizer.name=t5-base"]).data.source == "listed"
    with pytest.raises(ConfigError, match="data.streaming: only hub and files sources stream"):
        load_config(None, ["data.source=listed", "data.streaming=true", "tokenizer.name=t5-base"])
    listed = dataclasses.replace(files_config(text_dir), source="listed", files=[])
    assert list(iter_documents(listed, "train")) == list(iter_documents(files_config(text_dir), "train"))
    assert_same_batches(take(build_train_batches(listed, tokenizer, 2, seed=0), 3),
                        take(build_train_batches(files_config(text_dir), tokenizer, 2, seed=0), 3))
    assert_same_batches(eval_batches(listed, tokenizer, 2, 100),
                        eval_batches(files_config(text_dir), tokenizer, 2, 100))


def test_an_unknown_source_is_refused_naming_the_closest(tokenizer):
    with pytest.raises(ConfigError, match=r"data.source: 'file' is not one of .* \(did you mean 'files'\?\)"):
        next(build_train_batches(DataConfig(source="file"), tokenizer, 2, seed=0))


def test_json_and_parquet_files_give_the_same_documents(tmp_path, text_dir):
    lines = [json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(DOCUMENTS)]
    (tmp_path / "docs.jsonl").write_text("".join(lines))
    datasets.Dataset.from_dict({"content": DOCUMENTS}).to_parquet(str(tmp_path / "docs.parquet"))
    from_text = list(iter_documents(files_config(text_dir), "train"))
    assert list(iter_documents(files_config(tmp_path, "*.jsonl"), "train")) == from_text
    assert list(iter_documents(files_config(tmp_path, "*.parquet", text_field="content"), "train")) == from_text


def _recording_load_dataset(monkeypatch, calls):
    def fake_load_dataset(name, subset=None, split=None, streaming=False):
        calls.append({"name": name, "subset": subset, "split": split, "streaming": streaming})
        dataset = datasets.Dataset.from_dict({"text": [f"{split} {t}" for t in DOCUMENTS]})
        return dataset.to_iterable_dataset(num_shards=4) if streaming else dataset

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)


def test_hub_source_passes_name_subset_split_streaming(monkeypatch, tokenizer):
    calls = []
    _recording_load_dataset(monkeypatch, calls)
    cfg = DataConfig(source="hub", name="allenai/c4", subset="en", split="train", eval_split="validation",
                     streaming=True, seq_len=SEQ_LEN, shuffle_buffer=4)
    assert list(iter_documents(cfg, "eval"))[0].startswith("validation ")
    assert len(list(iter_documents(cfg, "train"))) == len(DOCUMENTS)  # a named eval split: nothing held out
    next(build_train_batches(cfg, tokenizer, 2, seed=0))
    assert calls == [{"name": "allenai/c4", "subset": "en", "split": "validation", "streaming": True}] + \
        [{"name": "allenai/c4", "subset": "en", "split": "train", "streaming": True}] * 2

    calls.clear()
    map_style = dataclasses.replace(cfg, streaming=False, eval_split=None)
    assert build_train_batches(map_style, tokenizer, 2, seed=0).num_sequences > 0
    assert calls == [{"name": "allenai/c4", "subset": "en", "split": "train", "streaming": False}]


def test_streaming_ranks_read_disjoint_documents(monkeypatch, tokenizer):
    _recording_load_dataset(monkeypatch, [])
    cfg = DataConfig(source="hub", name="c4", streaming=True, packing=False, seq_len=256, shuffle_buffer=4)
    seen = []
    for rank in (0, 1):
        batches = build_train_batches(cfg, tokenizer, 1, seed=0, rank=rank, world_size=2)
        seen.append({tuple(next(batches)["input_ids"][0].tolist()) for _ in range(10)})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_hub_source_loads_a_local_dataset_directory(tmp_path, tokenizer):
    folder = tmp_path / "local_hub_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS))
    cfg = DataConfig(source="hub", name=str(folder), seq_len=SEQ_LEN, eval_fraction=0.2)
    assert sorted(iter_documents(cfg, "train")) == sorted(iter_documents(files_config(folder, "*.jsonl"), "train"))


# ---------------------------------------------------------------------------------------------------------
# Ranks


def test_ranks_are_disjoint_and_cover_the_single_rank_stream(text_dir, tokenizer):
    cfg = files_config(text_dir)
    single = torch.cat([b["input_ids"] for b in take(build_train_batches(cfg, tokenizer, 2, seed=4), 6)])
    ranks = [torch.cat([b["input_ids"] for b in take(build_train_batches(cfg, tokenizer, 2, seed=4, rank=r,
                                                                          world_size=2), 3)]) for r in (0, 1)]
    assert torch.equal(ranks[0], single[0::2]) and torch.equal(ranks[1], single[1::2])
    rows = [{tuple(row.tolist()) for row in rank_rows} for rank_rows in ranks]
    assert len(rows[0]) == len(rows[1]) == 6 and not rows[0] & rows[1]


# ---------------------------------------------------------------------------------------------------------
# Prepared shards


def load_prepare_script():
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("packing", [True, False])
def test_prepared_shards_give_the_same_batches(tmp_path, text_dir, packing):
    config_path = tmp_path / "prepare.yaml"
    config_path.write_text(json.dumps({  # JSON is YAML
        "tokenizer": {"train_bpe": {"vocab_size": 300, "min_frequency": 1}},
        "data": {"source": "files", "files": [str(text_dir / "*.txt")], "seq_len": SEQ_LEN, "eval_fraction": 0.2},
    }))
    out = tmp_path / "prepared"
    meta = load_prepare_script().main(["--config", str(config_path), "--out", str(out), "--shard-tokens", "128",
                                       "--eval-tokens", "200", f"data.packing={str(packing).lower()}"])
    assert meta["dtype"] == "uint16" and meta["seq_len"] == SEQ_LEN and len(meta["splits"]["train"]["shards"]) > 1
    assert json.loads((out / "meta.json").read_text()) == meta
    assert np.load(out / meta["splits"]["train"]["shards"][0]["ids"]).dtype == np.uint16

    direct_cfg = files_config(text_dir, packing=packing)
    prepared_cfg = DataConfig(source="prepared", path=str(out), seq_len=SEQ_LEN, packing=packing)
    tokenizer = build_tokenizer(TokenizerConfig(name="ignored/for-prepared"), prepared_cfg)
    direct = build_train_batches(direct_cfg, tokenizer, 3, seed=2)
    prepared = build_train_batches(prepared_cfg, tokenizer, 3, seed=2)
    assert prepared.num_sequences == direct.num_sequences == meta["splits"]["train"]["sequences"]
    assert_same_batches(take(prepared, direct.num_sequences // 3 + 3), take(direct, direct.num_sequences // 3 + 3))
    assert_same_batches(eval_batches(prepared_cfg, tokenizer, 4, 150), eval_batches(direct_cfg, tokenizer, 4, 150))


def test_prepared_rejects_other_seq_len_or_tokenizer(tmp_path, text_dir, tokenizer):
    prepare = load_prepare_script().prepare
    out = tmp_path / "prepared"
    prepare(files_config(text_dir), TokenizerConfig(train_bpe=BPEConfig(vocab_size=280, min_frequency=1)), out,
            eval_tokens=50)
    with pytest.raises(ValueError, match="data.seq_len"):
        build_train_batches(DataConfig(source="prepared", path=str(out), seq_len=32), tokenizer, 2, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        build_train_batches(DataConfig(source="prepared", path=str(out), seq_len=SEQ_LEN), tokenizer, 2, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_glob_matching_nothing_names_the_pattern(tmp_path, tokenizer):
    with pytest.raises(DataError, match="nothing-here"):
        list(iter_documents(files_config(tmp_path, "nothing-here/*.txt"), "train"))


@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_file_names_the_file(tmp_path, tokenizer, streaming):
    (tmp_path / "broken.parquet").write_text("this is not parquet")
    cfg = files_config(tmp_path, "*.parquet", streaming=streaming)
    with pytest.raises(DataError, match="broken.parquet"):
        list(iter_documents(cfg, "train"))
    with pytest.raises(DataError, match="broken.parquet"):
        next(build_train_batches(cfg, tokenizer, 2, seed=0))


def test_missing_text_field_names_the_key(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="data.text_field: no column 'text'"):
        list(iter_documents(files_config(tmp_path, "*.jsonl"), "train"))


def test_mixed_formats_are_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match="mixed formats"):
        list(iter_documents(files_config(tmp_path, "*"), "train"))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_parquet_row_without_text_names_the_file_and_row(tmp_path, tokenizer, streaming):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first document", "second document"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["third document", None]}), tmp_path / "b.parquet")
    cfg = files_config(tmp_path, "*.parquet", streaming=streaming)
    with pytest.raises(DataError, match=r"data.text_field: row 2 of '.*b.parquet' has no text in 'text' \(found null"):
        list(iter_documents(cfg, "train"))
