"""How the trainer's gradients are made and its optimizer stepped: on one process, under DDP, or under DeepSpeed.

The trainer calls the same methods whatever the backend (registry `RUNTIMES`); each runtime owns what differs:
wrapping the model, scaling and reducing the loss, the optimizer step (with clipping), the reductions the loop
needs (token counts, losses, eval sums, a stop flag), and the optimizer state in the checkpoint's by-name
format (lowmem.optim.named_state), consolidated on rank 0 under ZeRO and re-sharded on load.

The loss of an update is the mean over every target token of the global window (all ranks, all micro-batches):
each rank divides its summed token losses by the global token count; DDP and DeepSpeed average the gradients
over the ranks, so each rank scales its loss by the world size to make that average the global mean.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from lowmem.distributed.deepspeed_settings import check_zero3_optimizer, deepspeed_config, grad_accum_for
from lowmem.distributed.launch import DistContext
from lowmem.library_output import deepspeed_untested_note
from lowmem.optim.named_state import load_named_state_dict, named_state_dict

if TYPE_CHECKING:
    from lowmem.train.config import Config


class Runtime:
    """One process: the model and optimizer as built."""

    def __init__(self, ctx: DistContext, config: Config):
        self.ctx = ctx
        self.config = config
        self.model: Optional[nn.Module] = None  # what the trainer runs forward through
        self.module: Optional[nn.Module] = None  # the plain model (save_pretrained, parameters)
        self.optimizer: Optional[torch.optim.Optimizer] = None  # what the schedule drives
        self.rules: Optional[torch.optim.Optimizer] = None  # the optimizer lowmem built (its formulas, its rules)

    @property
    def world(self) -> int:
        return self.ctx.world_size

    def grad_accum(self) -> int:
        """Micro-batches per update on this rank (train.global_batch_size divided over the ranks when set)."""
        return grad_accum_for(self.config, self.world)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = self.module = model
        self.optimizer = self.rules = optimizer

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward (DDP: no gradient reduction but on the last)."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.world).backward()

    def step(self, clip: float) -> Optional[float]:
        """Average (where the backend does not), clip and step; the gradient norm (no step when it is not
        finite)."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip or float("inf")))
        if math.isfinite(norm):
            self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def gather(self, value: Any) -> Optional[list]:
        """Every rank's `value` on rank 0, in rank order (None elsewhere)."""
        if self.world == 1:
            return [value]
        out: Optional[list] = [None] * self.world if self.ctx.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64 on CPU)."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.sum(float(flag))[0])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def optimizer_state(self) -> Optional[dict]:
        """The optimizer state by parameter name, on rank 0 (None elsewhere); every rank must call it."""
        return named_state_dict(self.optimizer, self.module) if self.ctx.is_main else None

    def load_optimizer_state(self, saved: dict) -> None:
        load_named_state_dict(self.optimizer, self.module, saved)

    def state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """This rank's optimizer state tensors, named, for the finiteness check before a checkpoint."""
        names = {p: name for name, p in self.module.named_parameters()}
        return [(f"optimizer state '{key}' of {names.get(p, 'a weight')}", value)
                for p, state in self.optimizer.state.items() for key, value in state.items()
                if isinstance(value, torch.Tensor)]

    def optimizer_state_bytes(self) -> int:
        from lowmem.optim.registry import optimizer_state_bytes

        return optimizer_state_bytes(self.optimizer)

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Every weight whole on this rank while inside (every rank must enter): for writing the HF model."""
        return contextlib.nullcontext()

    def memory_extra(self) -> dict[str, int]:
        """Bytes the backend holds beyond params, grads and optimizer state (DeepSpeed's fp32 partition)."""
        return {}


class DDPRuntime(Runtime):
    """torch DistributedDataParallel (gradient_sync full), or lowmem's own reduction of R = P^T G (projected)."""

    def prepare(self, model, optimizer):
        super().prepare(model, optimizer)
        self.sync = None
        if self.config.distributed.gradient_sync == "projected":
            from lowmem.distributed.gradient_sync import GradientSync

            self.sync = GradientSync(optimizer, "projected")
            for p in model.parameters():  # every rank starts from rank 0's weights
                dist.broadcast(p.data, src=0)
        else:
            device_ids = [model.device.index] if model.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    @contextlib.contextmanager
    def micro_batch(self, last):
        with contextlib.nullcontext() if last or self.sync is not None else self.model.no_sync():
            yield

    def step(self, clip):
        if self.sync is not None:
            self.sync.sync(self.module.parameters())
        return super().step(clip)


class DeepSpeedRuntime(Runtime):
    """DeepSpeed ZeRO: lowmem's optimizer runs inside DeepSpeed's step (lowmem.distributed.zero), which
    reduces, clips and shards; the optimizer state is consolidated by name on rank 0 for checkpoints.
    Under ZeRO-3 (element-wise AdamW only) DeepSpeed steps torch AdamW on its flat partitions directly; the
    state is consolidated through deepspeed.utils' full-state accessors and the weights gathered to save."""

    def prepare(self, model, optimizer):
        import deepspeed

        from lowmem.distributed.zero import ZeroShardedOptimizer

        config = self.deepspeed_config()
        stage = config["zero_optimization"]["stage"]
        check_zero3_optimizer(self.config, optimizer, stage)  # also checked on the options at config validation
        # element-wise torch AdamW under ZeRO-3: DeepSpeed's flat partitions are as good as the weights
        client = optimizer if stage == 3 else ZeroShardedOptimizer(model, optimizer)
        self.stage = stage
        with deepspeed_untested_note(self.ctx.is_main):
            engine, client_opt, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
        self.engine = engine
        self.model = engine
        self.module = model
        self.optimizer = client
        self.rules = optimizer
        self.zero = client if isinstance(client, ZeroShardedOptimizer) else None

    def deepspeed_config(self) -> dict:
        """DeepSpeed's settings from lowmem's config, the user's JSON (distributed.deepspeed_config) merged over
        them; config validation judged that JSON and refused whatever disagrees (deepspeed_settings)."""
        return deepspeed_config(self.config, self.world)

    @contextlib.contextmanager
    def micro_batch(self, last):
        yield

    def backward(self, loss):
        # the loss is already the mean over the global window: no division by the accumulation steps
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()  # steps the optimizer only at the end of an accumulation window

    def step(self, clip):
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def zero_grad(self):
        pass  # DeepSpeed zeroes its gradients in its own step

    def optimizer_state(self):
        if self.zero is not None:
            return self.zero.consolidated_state()
        return self._zero3_state()

    def load_optimizer_state(self, saved):
        if self.zero is not None:
            self.zero.load_consolidated_state(saved)
        else:
            self._load_zero3_state(saved)

    def full_weights(self):
        import deepspeed

        if self.stage != 3:
            return contextlib.nullcontext()
        # ZeRO-3 keeps 1/N of each weight per rank: gather them (every rank enters) for the HF model on rank 0
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def _zero3_state(self) -> Optional[dict]:
        """ZeRO-3's flat AdamW partitions consolidated into the by-name format of one process (collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        flat = [s for s in self.engine.optimizer.optimizer.state.values() if s]
        keys = sorted(k for k in (flat[0] if flat else {}) if k != "step")
        step = flat[0]["step"] if flat else None
        by_name = {}
        for name, p in self.module.named_parameters():
            if p.requires_grad and flat:
                by_name[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in keys}
                by_name[name]["step"] = step.detach().clone() if isinstance(step, torch.Tensor) else step
        if not self.ctx.is_main:
            return None
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"by_name": by_name, "groups": groups}

    def _load_zero3_state(self, saved: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        inner = self.engine.optimizer.optimizer  # torch AdamW over DeepSpeed's flat fp32 partitions
        keys = {k for state in saved["by_name"].values() for k in state if k != "step"}
        # AdamW creates its state at the first step: make it now, on the flat partitions DeepSpeed hands it then
        for flat_param in self.engine.optimizer.fp32_partitioned_groups_flat:
            inner.state[flat_param] = {k: torch.zeros_like(flat_param) for k in keys}
        flat = list(inner.state.values())
        for name, p in self.module.named_parameters():
            for key, value in saved["by_name"].get(name, {}).items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value.to(torch.float32), key)
        step = next((s["step"] for s in saved["by_name"].values() if "step" in s), None)
        for state in flat:  # one step count per flat partition, as torch AdamW keeps one per weight
            if step is not None:
                state["step"] = step.clone() if isinstance(step, torch.Tensor) else step
        for group, hyper in zip(self.optimizer.param_groups, saved["groups"]):
            group.update({k: v for k, v in hyper.items() if k in group and k != "params"})

    def state_tensors(self):
        if self.zero is None:
            return super().state_tensors()
        found = []
        for holder in (self.zero.owned, self.zero.shards):
            for key, state in holder.items():
                found += [(f"optimizer state '{k}' of {key}", v) for k, v in state.items() if isinstance(v, torch.Tensor)]
        return found

    def optimizer_state_bytes(self):
        return self.zero.local_state_bytes() if self.zero is not None else super().optimizer_state_bytes()

    def memory_extra(self):
        fp32 = getattr(self.engine.optimizer, "single_partition_of_fp32_groups", None) or []
        return {"deepspeed_fp32_partition_bytes": sum(t.numel() * t.element_size() for t in fp32)}


RUNTIMES: dict[str, type[Runtime]] = {"none": Runtime, "ddp": DDPRuntime, "deepspeed": DeepSpeedRuntime}
