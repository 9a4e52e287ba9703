"""The memory planner: what a training config will hold on each GPU, predicted on the meta device (no weight
is allocated, so a laptop can ask about llama_7b in seconds), optionally checked by one real update.

    python -m lowmem.memory CONFIG.yaml [MORE.yaml ...] [dotted.key=value ...] [--gpu 24GB,80GB] [--json]
        [--world-size N] [--zero-stage 0-3] [--measure]

The config is validated as `train.py` validates it on N ranks (lowmem.config.validate: launcher flags, the
DeepSpeed JSON, ZeRO-3's element-wise optimizers), so the planner accepts and refuses exactly what training
does; --zero-stage S plans distributed.backend=deepspeed with distributed.zero_stage=S and must agree with them.

Rows: parameters (in the training dtype), gradients (one at a time for weights stepped in backward, the
largest counted, but all of them with train.grad_accum > 1: accumulation sums into every gradient before the
last micro-batch steps them), optimizer state by part (projector bases, moments in their storage dtype,
quantization scales, windows, ...; each optimizer's own formula, equal to the counted bytes after the first
update), activations saved for backward (lowmem.memory.activations: traced on the meta device, with checkpointing
applied), and their total per rank. Under ZeRO the states, gradients and parameters are divided by the
ranks as its stages do (Rajbhandari et al.: stage 1 shards the optimizer state, 2 the gradients too, 3 the
parameters too); a matrix's optimizer state is never split (each matrix has one owner rank), so the state
of a rank may exceed S/N by at most the largest single weight's state, which the plan adds.

Not counted: the CUDA context and allocator fragmentation (about 0.5-1 GB on a GPU), communication buckets,
and the transient gradient of the logits during backward.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from lowmem.config.files import load_tree
from lowmem.config.schema import deep_merge, flatten
from lowmem.distributed.deepspeed_settings import check_zero3_optimizer, grad_accum_for, zero_stage_of
from lowmem.errors import ConfigError
from lowmem.memory.plan import MemoryPlan
from lowmem.train.config import Config, config_from_tree

GPU_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GIB|G|MB|MIB|M|TB|TIB|T)?\s*$", re.IGNORECASE)
UNIT_BYTES = {"": 2**30, "G": 2**30, "GB": 2**30, "GIB": 2**30, "M": 2**20, "MB": 2**20, "MIB": 2**20,
              "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_gpu_size(text: str) -> int:
    """Bytes of a GPU size such as '24GB' or '80GiB' (GPU makers' GB are GiB: a 24GB card has 24 GiB)."""
    match = GPU_SIZE.match(text)
    if not match:
        raise ConfigError(f"--gpu: cannot read '{text}' as a memory size; write it like 24GB, 80GB or 40GiB")
    return int(float(match.group(1)) * UNIT_BYTES[(match.group(2) or "").upper()])


def _vocab_size(config: Config, notes: list[str]) -> int | None:
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


def plan_memory(config: Config, world_size: int = 1, zero_stage: int = 0) -> MemoryPlan:
    """Predict a run's memory per rank from its config, on the meta device."""
    from lowmem.memory.activations import saved_activation_bytes
    from lowmem.model.build import build_meta_model, prepare_for_training, weight_dtype
    from lowmem.optim import build_optimizer

    notes: list[str] = []
    model = build_meta_model(config.model, _vocab_size(config, notes)).to(weight_dtype(config.model,
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
    return MemoryPlan(sum(p.numel() * p.element_size() for p in params), gradients, parts, activations,
                      world_size, zero_stage, largest, notes)


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
    vocab = _vocab_size(config, []) or 32000
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


def format_plan(plan: MemoryPlan, gpu_sizes: list[tuple[str, int]], measured: dict[str, int] | None) -> str:
    from lowmem.memory.report import format_bytes

    rows = plan.per_rank()
    lines = [f"memory per rank ({plan.world_size} rank{'s' if plan.world_size > 1 else ''}, "
             f"ZeRO stage {plan.zero_stage}):"]
    counted = {"parameters": "params_bytes", "gradients": "grads_bytes", "optimizer state": "optimizer_state_bytes",
               "activations": "activations_bytes"}
    for name, value in rows.items():
        extra = ""
        if measured and counted[name] in measured:
            extra = f"   counted {format_bytes(measured[counted[name]])}"
        lines.append(f"  {name:<22}{format_bytes(value):>12}{extra}")
        if name == "optimizer state":
            for part, size in plan.optimizer_parts.items():
                lines.append(f"    {part:<20}{format_bytes(size):>12}  (all ranks)")
    lines.append(f"  {'total':<22}{format_bytes(plan.total()):>12}")
    if measured and "cuda_peak_allocated_bytes" in measured:
        lines.append(f"  {'CUDA peak (measured)':<22}{format_bytes(measured['cuda_peak_allocated_bytes']):>12}")
    for label, size in gpu_sizes:
        verdict = "fits" if plan.total() <= size else "does not fit"
        lines.append(f"  {label}: {verdict} ({format_bytes(size - plan.total())} left before the CUDA context)")
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


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
    parser = argparse.ArgumentParser(prog="python -m lowmem.memory", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("more", nargs="*", metavar="ARG", help="more YAML files, then dotted.key=value overrides")
    parser.add_argument("--gpu", default="", help="GPU sizes to check, comma-separated (24GB,80GB)")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                        help="plan DeepSpeed ZeRO at this stage (distributed.backend=deepspeed, "
                             "distributed.zero_stage); default: what the config trains with")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--measure", action="store_true", help="also run one real update and count its bytes")
    args = parser.parse_args(argv)
    try:
        if args.world_size < 1:
            raise ConfigError(f"--world-size: must be at least 1, got {args.world_size}")
        sizes = [(text.strip(), parse_gpu_size(text)) for text in args.gpu.split(",") if text.strip()]
        tree = load_tree([args.config] + [a for a in args.more if "=" not in a], [a for a in args.more if "=" in a])
        if args.zero_stage is not None:
            tree = with_zero_stage(tree, args.zero_stage)
        # the validation train.py runs, for the ranks planned: what it refuses is refused here
        config = config_from_tree(tree, args.world_size)
        plan = plan_memory(config, args.world_size, zero_stage_of(config))
        measured = measure_one_update(config) if args.measure else None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = plan.as_dict()
        out["fits"] = {label: plan.total() <= size for label, size in sizes}
        if measured:
            out["measured"] = measured
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan, sizes, measured))
    return 0
