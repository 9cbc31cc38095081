"""Runtime adaptation: switch a running job to a new plan through a checkpoint.

Within a run, a *phase change* (longer sequences, a larger global batch) calls :func:`replan` on
every rank: it checkpoints the model and optimizer, finds the plan for the new phase (the search
on rank 0, broadcast to the others, or a plan given), builds the model afresh under it and loads
the checkpoint, which reshards every parameter and optimizer state to the new layout::

    model, optimizer = adapt.replan(model, optimizer, Phase(seq_len=8192), step=step,
                                    model_fn=lambda: GPT(cfg8k), checkpoint_dir=ckpt)[:2]

A *worker-count change* needs new processes, so it goes through the launcher: the Ray launcher
restarts lost workers, or continues with fewer (``--min-workers``) under a re-searched plan;
or the job is relaunched with another ``--workers`` and the same ``--checkpoint-dir``. Either
way the training script resumes with :meth:`Checkpointer.resume`, which loads under the new
plan and world size.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from galvatron.launch import checkpoints
from galvatron.launch.launcher import CPU_FIXED, PlanChoice, local_cpu_cluster, search_plan
from torch import nn

from galvatron import wrap
from galvatron.errors import GalvatronError
from galvatron.plan import Plan
from galvatron.spec import ModelSpec


@dataclass(frozen=True, kw_only=True)
class Phase:
    """The workload a plan is chosen for; None keeps the current value."""

    seq_len: int | None = None
    global_batch: int | None = None


@dataclass(frozen=True)
class Replanned:
    """The model and optimizer under the new plan, the plan, and the checkpoint they came through."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    choice: PlanChoice
    checkpoint: Path


def replan(model: nn.Module, optimizer: torch.optim.Optimizer, phase: Phase | None = None, *, step: int,
           model_fn: Callable[[], nn.Module], checkpoint_dir: str | Path, plan: Plan | None = None,
           spec: ModelSpec | None = None, cluster: object = None, exclude: Sequence[str] = (),
           optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer] | None = None) -> Replanned:
    """Move training to the plan for ``phase`` (or to ``plan``) through a checkpoint; every rank calls it.

    ``checkpoint_dir`` is one folder for all ranks (shared storage on several nodes). ``model_fn``
    builds the unwrapped model for the new phase with the same parameter names and shapes (its
    weights are replaced by the checkpoint: size position tables for the longest phase);
    ``optimizer_fn`` the optimizer for the new model (default: the old optimizer's class and
    hyper-parameters). Without ``plan`` the search runs on rank 0 for ``spec`` (the model's
    :class:`ModelSpec`) with the phase applied, on ``cluster`` (default: this machine's CPU
    workers), without the ``exclude`` capabilities (search capability names, e.g. ``("zero1",)``),
    and its plan is sent to every rank. Every plan's checkpoints reshard, ZeRO-1 optimizer state
    included. The old model and optimizer must not be used after.
    """
    world = dist.get_world_size()
    current_batch = model.plan.global_batch_size
    optimizer_fn = optimizer_fn or _same_optimizer(optimizer)
    path = checkpoints.save(checkpoint_dir, step, model, optimizer)
    if plan is not None:
        choice = PlanChoice(plan=plan, source="given")
    else:
        choice = on_rank0(lambda: _search(spec, phase or Phase(), world, cluster, current_batch, exclude))
    choice.plan.validate(world)
    new_model = wrap(model_fn(), plan=choice.plan)
    new_optimizer = optimizer_fn(new_model)
    checkpoints.load(path, new_model, new_optimizer)
    return Replanned(new_model, new_optimizer, choice, path)


def _same_optimizer(optimizer: torch.optim.Optimizer) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """A factory of optimizers like ``optimizer`` (its torch class, its defaults) for another model."""
    cls = next(c for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim"))
    accepted = inspect.signature(cls).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return lambda model: model.optimizer(cls, **defaults)


def _search(spec: ModelSpec | None, phase: Phase, world: int, cluster: object, batch: int | None,
            exclude: Sequence[str]) -> PlanChoice:
    if spec is None:
        raise GalvatronError("replan without a plan searches one and needs spec= (the model's ModelSpec)")
    if phase.seq_len is not None:
        spec = dataclasses.replace(spec, seq_len=phase.seq_len)
    target = {"cluster": cluster} if cluster is not None else {"cluster": local_cpu_cluster(world), "fixed": CPU_FIXED}
    return search_plan(spec, world, global_batch=phase.global_batch or batch, exclude=exclude, **target)


def on_rank0(fn: Callable[[], PlanChoice]) -> PlanChoice:
    """``fn()`` (a search: measurements differ between ranks) run on rank 0 and sent to every rank, so
    all run one plan; a :class:`GalvatronError` on rank 0 is raised on every rank."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except GalvatronError as err:
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], GalvatronError):
        raise box[0]
    return box[0]
