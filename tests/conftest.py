"""Test-wide settings: no hub access, Hugging Face caches in a temporary directory, Triton interpreted."""
import os
import tempfile

# Before any kernel module is imported: Triton runs its kernels on CPU tensors in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_cache = tempfile.mkdtemp(prefix="lowmem-hf-")
os.environ.setdefault("HF_HOME", _cache)
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_cache, "datasets"))


import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from lowmem.train.config import load_config  # noqa: E402

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def write_corpus(root):
    """The tiny run's documents: 40 files of 120 words drawn from WORDS with a fixed seed, in `root`."""
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        idx = torch.randint(0, len(WORDS), (120,), generator=gen).tolist()
        (root / f"doc{i:02d}.txt").write_text(" ".join(WORDS[j] for j in idx) + "\n")
    return root


@pytest.fixture
def make_config():
    """Factory: a validated training config for a tiny model on `corpus`, with dotted overrides."""
    return build_tiny_config


def build_tiny_config(tmp_path, corpus, *overrides):
    return load_config(write_tiny_config(tmp_path, corpus), list(overrides))


def write_tiny_config(tmp_path, corpus):
    """Writes tmp_path/config.yaml, the tiny run's config, and returns its path."""
    base = {
        "run": {"name": "t", "out_dir": str(tmp_path / "runs"), "seed": 3},
        "model": {"preset": "llama_9m", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2},
        "tokenizer": {"train_bpe": {"vocab_size": 300, "min_frequency": 1}},
        "data": {"source": "files", "files": [str(corpus / "*.txt")], "seq_len": 32, "eval_fraction": 0.1},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "train": {"batch_size": 4, "max_steps": 12, "warmup_steps": 2, "eval_every": 6, "eval_tokens": 256,
                  "log_every": 1},
        "checkpoint": {"every": 4, "keep_last": 2},
        "log": {"progress": False},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(base))
    return path




@pytest.fixture(scope="session")
def tiny_finetune(tmp_path_factory):
    """arch -> a directory holding model/ (a tiny checkpoint with a chat-template tokenizer), chat.jsonl and
    prompt_response.jsonl (lowmem.tiny_checkpoint)."""
    from lowmem.tiny_checkpoint import make_tiny_finetune

    root = tmp_path_factory.mktemp("tiny_finetune")
    return {arch: make_tiny_finetune(root / arch, arch, rows=160) for arch in ("llama", "gpt2")}
