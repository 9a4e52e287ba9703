"""The Triton kernels (lowmem.kernels): correctness against the torch path, achieved GB/s, optimizer steps.

    python benchmarks/bench_kernels.py              # CUDA: every kernel checked on the GPU, then its GB/s and the
                                                    # fraction of the device's measured copy bandwidth; optimizer
                                                    # step times on 4096x4096 and 4096x11008 (rank 128 and 512)
                                                    # against kernels: torch, torch AdamW(fused=True) and
                                                    # bitsandbytes' AdamW8bit; a whole llama_1b step (GaLore, int8)
    python benchmarks/bench_kernels.py --interpret  # CPU: the same run on tiny shapes in Triton's interpreter;
                                                    # the checks are real, the timings meaningless
    python benchmarks/bench_kernels.py --compile [--arch 90] [--one-each]
                                                    # no GPU needed: compile every kernel variant the launchers
                                                    # make for a GPU (with the --interpret cases) for that NVIDIA
                                                    # architecture (Triton's bundled ptxas)

Each check runs a kernel through the optimizer code that calls it (the pipeline, a core's step, the projected
epilogue) with kernels on and off, on the same gradients. Targets (on a GPU): element-wise kernels >= 85% of
copy bandwidth; the int8 update faster than bitsandbytes'; the projected update >= 1.5x kernels: torch; a
llama_1b GaLore int8 step within 1.2x of fused AdamW's. The llama_1b step is timed three ways: kernels: torch,
kernels: triton weight by weight (step_param: fused Adam and the fused epilogue per weight), and kernels:
triton by step() (the batched step: one multi-tensor Adam launch per kind for the dense weights and one for the
projected cores, then each weight's epilogue). Exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Callable

import torch

K = SimpleNamespace()  # the kernel modules, imported after TRITON_INTERPRET is decided
BETAS = (0.9, 0.999)


def load_kernels() -> None:
    from lowmem.kernels import adafactor, adam, fake_quant, microadam, residual

    K.adam, K.residual, K.adafactor, K.microadam, K.fake_quant = adam, residual, adafactor, microadam, fake_quant


# ---------------------------------------------------------------------------------------------------------
# Correctness: each kernel through the optimizer code that calls it, against that code's torch path, on small
# shapes (--interpret, and first on a GPU)


def adam_state(storage, shape, device):
    """Zero Adam moments kept by `storage`, as the core creates them."""
    from lowmem.optim.parts.cores import FIRST, SECOND

    state = {}
    storage.zeros(state, FIRST, torch.Size(shape), device, "signed")
    storage.zeros(state, SECOND, torch.Size(shape), device, "unsigned")
    return state


def storage_named(name: str):
    from lowmem.optim.state.storage import BF16, FP32, QuantizedStorage

    return {"fp32": FP32, "bf16": BF16}.get(name) or QuantizedStorage(name)


def updater(opt, per_weight: bool) -> Callable[[], None]:
    """One update of `opt`: weight by weight (begin_update, step_param: the per-weight rule), or step() (the
    batched step)."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def weight_by_weight() -> None:
        opt.begin_update()
        for p in params:
            opt.step_param(p)

    return weight_by_weight if per_weight else opt.step


def run_pipeline(options, kernels: str, groups: list[tuple[list[torch.Tensor], dict]], updates: list[list],
                 device: str, per_weight: bool = True) -> list[torch.Tensor]:
    """A PipelineOptimizer over copies (on `device`) of each group's tensors with its settings, stepped once per
    entry of `updates` (a gradient or None per tensor, in order): weight by weight (begin_update, step_param),
    or by step() (the batched step). Returns the weights."""
    from lowmem.optim.pipeline import PipelineOptimizer

    params, param_groups = [], []
    for tensors, settings in groups:
        group = [torch.nn.Parameter(t.to(device, copy=True)) for t in tensors]
        params += group
        param_groups.append({"params": group, **settings})
    opt = PipelineOptimizer(param_groups, type(options)(**{**options.__dict__, "kernels": kernels}))
    update = updater(opt, per_weight)
    for grads in updates:
        for p, grad in zip(params, grads):
            p.grad = None if grad is None else grad.to(device, p.dtype)
        update()
    return [p.detach() for p in params]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for t in tensors])


def paired(options, groups, updates, per_weight=True):
    """run_pipeline on the kernels (per weight or batched) and on the torch path (weight by weight), flattened."""
    def run(device):
        ours = run_pipeline(options, "triton", groups, updates, device, per_weight)
        return flat(ours), flat(run_pipeline(options, "torch", groups, updates, device))
    return run


def case_adam_update(state_dtype: str, weight_dtype: torch.dtype, decay_after: bool, transposed: bool = False):
    """A dense weight on the fused step-and-update, two updates."""
    from lowmem.optim.presets import AdamW8bitOptions

    options = AdamW8bitOptions(state_dtype=state_dtype, adam_convention="galore" if decay_after else "torch",
                               lr=1e-2, weight_decay=0.1)
    shape = (61, 83)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape[::-1] if transposed else shape, generator=gen).to(weight_dtype)
    weight = weight.T if transposed else weight
    updates = [[torch.randn(shape, generator=gen)] for _ in (1, 2)]
    run = paired(options, [([weight], {})], updates)
    bf16 = weight_dtype == torch.bfloat16 or state_dtype == "bf16"
    return lambda device: (*run(device), (2 ** -7 if bf16 else 1e-5), (1e-4 if bf16 else 1e-6))


def case_stochastic_rounding(device):
    """adam_update's stochastic rounding of a bf16 weight: within one bf16 unit of the torch path's fp32 result."""
    from lowmem.optim.presets import AdamW8bitOptions

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4096, generator=gen).to(torch.bfloat16)
    grad = torch.randn(4096, generator=gen)
    exact, = run_pipeline(AdamW8bitOptions(state_dtype="fp32", lr=1e-3), "torch", [([weight.float()], {})],
                          [[grad]], device)
    ours = weight.to(device)
    moments = K.adam.Moments(torch.zeros(4096, device=device), torch.zeros(4096, device=device))
    K.adam.adam_update(ours, grad.to(device), moments, 1, 1e-3, *BETAS, 1e-8, True, stochastic_rounding=True, seed=5)
    return ours.float(), exact, 2 ** -7, 0.0


def core_directions(state_dtype: str, grads: list[torch.Tensor], device: str, clip: float = None):
    """The pipeline's core step (PipelineOptimizer._core_step: the Adam core, GaloreOptions' convention, eps 1e-6)
    of each gradient in turn, on the kernels and on the torch path; with `clip`, SPAM's clip (spam_clip, theta
    `clip`, from the second update on): fused into the kernel, or the transform in torch before the core."""
    from lowmem.optim.parts.cores import CoreContext
    from lowmem.optim.pipeline import PipelineOptimizer
    from lowmem.optim.presets import GaloreOptions

    options = GaloreOptions(state_dtype=state_dtype, **(dict(transforms=["spam_clip"], spam_theta=clip,
                                                              spam_clip_delay=0) if clip else {}))
    opt = PipelineOptimizer([torch.nn.Parameter(torch.zeros(2, 2))], options)
    group = {"betas": BETAS, "eps": 1e-6}
    states = {}, {}
    for number, grad in enumerate(grads, 1):
        grad = grad.to(device)
        directions = []
        for state, fused in zip(states, (True, False)):
            step = opt.transforms.prepare(state, number) if clip else None
            directions.append(opt._core_step(grad, state, group, CoreContext(grad, fused=fused), step)[0])
    return directions


def case_adam_direction(state_dtype: str):
    def run(device):
        gen = torch.Generator().manual_seed(2)
        return (*core_directions(state_dtype, [torch.randn(24, 333, generator=gen) for _ in (1, 2)], device),
                1e-5, 1e-6)
    return run


def case_adam_spam_clip(state_dtype: str):
    """adam_direction with SPAM's clip fused, against the transform's torch clip before the core's torch step."""
    def run(device):
        gen = torch.Generator().manual_seed(4)
        grads = [torch.randn(24, 333, generator=gen) * (1 + 3 * step) for step in (1, 2, 3)]
        return (*core_directions(state_dtype, grads, device, clip=2.0), 1e-5, 1e-6)
    return run


def case_fake_quant(kind: str, fmt: str, dtype: torch.dtype, shape: tuple[int, ...], group_size: int):
    def run(device):
        from lowmem.model.quant import fake as ref

        gen = torch.Generator().manual_seed(5)
        x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
        references = {"int4": lambda: ref.int4_weight(x, group_size) if kind == "weight" else
                      ref.int4_activation(x, group_size, 2), "fp4": lambda: ref.fp4_e1m2(x, group_size, 2)}
        return K.fake_quant.fake_quantize(x, kind, fmt, group_size, 2).float(), references[fmt]().float(), 0.0, 0.0
    return run


def case_adam_multi():
    """The batched step (adam_update_multi): int8 and fp32 moments, an fp32 and a bf16 weight, two groups (their
    own decay), a weight missing a gradient (moments a count apart), against the torch path weight by weight."""
    from lowmem.optim.presets import AdamW8bitOptions

    gen = torch.Generator().manual_seed(3)
    shapes, dtypes = [(61, 83), (64,), (70, 70), (5000,)], [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    weights = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    updates = [[torch.randn(s, generator=gen) for s in shapes] for _ in (1, 2, 3)]
    updates[1][1] = None
    groups = [(weights[:2], {"weight_decay": 0.0}), (weights[2:], {"weight_decay": 0.1})]
    run = paired(AdamW8bitOptions(lr=1e-2), groups, updates, per_weight=False)
    return lambda device: (*run(device), 2 ** -7, 1e-4)


def case_projected(residual_name: str, variant: str = "paper", weight_dtype=torch.float32, empty: bool = False):
    """The fused epilogue (PipelineOptimizer._fused_epilogue) against the torch path after the core step
    (_back_projected, the convention's apply_update on an fp32 copy)."""
    def run(device):
        from lowmem.optim.parts.projectors import canonical
        from lowmem.optim.pipeline import PipelineOptimizer
        from lowmem.optim.presets import GaloreOptions

        extra = ({"fira_variant": variant} if residual_name == "fira" else
                 {"inactive_lr_scale": 0.5} if residual_name in ("sign_sgd", "sgd") else {})
        opt = PipelineOptimizer([torch.nn.Parameter(torch.zeros(2, 2))],
                                GaloreOptions(residual=residual_name, scale=0.25, **extra))
        gen = torch.Generator().manual_seed(4)
        shape = (72, 40)
        weight = torch.randn(shape, generator=gen).to(device, weight_dtype)
        ours, ref = weight.clone(), weight.float()
        states = {}, {}
        for step in (1, 2, 3):
            grad = (torch.randn(shape, generator=gen) * step).to(device)
            basis = core = direction = None
            if not empty:
                basis = torch.linalg.qr(torch.randn(40, 8, generator=gen)).Q.to(device)
                core = basis.T @ canonical(grad)
                direction = core / (core.abs() + 0.1)
            opt._fused_epilogue(ours, grad, basis, core, direction, 0.8, states[0], 1e-2, 1e-3)
            update_c = opt._back_projected(canonical(grad), core, None if empty else direction.clone(), 0.8,
                                           states[1], basis)
            opt.convention.apply_update(canonical(ref), update_c, 1e-2, 1e-3)
            ref = ref.to(weight_dtype).float()  # the per-weight rule rounds the weight after each update
        bf16 = weight_dtype == torch.bfloat16
        return ours.float(), ref, (2 ** -7 if bf16 else 1e-5), 1e-6
    return run


def case_adafactor(moment_dtype):
    """AdafactorCore's step of a matrix on the kernels and on the torch path (relative step, parameter scale)."""
    def run(device):
        from lowmem.optim.parts.adafactor import AdafactorCore
        from lowmem.optim.parts.cores import CoreContext
        from lowmem.optim.presets import AdafactorOptions
        from lowmem.optim.state.storage import StoragePolicy

        betas = (0.9, 0.999) if moment_dtype else (0.0, 0.999)
        options = AdafactorOptions(betas=betas, clip_threshold=0.05, state_dtype=moment_dtype or "fp32")
        core = AdafactorCore(options, StoragePolicy(options.state_dtype))
        gen = torch.Generator().manual_seed(5)
        shape = (37, 300)
        weight = torch.randn(shape, generator=gen).to(device)
        group = {"betas": betas, "lr": 1.0, "eps": options.eps}
        states = {}, {}
        for _ in (1, 2):
            grad = torch.randn(shape, generator=gen).to(device)
            got = core.step(grad, states[0], group, CoreContext(weight, fused=True)).direction
            expected = core.step(grad, states[1], group, CoreContext(weight)).direction
        bf16 = moment_dtype == "bf16"
        return got, expected, (2 ** -7 if bf16 else 1e-5), (2 ** -7 * float(expected.abs().max()) if bf16 else 1e-9)
    return run


def case_microadam(ef_block: int):
    """MicroAdamCore's step on the kernels and on the torch path, past a wrap of its window."""
    def run(device):
        from lowmem.optim.parts.cores import CoreContext
        from lowmem.optim.parts.microadam import MicroAdamCore
        from lowmem.optim.presets import MicroAdamOptions
        from lowmem.optim.state.storage import StoragePolicy

        core = MicroAdamCore(MicroAdamOptions(window=3, k_init=0.05, topk_block=512, ef_block=ef_block),
                             StoragePolicy("fp32"))
        group = {"betas": BETAS, "eps": 1e-8}
        states = {}, {}
        gen = torch.Generator().manual_seed(6)
        for _ in range(4):
            grad = torch.randn(37, 101, generator=gen).to(device)
            got = core.step(grad, states[0], group, CoreContext(grad, fused=True)).direction
            expected = core.step(grad, states[1], group, CoreContext(grad)).direction
        return got, expected, 1e-5, 1e-7
    return run


CASES: dict[str, Callable] = {
    **{f"adam_update {s} state, fp32 weight": case_adam_update(s, torch.float32, False) for s in
       ("fp32", "bf16", "int8", "int4")},
    "adam_update int8 state, bf16 weight, decay after": case_adam_update("int8", torch.bfloat16, True),
    "adam_update int4 state, transposed weight": case_adam_update("int4", torch.float32, True, transposed=True),
    "adam_update bf16 stochastic rounding": case_stochastic_rounding,
    **{f"adam_direction {s} state": case_adam_direction(s) for s in ("fp32", "bf16", "int8", "int4")},
    "adam_update_multi (batched step), int8 / fp32 kinds": case_adam_multi(),
    "projected drop, fp32 weight (addmm)": case_projected("drop"),
    "projected drop, bf16 weight": case_projected("drop", weight_dtype=torch.bfloat16),
    "projected fira (paper)": case_projected("fira"),
    "projected fira (code)": case_projected("fira", "code"),
    "projected sign_sgd": case_projected("sign_sgd"),
    "projected sgd, bf16 weight": case_projected("sgd", weight_dtype=torch.bfloat16),
    "projected sign_sgd, empty subspace": case_projected("sign_sgd", empty=True),
    "adafactor_direction": case_adafactor(None),
    "adafactor_direction, bf16 first moment": case_adafactor("bf16"),
    "microadam, bucket 64": case_microadam(64),
    "microadam, bucket 33 (torch quantizer)": case_microadam(33),
    "adam_direction with SPAM's clip, fp32": case_adam_spam_clip("fp32"),
    "adam_direction with SPAM's clip, int8": case_adam_spam_clip("int8"),
    "fake_quant int4 weight, row-crossing groups": case_fake_quant("weight", "int4", torch.float32, (40, 60), 256),
    "fake_quant int4 activation, bf16": case_fake_quant("activation", "int4", torch.bfloat16, (3, 5, 256), 128),
    "fake_quant fp4, padded tail": case_fake_quant("activation", "fp4", torch.float32, (7, 300), 128),
}


def check(device: str) -> bool:
    print(f"\nCorrectness against the torch path ({device}):")
    print(f"  {'case':<46} {'max abs err':>12} {'max rel err':>12}  ok")
    ok = True
    for name, run in CASES.items():
        got, expected, rtol, atol = run(device)
        diff = (got.float() - expected.float()).abs()
        rel = diff / expected.float().abs().clamp(min=1e-30)
        good = bool(torch.isfinite(got).all()) and bool((diff <= atol + rtol * expected.float().abs()).all())
        ok &= good
        print(f"  {name:<46} {float(diff.max()):12.3e} {float(rel.max()):12.3e}  {'yes' if good else 'NO'}")
    return ok


# ---------------------------------------------------------------------------------------------------------
# Compile check: every kernel variant the cases launch, compiled for an NVIDIA architecture without a GPU


def compile_check(arch: int, one_each: bool = False) -> bool:
    """Run the cases on CPU tensors with every launch recorded instead of run (the outputs are garbage), the
    launchers choosing their GPU tile sizes and `kernels: triton` taken for CPU tensors, then compile each
    distinct variant (or the first of each kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from lowmem.kernels import dispatch

    launches = []
    original_run, original_interpreting = JITFunction.run, dispatch.interpreting
    modules = (K.adam, K.residual, K.adafactor, K.microadam, K.fake_quant)
    original_tiles = [module._tiles for module in modules]

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    dispatch.interpreting = lambda: True  # what resolve_backend asks before it lets CPU tensors take the kernels
    for module, tiles in zip(modules, original_tiles):
        module._tiles = lambda device, *rest, tiles=tiles: tiles(torch.device("cuda"), *rest)
    try:
        for run in CASES.values():
            run("cpu")
    finally:
        JITFunction.run, dispatch.interpreting = original_run, original_interpreting
        for module, tiles in zip(modules, original_tiles):
            module._tiles = tiles
    pointer_types = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
                     torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
    seen, ok = set(), True
    print(f"\nCompiling for sm_{arch} (ptxas, no GPU):")
    for fn, args, kwargs in launches:
        values = dict(zip(fn.arg_names, args), **kwargs)
        signature, constexprs = {}, {}
        for param in fn.params:
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = pointer_types[value.dtype]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            else:
                signature[param.name] = "fp32"
        key = fn.__name__ if one_each else (fn.__name__, tuple(sorted(signature.items())),
                                            tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))
            status = f"ok  {len(compiled.asm['ptx']) // 1024:4d} KiB PTX"
        except Exception as error:  # report every failing variant, not only the first
            ok = False
            status = f"FAILED: {str(error).splitlines()[-1] if str(error) else type(error).__name__}"
        shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
        print(f"  {fn.__name__:<28} {time.perf_counter() - start:5.1f} s  {status}  [{shown}]")
    return ok


# ---------------------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `repeats` calls after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, numel: int, repeats: int) -> float:
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * numel / timed(lambda: dst.copy_(src), device, repeats) / 1e9


def bandwidth_table(device: str, shape: tuple[int, int], rank: int, repeats: int) -> None:
    from lowmem.optim.parts.cores import kernel_moments
    from lowmem.optim.parts.projectors import canonical
    from lowmem.optim.parts.residuals import RESIDUALS

    numel = math.prod(shape)
    copy = copy_bandwidth(device, max(numel, 1 << 26) if device == "cuda" else numel, repeats)
    print(f"\nKernel bandwidth on {shape[0]}x{shape[1]} ({device}; copy bandwidth measured: {copy:.0f} GB/s):")
    print(f"  {'kernel':<52} {'B/elem':>7} {'time ms':>9} {'GB/s':>8} {'of copy':>8}")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(device)
    grad = torch.randn(shape, generator=gen).to(device)
    rows = []

    def add(label: str, bytes_per_element: float, elements: int, fn: Callable[[], object]) -> None:
        t = timed(fn, device, repeats)
        rate = bytes_per_element * elements / t / 1e9
        rows.append(label)
        print(f"  {label:<52} {bytes_per_element:7.2f} {t * 1e3:9.3f} {rate:8.1f} {rate / copy:8.0%}")

    for name, state_bytes in (("fp32", 16), ("bf16", 8), ("int8", 4 + 16 / 256), ("int4", 2 + 16 / 128)):
        storage = storage_named(name)
        moments = kernel_moments(adam_state(storage, shape, device), storage)
        w = weight.clone() if name != "bf16" else weight.bfloat16()
        g = grad if name != "bf16" else grad.bfloat16()
        weight_bytes = 2 * w.element_size()
        add(f"adam_update, {name} state, {w.dtype} weight", g.element_size() + weight_bytes + state_bytes, numel,
            lambda w=w, g=g, m=moments: K.adam.adam_update(w, g, m, 5, 1e-3, *BETAS, 1e-8, True, 1e-4))
    core_shape = (rank, max(shape))
    core = torch.randn(core_shape, generator=gen).to(device)
    for name, state_bytes in (("fp32", 16), ("int8", 4 + 16 / 256)):
        storage = storage_named(name)
        moments = kernel_moments(adam_state(storage, core_shape, device), storage)
        add(f"adam_direction, {name} state, core {rank}x{max(shape)}", 4 + state_bytes + 4, core.numel(),
            lambda m=moments: K.adam.adam_direction(core, m, 5, *BETAS, 1e-8, False))
    basis = torch.linalg.qr(torch.randn(min(shape), rank, generator=gen).to(device)).Q
    grad_c = canonical(grad)
    core_grad = basis.T @ grad_c
    direction = core_grad / (core_grad.abs() + 0.1)
    # the epilogue kernel alone: W read and written, G, P R and P D read (the stacked GEMM timed apart)
    stacked = basis @ torch.cat([core_grad, direction], dim=1)
    back, pd = stacked[:, :core_grad.shape[1]], stacked[:, core_grad.shape[1]:]
    factor = torch.full((1,), 0.5, device=device)
    weight_c = canonical(weight)
    add("projected epilogue (sign_sgd), fp32 weight", 20, numel,
        lambda: K.residual.epilogue(weight_c, grad_c, 1e-3, 0.0, True, pd, 0.25, factor, back, sign=True))
    fira = RESIDUALS["fira"](scale=0.25)
    add("fira residual terms (norm reduction)", 8, numel,
        lambda: fira.epilogue_terms({}, grad_c, core_grad, direction, back, 1.0))
    row, col = torch.zeros(shape[0], device=device), torch.zeros(shape[1], device=device)
    add("adafactor_direction (3 passes over G, D written)", 16, numel,
        lambda: K.adafactor.adafactor_direction(grad, row, col, 0.9, 1e-30, 1.0, 1e-2))
    from lowmem.optim.parts.microadam import EF_LEVELS, ef_quantize

    codes, low, high = ef_quantize(torch.zeros(numel, device=device), 64)
    add("microadam ef_correct", 4 + 0.5 + 4, numel,
        lambda: K.microadam.ef_correct(grad, codes, low, high, 64, EF_LEVELS))
    values = grad.reshape(-1)
    add("microadam ef_quantize", 4 + 0.5, numel,
        lambda: K.microadam.ef_quantize_into(values, codes, low, high, 64, EF_LEVELS))


# ---------------------------------------------------------------------------------------------------------
# Optimizer steps


def pipeline_step_time(params, options, device: str, repeats: int, per_weight: bool = False) -> float:
    """Median time of an ordinary update (after the one refresh) of a PipelineOptimizer over `params`, by step()
    or weight by weight (begin_update, step_param)."""
    from lowmem.optim.pipeline import PipelineOptimizer

    update = updater(PipelineOptimizer(params, options), per_weight)
    update()  # a projector's refresh (SVD), outside the timing
    return timed(update, device, repeats)


def optimizer_steps(device: str, shapes: list[tuple[int, int]], ranks: list[int], repeats: int) -> None:
    import warnings

    from lowmem.optim.presets import AdamW8bitOptions, FiraOptions, GaloreOptions

    print(f"\nOptimizer step time ({device}), ms; ratio = kernels: torch / kernels: triton:")
    print(f"  {'shape':<12} {'what':<44} {'ms':>9} {'ratio':>7}")
    gen = torch.Generator().manual_seed(1)
    for shape in shapes:
        label = f"{shape[0]}x{shape[1]}"

        def param():
            p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.02)
            p.grad = torch.randn(shape, generator=gen).to(device) * 1e-3
            return p

        def show(what: str, t: float, ratio: str = "") -> None:
            print(f"  {label:<12} {what:<44} {t * 1e3:9.3f} {ratio:>7}")

        p = param()
        fused_adamw = torch.optim.AdamW([p], lr=1e-3, fused=True)
        show("torch AdamW(fused=True), fp32 states", timed(fused_adamw.step, device, repeats))
        del fused_adamw
        try:
            import bitsandbytes as bnb

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bnb_opt = bnb.optim.AdamW8bit([p], lr=1e-3, min_8bit_size=4096)
                t_bnb = timed(bnb_opt.step, device, repeats)
            show("bitsandbytes AdamW8bit", t_bnb)
            del bnb_opt
        except Exception as error:  # its backend may be missing on this machine: say so, go on
            t_bnb = None
            show(f"bitsandbytes AdamW8bit: unavailable ({type(error).__name__})", float("nan"))
        t_ref = pipeline_step_time([p], AdamW8bitOptions(kernels="torch"), device, repeats)
        show("AdamW int8 (pipeline, kernels: torch)", t_ref)
        t_fused = pipeline_step_time([p], AdamW8bitOptions(kernels="triton"), device, repeats)
        vs_bnb = f"{t_bnb / t_fused:.2f}x bnb" if t_bnb else ""
        show("AdamW int8 (pipeline, kernels: triton)", t_fused, f"{t_ref / t_fused:.2f}")
        if vs_bnb:
            print(f"  {'':<12} {'  fused int8 vs bitsandbytes':<44} {'':>9} {vs_bnb:>7}")
        for rank in ranks:
            for name, options, state_dtype in (("GaLore", GaloreOptions, "int8"), ("GaLore", GaloreOptions, "fp32"),
                                               ("Fira", FiraOptions, "fp32")):
                times = {kernels: pipeline_step_time(
                    [{"params": [p], "projected": True}],
                    options(rank=rank, update_gap=10 ** 9, state_dtype=state_dtype, kernels=kernels), device, repeats)
                    for kernels in ("torch", "triton")}
                show(f"{name} r{rank} {state_dtype}: kernels: torch", times["torch"])
                show(f"{name} r{rank} {state_dtype}: kernels: triton", times["triton"],
                     f"{times['torch'] / times['triton']:.2f}")


def model_params(device: str, tiny: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """llama_1b's weights (or a tiny stand-in) with gradients: (projected attention / MLP matrices, the rest)."""
    from lowmem.model.build import build_meta_model
    from lowmem.model.config import ModelConfig

    overrides = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=2) if tiny else {}
    meta = build_meta_model(ModelConfig(preset="llama_1b", **overrides), vocab_size=512 if tiny else None)
    gen = torch.Generator(device=device).manual_seed(2)
    projected, dense = [], []
    for name, meta_param in meta.named_parameters():
        p = torch.nn.Parameter(torch.randn(meta_param.shape, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(meta_param.shape, device=device, generator=gen) * 1e-3
        (projected if meta_param.dim() == 2 and ("self_attn" in name or "mlp" in name) else dense).append(p)
    return projected, dense


def model_step(device: str, tiny: bool, rank: int, repeats: int) -> None:
    from lowmem.optim.presets import GaloreOptions

    projected, dense = model_params(device, tiny)
    params = projected + dense
    total = sum(p.numel() for p in params)
    print(f"\nWhole optimizer step, {'tiny llama' if tiny else 'llama_1b'} ({total / 1e6:.1f}M parameters, {device}):")
    adamw = torch.optim.AdamW(params, lr=1e-3, fused=True)
    t_adamw = timed(adamw.step, device, repeats)
    adamw.state.clear()
    del adamw
    print(f"  {'torch AdamW(fused=True)':<58} {t_adamw * 1e3:9.2f} ms")
    times = {}
    for kernels, per_weight, what in (("torch", False, "kernels: torch"),
                                      ("triton", True, "kernels: triton, weight by weight"),
                                      ("triton", False, "kernels: triton, batched (per-kind launches)")):
        options = GaloreOptions(rank=rank, update_gap=10 ** 9, state_dtype="int8", kernels=kernels)
        groups = [{"params": projected, "projected": True}, {"params": dense}]
        times[what] = t = pipeline_step_time(groups, options, device, repeats, per_weight)
        versus = f"  ({times['kernels: torch'] / t:.2f}x faster than kernels: torch)" if kernels == "triton" else ""
        print(f"  {f'GaLore r{rank} int8, {what}':<58} {t * 1e3:9.2f} ms  {t / t_adamw:5.2f}x AdamW{versus}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interpret", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    mode.add_argument("--compile", action="store_true", help="compile every kernel variant for --arch, no GPU")
    parser.add_argument("--arch", type=int, default=90, help="NVIDIA compute capability for --compile (90: H100)")
    parser.add_argument("--one-each", action="store_true", help="--compile: the first variant of each kernel only")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.compile:
        os.environ["TRITON_INTERPRET"] = "0"
    load_kernels()
    if args.compile:
        sys.exit(0 if compile_check(args.arch, args.one_each) else 1)
    device = "cpu" if args.interpret else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --interpret (CPU, Triton interpreter) or --compile (no GPU needed)")
        sys.exit(2)
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        print("Triton interpreter on CPU: the checks are real, the timings are not (tiny shapes)")
    ok = check(device)
    tiny = args.interpret
    repeats = args.repeats or (2 if tiny else 20)
    bandwidth_table(device, (64, 172) if tiny else (4096, 11008), 16 if tiny else 512, repeats)
    optimizer_steps(device, [(64, 64), (64, 172)] if tiny else [(4096, 4096), (4096, 11008)],
                    [8, 16] if tiny else [128, 512], repeats)
    model_step(device, tiny, 16 if tiny else 512, repeats)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
