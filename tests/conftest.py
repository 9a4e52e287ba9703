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
