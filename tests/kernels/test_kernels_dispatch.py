"""The backend choice `optimizer.kernels: auto | triton | torch`."""
import pytest
import torch

from lowmem.kernels import dispatch


def test_auto_is_torch_off_cuda_and_torch_is_always_torch():
    assert dispatch.resolve_backend("auto", "cpu") == "torch"
    assert dispatch.resolve_backend("torch", "cpu") == "torch"


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.resolve_backend("auto", torch.device("cuda", 0)) == "torch"


def test_triton_without_cuda_is_refused_unless_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend("triton", "cpu") == "triton"


def test_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="cannot be imported"):
        dispatch.resolve_backend("triton", torch.device("cuda", 0))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'trition'"):
        dispatch.resolve_backend("trition", "cpu")


@pytest.mark.subprocess
def test_lowmem_works_where_triton_cannot_be_imported():
    """The torch path runs, auto resolves to it, and a kernel launch says why it cannot run."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed")
sys.meta_path.insert(0, NoTriton())
import torch
import lowmem.kernels.residual, lowmem.kernels.adafactor, lowmem.kernels.microadam
from lowmem.kernels import adam
from lowmem.kernels.dispatch import resolve_backend
from lowmem.optim.presets import AdamW8bitOptions, GaloreOptions
from lowmem.optim.pipeline import PipelineOptimizer
assert resolve_backend("auto", "cuda") == "torch"
for options in (GaloreOptions(rank=2), AdamW8bitOptions()):
    weight = torch.nn.Parameter(torch.ones(4, 3))
    weight.grad = torch.ones(4, 3)
    PipelineOptimizer([{"params": [weight], "projected": True}], options).step()
    print(weight.tolist())
try:
    adam.adam_direction(torch.ones(3), adam.Moments(torch.zeros(3), torch.zeros(3)), 1, 0.9, 0.999, 1e-8, True)
except RuntimeError as error:
    print(error)
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Triton is not installed" in run.stdout
