"""Memory accounting by counting tensor bytes (never process RSS), and CUDA peak allocation on GPU."""
from __future__ import annotations

import dataclasses

import torch

from lowmem.optim.registry import optimizer_state_bytes

TORCH_ADAMW_STEP_BYTES = 4  # torch AdamW's fp32 `step` tensor per parameter


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


def format_rank_table(reports: list[dict[str, int]], extra: dict[str, dict[str, int]] | None = None) -> str:
    """One row per key, one column per rank, then one column per `extra` entry (a formula beside the counts)."""
    columns = [(f"rank {i}", r) for i, r in enumerate(reports)] + list((extra or {}).items())
    keys = list(dict.fromkeys(k for r in reports for k in r))
    names = {k: k.removesuffix("_bytes").replace("_", " ") for k in keys}
    width = max(len(n) for n in names.values())
    head = f"  {'':<{width}}" + "".join(f"  {label:>14}" for label, _ in columns)
    rows = [f"  {names[k]:<{width}}" + "".join(f"  {format_bytes(c[k]) if k in c else '-':>14}" for _, c in columns)
            for k in keys]
    return "\n".join([head] + rows)


def zero_formula(model: torch.nn.Module, total_state_bytes: int, world_size: int, stage: int) -> dict[str, int]:
    """What one rank should hold under ZeRO `stage` (0: plain data parallel): params P (P/N at stage 3),
    gradients G (G/N from stage 2), optimizer state S (S/N from stage 1), from the whole model's sizes."""
    from lowmem.memory.plan import MemoryPlan

    def whole(p: torch.Tensor) -> int:  # ZeRO-3 leaves an empty tensor in the module; ds_numel is its size
        return getattr(p, "ds_numel", p.numel()) * p.element_size()

    params = sum(whole(p) for p in model.parameters())
    grads = sum(whole(p) for p in model.parameters() if p.requires_grad)
    per_rank = MemoryPlan(params, grads, {"state": total_state_bytes}, 0, world_size, stage).per_rank()
    return {"params_bytes": per_rank["parameters"], "grads_bytes": per_rank["gradients"],
            "optimizer_state_bytes": per_rank["optimizer state"]}


def format_memory_table(report: dict[str, int]) -> str:
    rows = [(key.removesuffix("_bytes").replace("_", " "), format_bytes(value)) for key, value in report.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value:>12}" for name, value in rows)


def state_dtype_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """How the optimizer's moments are stored: a lowmem optimizer's resolved storage; for another, the state it
    holds after its first update (bitsandbytes' uint8 codes: int8), else its trainable weights' dtype."""
    policy = getattr(optimizer, "policy", None)
    if policy is not None:
        return policy.state_dtype
    held = {t.dtype for state in getattr(optimizer, "state", {}).values() for t in state.values()
            if torch.is_tensor(t) and t.numel() > 1}
    if held & {torch.uint8, torch.int8}:
        return "int8"
    dtypes = held or {p.dtype for p in model.parameters() if p.requires_grad}
    return "bf16" if dtypes == {torch.bfloat16} else "fp32"


def adamw_state_bytes(model: torch.nn.Module) -> int:
    """What torch AdamW would hold for this model: two moments in each trainable weight's dtype and a step."""
    return sum(2 * p.numel() * p.element_size() + TORCH_ADAMW_STEP_BYTES
               for p in model.parameters() if p.requires_grad)


def _predicted_with(model: torch.nn.Module, options) -> int:
    """The state an optimizer built from `options` would hold after its first update, on meta copies of the
    weights (nothing is allocated)."""
    from lowmem.optim.groups import param_groups
    from lowmem.optim.registry import OPTIMIZERS

    groups = [{**g, "params": [torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"))
                               for p in g["params"]]} for g in param_groups(model, options)]
    return OPTIMIZERS[options.name].build(groups, options).predicted_state_bytes()


def saving_rank(model: torch.nn.Module, options) -> int | None:
    """The largest rank (halving from the smallest projected side) at which `options` holds less state than
    AdamW, or None when the optimizer has no rank to lower."""
    from lowmem.optim.groups import param_groups, projected_shapes

    if not getattr(options, "projects", False) or options.projector == "blocks":
        return None
    sides = [min(shape) for shape in projected_shapes(param_groups(model, options)).values()]
    budget = adamw_state_bytes(model)
    rank = min(sides) // 2
    while rank >= 1:
        if _predicted_with(model, dataclasses.replace(options, rank=rank)) < budget:
            return rank
        rank //= 2
    return None


def state_versus_adamw(model: torch.nn.Module, optimizer: torch.optim.Optimizer, options) -> tuple[str, bool]:
    """A one-line statement of the optimizer's predicted state against AdamW's, and whether it saves nothing
    (then the line says which rank would)."""
    predicted = int(optimizer.predicted_state_bytes())
    adamw = adamw_state_bytes(model)
    line = (f"optimizer state: {options.name} {format_bytes(predicted)} = {predicted / adamw:.2f}x AdamW's "
            f"{format_bytes(adamw)} (predicted by formula for every weight after its first update)")
    if options.name == "adamw" or predicted < adamw:
        return line, False
    rank = saving_rank(model, options)
    advice = (f"; optimizer.rank={rank} (or the default optimizer.rank=null with density 0.25) would hold less"
              if rank else "")
    return line + f": it saves no memory over AdamW{advice}", True
