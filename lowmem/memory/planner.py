"""The memory planner: what a training config will hold on each GPU, predicted on the meta device (no weight
is allocated, so a laptop can ask about llama_7b in seconds), optionally checked by one real update, and, for
a GPU it does not fit, the cheapest settings that would fit.

    python -m lowmem.memory CONFIG.yaml [MORE.yaml ...] [dotted.key=value ...] [--gpu 24GB,80GB] [--json]
        [--world-size N] [--max-world-size M] [--zero-stage 0-3] [--measure]

The config is validated as `train.py` validates it on N ranks (lowmem.train.config.validate: launcher flags, the
DeepSpeed JSON, ZeRO-3's element-wise optimizers), so the planner accepts and refuses exactly what training
does; --zero-stage S plans distributed.backend=deepspeed with distributed.zero_stage=S and must agree with them.

The output starts with what the figures assume: the model and its parameter count, the optimizer (and its
largest rank), the dtypes of weights, gradients and moments, batch x sequence per micro-batch, micro-batches
and sequences per update, activation checkpointing and update in backward on or off, ranks and ZeRO stage.

Rows: parameters (in the training dtype), gradients (one at a time for weights stepped in backward, the
largest counted, but all of them with train.grad_accum > 1: accumulation sums into every gradient before the
last micro-batch steps them), optimizer state by part (projector bases, moments in their storage dtype,
quantization scales, windows, ...; each optimizer's own formula, equal to the counted bytes after the first
update), activations saved for backward (lowmem.memory.activations: traced on the meta device, with checkpointing
applied), and their total per rank. Under ZeRO the states, gradients and parameters are divided by the
ranks as its stages do (Rajbhandari et al.: stage 1 shards the optimizer state, 2 the gradients too, 3 the
parameters too); a matrix's optimizer state is never split (each matrix has one owner rank), so the state
of a rank may exceed S/N by at most the largest single weight's state, which the plan adds. With more than
one rank every row and part is one rank's: each part its share S/N, and the owner imbalance its own part.

For each --gpu size the plan does not fit, lowmem.memory.suggest searches the settings that change how the
model trains but not the model (update in backward, activation checkpointing, moments' dtype, rank, ZeRO
stage, more ranks up to --max-world-size, micro-batch with accumulation), each validated and planned as above,
and prints the few that fit with the fewest changes, then the smallest total: each with its total and the
exact overrides (and --world-size) to add to the command.

--json prints one object whose keys are snake_case, every byte count under a key ending in `_bytes`, the
predicted and measured sections naming the same rows alike:

    assumptions   model, parameter_count, trained_parameter_count, optimizer, rank (largest; null when the
                  optimizer has none), weights_dtype, gradients_dtype, moments_dtype, precision, batch_size,
                  seq_len, grad_accum, sequences_per_update, activation_checkpointing, update_in_backward,
                  world_size, zero_stage
    predicted     per rank: parameters_bytes, gradients_bytes, optimizer_state_bytes, activations_bytes,
                  total_bytes, optimizer_state_parts {<part>_bytes}
    measured      (--measure) one update on this machine, one process: parameters_bytes, gradients_bytes,
                  optimizer_state_bytes, activations_bytes, cuda_peak_allocated_bytes (on a GPU)
    gpus          {<size as given>: budget_bytes, fits, left_bytes, settings_tried (when searched),
                  suggestions [changes, overrides, flags, world_size, total_bytes, left_bytes]}
    notes         [what else the plan assumed]

Not counted: the CUDA context and allocator fragmentation (about 0.5-1 GB on a GPU), communication buckets,
and the transient gradient of the logits during backward.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Optional

import torch

from lowmem.config import apply_override, deep_merge, flatten, load_tree
from lowmem.console import log
from lowmem.distributed.deepspeed_settings import check_zero3_optimizer, grad_accum_for, zero_stage_of
from lowmem.errors import ConfigError
from lowmem.memory.plan import MemoryPlan
from lowmem.memory.suggest import ZERO_SHARDS, Search, knobs, search
from lowmem.train.config import Config, config_from_tree

GPU_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GIB|G|MB|MIB|M|TB|TIB|T)?\s*$", re.IGNORECASE)
UNIT_BYTES = {"": 2**30, "G": 2**30, "GB": 2**30, "GIB": 2**30, "M": 2**20, "MB": 2**20, "MIB": 2**20,
              "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_gpu_size(text: str) -> int:
    """Bytes of a GPU size such as '24GB' or '80GiB' (GPU makers' GB are GiB: a 24GB card has 24 GiB)."""
    match = GPU_SIZE.match(text)
    if not match:
        raise ConfigError(f"--gpu: cannot read '{text}' as a memory size; write it like 24GB, 80GB or 40GiB")
    size = int(float(match.group(1)) * UNIT_BYTES[(match.group(2) or "").upper()])
    if size <= 0:
        raise ConfigError(f"--gpu: '{text}' holds no memory; give a size above zero, like 24GB")
    return size


def vocab_size(config: Config, notes: list[str]) -> int | None:
    """The vocabulary the run's model will have, without fitting or downloading a tokenizer when avoidable."""
    if config.model.vocab_size is not None or config.model.pretrained is not None:
        return config.model.vocab_size
    if config.tokenizer.train_bpe is not None:
        return config.tokenizer.train_bpe.vocab_size
    try:  # a planner never downloads: only a tokenizer already on disk or in the cache is read
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(config.tokenizer.name, local_files_only=True))
    except (OSError, ValueError):
        notes.append(f"tokenizer '{config.tokenizer.name}' is not on this machine: the preset's vocabulary is assumed")
        return None


def dtype_name(dtype: torch.dtype) -> str:
    """A weight dtype as the config names it (model.dtype: fp32, bf16, fp16)."""
    from lowmem.model.build import MODEL_DTYPES

    return next((name for name, d in MODEL_DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def plan_memory(config: Config, world_size: int = 1, zero_stage: int = 0) -> MemoryPlan:
    """Predict a run's memory per rank from its config, on the meta device."""
    from lowmem.memory.activations import saved_activation_bytes
    from lowmem.model.build import build_meta_model, prepare_for_training, weight_dtype
    from lowmem.optim import build_optimizer

    notes: list[str] = []
    model = build_meta_model(config.model, vocab_size(config, notes)).to(weight_dtype(config.model,
                                                                                       config.train.precision))
    # Frozen weights have no gradient and no state; LoRA adds its adapters (their state is the optimizer's).
    model = prepare_for_training(model, config.model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    optimizer = build_optimizer(model, config.optimizer)
    check_zero3_optimizer(config, optimizer, zero_stage_of(config))  # as the run refuses it at start
    parts = optimizer.predicted_state_parts()
    accum = grad_accum_for(config, world_size)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    if config.optimizer.update_in_backward and accum == 1:
        # each gradient is freed by its own update: only the largest exists at once
        gradients = max(p.numel() * p.element_size() for p in trainable)
        notes.append("update in backward: only one weight's gradient exists at a time (the largest is counted)")
    elif config.optimizer.update_in_backward:
        notes.append(f"update in backward with {accum} micro-batches per update: the gradients accumulate over "
                     f"the first {accum - 1}, so every gradient exists at once (train.grad_accum=1 frees them)")
    activations = saved_activation_bytes(model, config.train.batch_size, config.data.seq_len,
                                         autocast_bf16=config.train.precision == "bf16_autocast",
                                         checkpointing=config.model.activation_checkpointing).total
    largest = 0
    if zero_stage >= 1 and world_size > 1:
        largest = max(_single_weight_state(optimizer, config, p) for p in trainable)
    plan = MemoryPlan(sum(p.numel() * p.element_size() for p in params), gradients, parts, activations,
                      world_size, zero_stage, largest, notes)
    plan.assumptions = _assumptions(config, params, optimizer, accum, world_size, zero_stage)
    return plan


def _assumptions(config: Config, params: list[torch.Tensor], optimizer, accum: int, world_size: int,
                 zero_stage: int) -> dict:
    """What the plan's figures assume (JSON-ready: snake_case keys, plain values)."""
    from lowmem.optim.state.storage import resolve_state_dtype

    trainable = [p for p in params if p.requires_grad]
    options = config.optimizer
    ranks = [options.rank_for(tuple(p.shape)) for g in optimizer.param_groups if g.get("projected")
             for p in g["params"]] if getattr(options, "projects", False) and options.projector != "blocks" else []
    trained_dtype = trainable[0].dtype if trainable else params[0].dtype
    return {
        "model": config.model.pretrained or config.model.preset,
        "parameter_count": sum(p.numel() for p in params),
        "trained_parameter_count": sum(p.numel() for p in trainable),
        "optimizer": options.name,
        "rank": max(ranks) if ranks else None,
        "weights_dtype": "+".join(sorted({dtype_name(p.dtype) for p in params})),
        "gradients_dtype": "+".join(sorted({dtype_name(p.dtype) for p in trainable})),
        "moments_dtype": resolve_state_dtype(getattr(options, "state_dtype", "auto"), trained_dtype),
        "precision": config.train.precision,
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "grad_accum": accum,
        "sequences_per_update": config.train.batch_size * accum * world_size,
        "activation_checkpointing": config.model.activation_checkpointing,
        "update_in_backward": options.update_in_backward,
        "world_size": world_size,
        "zero_stage": zero_stage,
    }


def _single_weight_state(optimizer, config: Config, param: torch.Tensor) -> int:
    """The predicted state of one weight alone (the most a rank can hold beyond S/N under owner sharding)."""
    from lowmem.optim.registry import OPTIMIZERS

    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    alone = OPTIMIZERS[config.optimizer.name].build([{**group, "params": [param],
                                                      "names": [_name_of(group, param)]}], config.optimizer)
    return alone.predicted_state_bytes()


def _name_of(group: dict, param: torch.Tensor) -> str | None:
    names = group.get("names") or [None] * len(group["params"])
    return next(n for p, n in zip(group["params"], names) if p is param)


def measure_one_update(config: Config) -> dict[str, int]:
    """Counted bytes after one real update on random tokens (and the CUDA peak on a GPU)."""
    from lowmem.distributed.launch import pick_device
    from lowmem.memory.activations import saved_activation_bytes
    from lowmem.memory.report import memory_report
    from lowmem.model.build import build_model, prepare_for_training, weight_dtype
    from lowmem.optim import build_optimizer

    device = pick_device(config.train.device)
    vocab = vocab_size(config, []) or 32000
    model = build_model(config.model, vocab, device, weight_dtype(config.model, config.train.precision))
    model = prepare_for_training(model, config.model)
    optimizer = build_optimizer(model, config.optimizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    activations = saved_activation_bytes(model, config.train.batch_size, config.data.seq_len,
                                         autocast_bf16=config.train.precision == "bf16_autocast").total
    vocab = model.get_input_embeddings().num_embeddings  # a pretrained model's own vocabulary
    ids = torch.randint(0, vocab, (config.train.batch_size, config.data.seq_len), device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.train.precision == "bf16_autocast"
                else torch.autocast(device.type, enabled=False))
    with autocast:
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    report = memory_report(model, optimizer)
    report["activations_bytes"] = activations
    return report


def count(n: int) -> str:
    """A parameter count for reading: 6.74B, 134.1M, 9.0K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def format_assumptions(a: dict) -> list[str]:
    """The header: what the figures below assume."""
    trained = ("all trained" if a["trained_parameter_count"] == a["parameter_count"]
               else f"{count(a['trained_parameter_count'])} trained")
    rank = f", rank {a['rank']}" if a["rank"] else ""
    on = {True: "on", False: "off"}
    shards = f"{ZERO_SHARDS[a['zero_stage']]} sharded" if a["zero_stage"] and a["world_size"] > 1 else "nothing sharded"
    ranks = f"{a['world_size']} rank{'s' if a['world_size'] > 1 else ''}"
    return [f"assumptions: {a['model']}, {count(a['parameter_count'])} parameters ({trained}); "
            f"optimizer {a['optimizer']}{rank}",
            f"  weights {a['weights_dtype']}, gradients {a['gradients_dtype']}, moments {a['moments_dtype']} "
            f"(train.precision={a['precision']})",
            f"  batch {a['batch_size']} x {a['seq_len']} tokens per micro-batch, {a['grad_accum']} micro-batch"
            f"{'es' if a['grad_accum'] > 1 else ''} per update ({a['sequences_per_update']} "
            f"sequence{'s' if a['sequences_per_update'] > 1 else ''} per update)",
            f"  activation checkpointing {on[a['activation_checkpointing']]}, "
            f"update in backward {on[a['update_in_backward']]}",
            f"  {ranks}, ZeRO stage {a['zero_stage']} ({shards})"]


@dataclass
class Verdict:
    """One --gpu size against the plan, with what would fit when it does not."""

    label: str
    size: int
    fits: bool
    search: Optional[Search] = None


def command_additions(suggestion, world_size: int, zero_flag: Optional[int]) -> tuple[list[str], list[str]]:
    """The dotted overrides and planner flags a suggestion adds to the command. Under --zero-stage a ZeRO change
    is that flag's new value (the dotted keys would conflict with it)."""
    overrides, flags = list(suggestion.overrides), suggestion.flags(world_size)
    stage = next((o.split("=")[1] for o in overrides if o.startswith("distributed.zero_stage=")), None)
    if zero_flag is not None and stage is not None:
        overrides = [o for o in overrides if not o.startswith(("distributed.zero_stage=", "distributed.backend="))]
        flags.append(f"--zero-stage {stage}")
    return overrides, flags


def format_plan(plan: MemoryPlan, verdicts: list[Verdict], measured: dict[str, int] | None,
                zero_flag: Optional[int] = None, max_world_size: Optional[int] = None) -> str:
    from lowmem.memory.report import format_bytes

    rows = plan.per_rank()
    lines = format_assumptions(plan.assumptions)
    lines.append("memory:" if plan.world_size == 1 else
                 f"memory per rank (what each of the {plan.world_size} ranks holds; a part is one rank's share):")
    counted = {"parameters": "params_bytes", "gradients": "grads_bytes", "optimizer state": "optimizer_state_bytes",
               "activations": "activations_bytes"}
    for name, value in rows.items():
        extra = ""
        if measured and counted[name] in measured:
            extra = f"   counted {format_bytes(measured[counted[name]])}"
        lines.append(f"  {name:<22}{format_bytes(value):>12}{extra}")
        if name == "optimizer state":
            for part, size in plan.per_rank_parts().items():
                lines.append(f"    {part:<20}{format_bytes(size):>12}")
    lines.append(f"  {'total':<22}{format_bytes(plan.total()):>12}")
    if measured and "cuda_peak_allocated_bytes" in measured:
        lines.append(f"  {'CUDA peak (measured)':<22}{format_bytes(measured['cuda_peak_allocated_bytes']):>12}")
    for verdict in verdicts:
        lines.append(f"  {verdict.label}: {'fits' if verdict.fits else 'does not fit'} "
                     f"({format_bytes(verdict.size - plan.total())} left before the CUDA context)")
        if verdict.search is not None:
            lines += _format_search(verdict, plan.world_size, zero_flag, max_world_size)
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _format_search(verdict: Verdict, world_size: int, zero_flag: Optional[int],
                   max_world_size: Optional[int]) -> list[str]:
    from lowmem.memory.report import format_bytes

    search, most = verdict.search, max_world_size or world_size
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    scope = (f"{search.tried} settings tried{' (the cap)' if search.capped else ''} "
             + (f"on up to {most} ranks, as --max-world-size allows" if most > world_size
                else f"on {ranks}; --max-world-size N allows more"))
    if not search.suggestions:
        return [f"    nothing the planner may change fits {verdict.label} ({scope});",
                "    it needs a smaller model (model.preset), fewer trained weights (model.lora, model.freeze) "
                "or more ranks"]
    lines = [f"    what fits {verdict.label}, the model unchanged ({scope}),",
             "    fewest changes first, each with its total and what to add to the command:"]
    for i, suggestion in enumerate(search.suggestions, 1):
        overrides, flags = command_additions(suggestion, world_size, zero_flag)
        lines.append(f"      {i}. {format_bytes(suggestion.total):>10}  {suggestion.changes[0]}")
        lines += [f"         {'':>10}  {change}" for change in suggestion.changes[1:]]
        lines.append(f"         {'':>10}  + {' '.join(overrides + flags)}")
    return lines


def measured_json(measured: dict[str, int]) -> dict[str, int]:
    """One counted update under the keys the predicted section uses."""
    keys = {"params_bytes": "parameters_bytes", "grads_bytes": "gradients_bytes",
            "optimizer_state_bytes": "optimizer_state_bytes", "activations_bytes": "activations_bytes",
            "cuda_peak_allocated_bytes": "cuda_peak_allocated_bytes"}
    return {keys[k]: v for k, v in measured.items() if k in keys}


def plan_json(plan: MemoryPlan, verdicts: list[Verdict], measured: dict[str, int] | None,
              zero_flag: Optional[int] = None) -> dict:
    out = {"assumptions": plan.assumptions, "predicted": plan.predicted()}
    if measured:
        out["measured"] = measured_json(measured)
    out["gpus"] = {}
    for v in verdicts:
        entry = {"budget_bytes": v.size, "fits": v.fits, "left_bytes": v.size - plan.total(), "suggestions": []}
        if v.search is not None:
            entry["settings_tried"] = v.search.tried
            for suggestion in v.search.suggestions:
                overrides, flags = command_additions(suggestion, plan.world_size, zero_flag)
                entry["suggestions"].append({"changes": suggestion.changes, "overrides": overrides, "flags": flags,
                                             "world_size": suggestion.world_size, "total_bytes": suggestion.total,
                                             "left_bytes": v.size - suggestion.total})
        out["gpus"][v.label] = entry
    out["notes"] = plan.notes
    return out


def planner_for(files: list[str], overrides: list[str], zero_flag: Optional[int]):
    """plan_of(extra overrides, world size) for the search: the config loaded and validated as training loads
    it (the command's files and overrides, --zero-stage, then the extra overrides), planned on the meta
    device; None when the config path refuses it. Plans are cached."""
    cache: dict = {}

    def plan_of(extra: tuple[str, ...], world_size: int) -> Optional[MemoryPlan]:
        key = (extra, world_size)
        if key not in cache:
            try:
                tree = load_tree(files, overrides)
                if zero_flag is not None:
                    tree = with_zero_stage(tree, zero_flag)
                for override in extra:
                    tree = apply_override(tree, override)
                config = config_from_tree(tree, world_size)
                cache[key] = plan_memory(config, world_size, zero_stage_of(config))
            except ConfigError:
                cache[key] = None
        return cache[key]

    return plan_of


def with_zero_stage(tree: dict, stage: int) -> dict:
    """The config tree planned under DeepSpeed ZeRO `stage` (--zero-stage); a config that says otherwise is
    refused, naming both, rather than planned as something it would not train as."""
    flat = flatten(tree)
    given, backend = flat.get("distributed.zero_stage"), flat.get("distributed.backend", "auto")
    if given is not None and given != stage:
        raise ConfigError(f"--zero-stage {stage} conflicts with distributed.zero_stage={given}; give one of them "
                          f"(the plan is for the config as it trains)")
    if backend in ("ddp", "none"):
        if stage == 0:  # plain data parallel holds what stage 0 holds
            return tree
        raise ConfigError(f"--zero-stage {stage} conflicts with distributed.backend={backend}; set "
                          f"distributed.backend=deepspeed (or auto) to plan ZeRO")
    return deep_merge(tree, {"distributed": {"backend": "deepspeed", "zero_stage": stage}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowmem.memory", description=__doc__.split("\n\n")[0].replace(
        "\n", " "))
    parser.add_argument("config", help="the training config's YAML file, as train.py takes it")
    parser.add_argument("more", nargs="*", metavar="ARG",
                        help="more YAML files merged in order, then dotted.key=value overrides, as train.py takes them")
    parser.add_argument("--gpu", default="", help="GPU sizes to check, comma-separated (24GB,80GB); for a size the "
                                                  "plan does not fit, the planner lists the settings that would fit")
    parser.add_argument("--world-size", type=int, default=1, help="ranks to plan for (each GPU holds one)")
    parser.add_argument("--max-world-size", type=int, default=None,
                        help="let the suggestions use up to this many ranks (with ZeRO); default: --world-size")
    parser.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                        help="plan DeepSpeed ZeRO at this stage (distributed.backend=deepspeed, "
                             "distributed.zero_stage); default: what the config trains with")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--measure", action="store_true", help="also run one real update and count its bytes")
    args = parser.parse_args(argv)
    try:
        if args.world_size < 1:
            raise ConfigError(f"--world-size: must be at least 1, got {args.world_size}")
        most = args.world_size if args.max_world_size is None else args.max_world_size
        if most < args.world_size:
            raise ConfigError(f"--max-world-size: {most} is below --world-size {args.world_size}")
        sizes = [(text.strip(), parse_gpu_size(text)) for text in args.gpu.split(",") if text.strip()]
        files = [args.config] + [a for a in args.more if "=" not in a]
        overrides = [a for a in args.more if "=" in a]
        tree = load_tree(files, overrides)
        if args.zero_stage is not None:
            tree = with_zero_stage(tree, args.zero_stage)
        # the validation train.py runs, for the ranks planned: what it refuses is refused here
        config = config_from_tree(tree, args.world_size)
        plan = plan_memory(config, args.world_size, zero_stage_of(config))
        verdicts = [Verdict(label, size, plan.total() <= size) for label, size in sizes]
        if any(not v.fits for v in verdicts):
            plan_of = planner_for(files, overrides, args.zero_stage)
            knob_list = knobs(config, plan.assumptions, args.world_size, most)
            for v in verdicts:
                if not v.fits:
                    v.search = search(knob_list, plan_of, args.world_size, v.size)
        measured = measure_one_update(config) if args.measure else None
    except ConfigError as err:
        log.warning(f"config error: {err}")
        return 2
    if args.json:
        print(json.dumps(plan_json(plan, verdicts, measured, args.zero_stage), indent=2))
    else:
        print(format_plan(plan, verdicts, measured, args.zero_stage, most))
    return 0
