"""Memory accounting by counting tensor bytes (never process RSS), and CUDA peak allocation on GPU."""
from __future__ import annotations

import torch

from lowmem.optim.registry import optimizer_state_bytes


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients currently held, and optimizer state; predicted state bytes too when the
    optimizer states a formula (`expected_state_bytes`)."""
    params = list(model.parameters())
    report = {
        "params_bytes": tensor_bytes(params),
        "grads_bytes": tensor_bytes(p.grad for p in params),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
    }
    if hasattr(optimizer, "expected_state_bytes"):
        report["optimizer_state_bytes_predicted"] = int(optimizer.expected_state_bytes())
    device = params[0].device
    if device.type == "cuda":
        report["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return report


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def format_memory_table(report: dict[str, int]) -> str:
    rows = [(key.removesuffix("_bytes").replace("_", " "), format_bytes(value)) for key, value in report.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value:>12}" for name, value in rows)
