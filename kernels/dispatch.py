"""Which implementation runs an optimizer's element-wise work: `optimizer.kernels: auto | triton | torch`.

    auto    Triton when the tensors are on CUDA and Triton imports; the pure-torch path otherwise, except
            the Adam core's int8 / int4 moments on CPU, which step in a compiled C++ kernel where one can be
            built (lowmem.kernels.cpu_adam; the same codes as the torch path)
    triton  the Triton kernels; on a machine without CUDA this is refused with a clear message, unless
            TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests: correct and very slow)
    torch   the pure-torch path (the code the optimizer runs without kernels)
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Whether Triton imports; asked only when the choice depends on it (auto on CUDA, or triton), so the
    optimizer can import this module without importing Triton."""
    from lowmem.kernels._triton import HAVE_TRITON

    return HAVE_TRITON


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET set before kernel modules import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(choice: str, device: torch.device | str) -> str:
    """'triton' or 'torch' for tensors on `device` under the option value `choice` (module docstring)."""
    if choice not in BACKENDS:
        raise ValueError(f"kernels: unknown backend '{choice}'; choose from {list(BACKENDS)}")
    device = torch.device(device)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("optimizer.kernels is 'triton' but Triton cannot be imported here; install triton or "
                           "use kernels: auto (the pure-torch path off CUDA)")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"optimizer.kernels is 'triton' but the weights are on '{device}': Triton kernels need "
                           f"CUDA tensors. Use kernels: auto (Triton on CUDA, the pure-torch path elsewhere) "
                           f"or torch; to run the kernels on CPU in Triton's interpreter (tests only, slow), set "
                           f"TRITON_INTERPRET=1 before lowmem is imported")
    return "triton"
