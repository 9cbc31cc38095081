"""The DeepSpeed backend: a plan's data parallelism, ZeRO stage and offload run through
``deepspeed.initialize`` (Rajbhandari et al. SC'20 ZeRO; Ren et al. ATC'21 ZeRO-Offload).

``wrap(model, plan, backend="deepspeed")`` returns the model itself, now also a
:class:`DeepSpeedModule`; ``model.optimizer(torch.optim.AdamW, lr=...)`` builds the torch
optimizer and the DeepSpeed engine around both (DeepSpeed needs the optimizer to partition).
Plan fields map to the DeepSpeed config by :func:`deepspeed_config`:

- ``zero`` -> ``zero_optimization.stage``;
- ``offload`` -> ``offload_optimizer`` on the CPU (ZeRO 1-3) and, with ZeRO-3, ``offload_param``;
  the optimizer stays the torch one (``zero_force_ds_cpu_optimizer: false``), so nothing compiles;
- ``global_batch_size`` / ``num_micro_batches`` -> ``train_batch_size``,
  ``gradient_accumulation_steps`` and ``train_micro_batch_size_per_gpu``;
- ``dtype`` bf16 / fp16 -> DeepSpeed's ``bf16`` / ``fp16`` modes (16-bit parameters with fp32
  master copies in the optimizer; the native runtime instead autocasts fp32 parameters);
- no gradient clipping (DeepSpeed's default clips at norm 1.0; clip in the loop if wanted);
- ``recompute`` -> the native per-block recomputation (``torch.utils.checkpoint``) before the engine.

Everything else (TP, SP, CP, EP, pipelines, fp8) is refused by :func:`galvatron.backends.check_plan`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galvatron.backends import auto_search_options, check_plan
from galvatron.errors import GalvatronError, PlanError
from galvatron.plan import DType, Plan
from galvatron.runtime.apply import (
    DEFAULT_TIMEOUT,
    _call_args,
    _micro_batches,
    describe,
    init_distributed,
    resolve_plan,
)
from galvatron.runtime.recompute import apply_recompute
from galvatron.runtime.relayout import first_batch_size, map_tensors

_STEPS_PER_PRINT = 2**31 - 1  # keep DeepSpeed's per-step log lines out of the user's output


def deepspeed_config(plan: Plan, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config that runs ``plan`` on ``world_size`` data-parallel ranks (a plan the
    deepspeed backend accepts; see :func:`galvatron.backends.check_plan`)."""
    s = plan.embedding_strategy
    replicas = world_size * plan.num_micro_batches
    if plan.global_batch_size % replicas:
        raise PlanError("global_batch_size", f"{plan.global_batch_size} does not split into {world_size} ranks x "
                        f"{plan.num_micro_batches} micro-batches")
    if s.offload and s.zero == 0:
        raise PlanError(f"{_path(plan)}.offload", "DeepSpeed offloads ZeRO partitions: offload needs zero >= 1")
    zero: dict[str, Any] = {"stage": s.zero}
    if s.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if s.zero == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.global_batch_size // replicas,
        "gradient_accumulation_steps": plan.num_micro_batches,
        "zero_optimization": zero,
        "gradient_clipping": 0.0,  # DeepSpeed clips at norm 1.0 unless told; a plan does not clip
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _STEPS_PER_PRINT,
    }
    if plan.dtype is DType.BF16:
        config["bf16"] = {"enabled": True}
    elif plan.dtype is DType.FP16:
        config["fp16"] = {"enabled": True}
    return config


def _path(plan: Plan) -> str:
    stage = plan.stages[0].groups[0]
    return f"stages[0].layers[{stage.start}:{stage.end}]"


def import_deepspeed(device: torch.device) -> Any:
    """``deepspeed``, with its shared-memory communication op disabled on CPU (its first use would
    compile it for minutes; gloo serves instead)."""
    try:
        import deepspeed
    except ImportError as err:
        raise GalvatronError(f"the deepspeed backend needs DeepSpeed: pip install 'galvatron[deepspeed]' ({err})"
                             ) from err
    if device.type == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def wrap_deepspeed(model: nn.Module, plan: Plan | str | Path | None = "auto", *, example_batch: Any = None,
                   tp_plan: Mapping[str, str] | None = None, search_options: Any = None,
                   timeout: timedelta = DEFAULT_TIMEOUT) -> nn.Module:
    """``galvatron.wrap(model, plan, backend="deepspeed")``: check the plan, recompute where it says,
    and make ``model`` a :class:`DeepSpeedModule` (the engine starts in ``model.optimizer(...)``)."""
    if isinstance(model, DeepSpeedModule):
        raise GalvatronError("this model is already wrapped by galvatron.wrap; wrap the original model once")
    if tp_plan is not None:
        raise GalvatronError("tp_plan= has no effect under the deepspeed backend (it runs no tensor parallelism)")
    device = init_distributed(timeout)
    spec = describe(model, example_batch)
    if search_options is None and not isinstance(plan, Plan) and (plan is None or str(plan) == "auto"):
        search_options = auto_search_options("deepspeed", example_batch)
    plan = resolve_plan(plan, model, spec, example_batch, search_options, backend="deepspeed")
    world = dist.get_world_size()
    plan.validate(world, spec)
    check_plan(plan, "deepspeed")
    config = deepspeed_config(plan, world)
    import_deepspeed(device)
    blocks = model.get_submodule(spec.block_path)
    for g in plan.groups():
        for i in range(g.start, g.end):
            apply_recompute(blocks[i], g.strategy.recompute)
    model.to(device)
    model.__class__ = type(f"DeepSpeed{type(model).__name__}", (DeepSpeedModule, type(model)), {})
    model._galvatron_ds = _State(plan, config, device)
    return model


class _State:
    """What a DeepSpeed-wrapped model carries besides its own attributes."""

    def __init__(self, plan: Plan, config: dict[str, Any], device: torch.device) -> None:
        self.plan, self.config, self.device = plan, config, device
        self.engine: Any = None
        self.inside_engine = False


class DeepSpeedModule(nn.Module):
    """Added to a model's class by ``wrap(..., backend="deepspeed")``: the native
    ``GalvatronModule`` API (``plan``, ``optimizer``, ``train_step``, ``shard_batch``, ``dp_size``,
    ``dp_rank``) on a DeepSpeed engine. Differences: call ``optimizer(...)`` once before the first
    forward (it starts the engine); gradients live in DeepSpeed's partitions, not in ``.grad``;
    ``opt.zero_grad()`` is a no-op (the engine clears gradients in ``opt.step()``); under ZeRO-3
    ``parameters()`` are DeepSpeed's partitions (:meth:`full_state_dict` gathers them)."""

    _galvatron_ds: _State

    @property
    def plan(self) -> Plan:
        """The plan this model runs."""
        return self._galvatron_ds.plan

    @property
    def engine(self) -> Any:
        """The ``deepspeed.DeepSpeedEngine`` (None until :meth:`optimizer` is called)."""
        return self._galvatron_ds.engine

    @property
    def dp_size(self) -> int:
        """Number of data shards a step's batch is split into: every rank holds one."""
        return dist.get_world_size()

    @property
    def dp_rank(self) -> int:
        """Which data shard this rank consumes."""
        return dist.get_rank()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self._galvatron_ds
        if state.engine is None or state.inside_engine:
            return super().forward(*args, **kwargs)
        state.inside_engine = True
        try:
            return state.engine(*args, **kwargs)
        finally:
            state.inside_engine = False

    def shard_batch(self, batch: Any) -> Any:
        """This rank's data shard of a global batch (tensors split along dim 0)."""
        n = first_batch_size((batch,), {})
        if n % self.dp_size:
            raise ValueError(f"a batch of {n} does not split into {self.dp_size} data shards")
        return map_tensors(batch, lambda t: t.chunk(self.dp_size)[self.dp_rank], n)

    def optimizer(self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                  **kwargs: Any) -> DeepSpeedOptimizer:
        """Build ``optimizer_cls(self.parameters(), **kwargs)`` and the DeepSpeed engine around it
        and this model; return the optimizer to step (once, before any forward)."""
        state = self._galvatron_ds
        if state.engine is not None:
            raise GalvatronError("the DeepSpeed engine exists already: call model.optimizer(...) once")
        deepspeed = import_deepspeed(state.device)
        base = optimizer_cls(self.parameters(), **kwargs)
        state.engine, _, _, _ = deepspeed.initialize(model=self, optimizer=base, config=state.config)
        return DeepSpeedOptimizer(state.engine)

    def train_step(self, batch: tuple[Any, torch.Tensor], loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
                   ) -> torch.Tensor:
        """Forward and backward of one optimizer step on this rank's data shard, in
        ``plan.num_micro_batches`` micro-batches; returns the mean loss over all ranks. Call
        ``optimizer.step()`` once after it."""
        engine = self._engine()
        inputs, targets = map_tensors(tuple(batch), lambda t: t.to(self._galvatron_ds.device))
        n = self.plan.num_micro_batches
        total = torch.zeros((), device=self._galvatron_ds.device)
        pairs = zip(_micro_batches(inputs, n), _micro_batches(targets, n), strict=True)
        for i, (x, y) in enumerate(pairs):
            args, kwargs = _call_args(x)
            loss = loss_fn(self(*args, **kwargs), y)
            engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            if i < n - 1:
                engine.step()  # inside the accumulation window: only counts the micro-batch
            total += loss.detach().float() / n
        dist.all_reduce(total)
        return total / dist.get_world_size()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full parameters by name as CPU tensors on every rank (gathers ZeRO-3 partitions)."""
        import deepspeed

        params = list(self.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in self.named_parameters(remove_duplicate=False)}

    def _engine(self) -> Any:
        if self._galvatron_ds.engine is None:
            raise GalvatronError("call model.optimizer(...) before training: the DeepSpeed engine is built around "
                                 "the optimizer")
        return self._galvatron_ds.engine


class DeepSpeedOptimizer:
    """The optimizer a DeepSpeed-wrapped model hands out: ``step()`` ends the accumulation window
    through the engine (reduce, clip, step, clear gradients); ``zero_grad()`` does nothing."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.engine.optimizer.state

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the engine clears gradients at the end of ``step()``."""
