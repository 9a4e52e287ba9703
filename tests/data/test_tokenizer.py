"""The tokenizer: byte-level BPE training, special tokens, loading by name, from a checkpoint, from prepared data."""
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lowmem.data.tokenizer as tokenizer_module
from lowmem.data.batches import is_held_out, iter_documents
from lowmem.data.config import BPEConfig, DataConfig, TokenizerConfig
from lowmem.data.tokenizer import EOS_TOKEN, PAD_TOKEN, build_tokenizer, train_bpe
from lowmem.errors import ConfigError

WORDS = "the quick brown fox jumps over lazy dog def return import class lambda yield (x) [0] {a: b}".split()


def make_documents(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) + "\n" for _ in range(count)]


@pytest.fixture
def text_files(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(make_documents(30)):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return DataConfig(source="files", files=[str(folder / "*.txt")], eval_fraction=0.2)


BPE = BPEConfig(vocab_size=320, min_frequency=1)


def test_bpe_training_is_deterministic():
    first = train_bpe(BPE, iter(make_documents(20)))
    second = train_bpe(BPE, iter(make_documents(20)))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == BPE.vocab_size


def test_bpe_round_trips_text_and_has_special_tokens():
    tokenizer = train_bpe(BPE, iter(make_documents(20)))
    text = "def f(x):\n    return  x  # ünïcödé ✓ \t tabs\n\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("a b")["input_ids"] == tokenizer("a b", add_special_tokens=False)["input_ids"]  # no bos/eos


def test_bpe_max_chars_limits_training_text():
    docs = make_documents(20)
    assert (train_bpe(BPEConfig(vocab_size=320, min_frequency=1, max_chars=len(docs[0])), iter(docs))
            .backend_tokenizer.to_str()
            == train_bpe(BPEConfig(vocab_size=320, min_frequency=1), iter(docs[:1])).backend_tokenizer.to_str())


def test_save_pretrained_and_load_by_local_name(tmp_path, text_files):
    tokenizer = train_bpe(BPE, iter(make_documents(20)))
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = build_tokenizer(TokenizerConfig(name=str(tmp_path / "tok")), text_files)  # the hub code path
    text = "lambda (x) yield {a: b}"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(loaded) == len(tokenizer)


def test_build_tokenizer_trains_on_training_documents_only(monkeypatch, text_files):
    seen = []

    def recording_train_bpe(cfg, documents):
        documents = list(documents)
        seen.extend(documents)
        return train_bpe(cfg, iter(documents))

    monkeypatch.setattr(tokenizer_module, "train_bpe", recording_train_bpe)
    tokenizer = build_tokenizer(TokenizerConfig(train_bpe=BPE), text_files)
    assert seen == list(iter_documents(text_files, "train"))
    assert not any(is_held_out(text, text_files.eval_fraction) for text in seen)
    assert len(seen) < 30  # some documents were held out
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


def test_saved_dir_takes_precedence(tmp_path, text_files):
    saved = train_bpe(BPEConfig(vocab_size=300, min_frequency=1), iter(make_documents(5, seed=1)))
    saved.save_pretrained(tmp_path / "checkpoint" / "model")
    cfg = TokenizerConfig(name=str(tmp_path / "missing"), train_bpe=BPE)
    loaded = build_tokenizer(cfg, text_files, saved_dir=tmp_path / "checkpoint" / "model")
    assert loaded.backend_tokenizer.to_str() == saved.backend_tokenizer.to_str()
    # A saved_dir without a tokenizer (a fresh run) falls through to the config.
    fresh = build_tokenizer(TokenizerConfig(train_bpe=BPE), text_files, saved_dir=tmp_path / "nothing")
    assert len(fresh) == BPE.vocab_size


def _word_level_tokenizer(**special_tokens) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", **special_tokens)


def test_gpt2_like_tokenizer_gets_pad_equal_to_eos(tmp_path, text_files):
    _word_level_tokenizer(eos_token="</s>").save_pretrained(tmp_path / "gpt2like")
    tokenizer = build_tokenizer(TokenizerConfig(name=str(tmp_path / "gpt2like")), text_files)
    assert tokenizer.eos_token_id == 3 and tokenizer.pad_token_id == 3


def test_tokenizer_without_eos_gets_one(tmp_path, text_files):
    _word_level_tokenizer().save_pretrained(tmp_path / "noeos")
    tokenizer = build_tokenizer(TokenizerConfig(name=str(tmp_path / "noeos")), text_files)
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 4
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and len(tokenizer) == 5


def test_unknown_hub_name_fails_naming_the_key(text_files):
    with pytest.raises(ConfigError, match="tokenizer.name: cannot load 'no-such-org/no-such-tokenizer'"):
        build_tokenizer(TokenizerConfig(name="no-such-org/no-such-tokenizer"), text_files)
