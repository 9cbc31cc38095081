"""Pipeline parallelism for unmodified models, on ``torch.distributed.pipelining``.

:func:`split_stages` cuts a user's model into this device group's chunks, one per virtual stage,
without copying a weight and without tracing: a chunk runs the user's own ``forward`` with the
block list (``block_path``) narrowed to the chunk's layers for the duration of the call.

- Chunks after the first receive the hidden state; the prefix the model computes from its
  inputs (position ids, masks, rotary tables) is recomputed on every stage from the model inputs,
  which every stage is given. Embeddings are replaced there by zeros of the right shape, and the
  first block in range gets the received hidden state instead.
- Chunks before the last stop the model's ``forward`` at the block after their range and return
  the hidden state it would have received: one tensor travels between stages.
- The last chunk runs on through the final norm and head and returns the logits.

Which modules are the "prefix" (embedding: first stage only) and the "suffix" (final norm and
head: last stage only) is read from the registration order: the parameter-holding modules outside
the block list registered before it are the prefix, those after it the suffix. Parameter-free
modules (rotary embeddings, dropout) stay on every stage. Modules this rank does not hold are
replaced in the user's model by placeholders that raise if run, so their weights are freed.

A weight shared by prefix and suffix (tied input/output embeddings) is held by both the first and
the last stage; :class:`PipelineRunner` adds their gradients after each step, so both copies take
the same optimizer update.

:class:`PipelineRunner` runs one optimizer step's forward and backward with the plan's schedule
(GPipe, 1F1B, interleaved 1F1B of Narayanan et al. SC'21, interleaved zero bubble of
Qi et al. ICLR'24).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from galvatron.errors import PlanError
from galvatron.plan import Plan, Schedule

__all__ = ["PipelineRunner", "StageChunk", "split_stages"]

_ARG = "_pp_arg"
"""Key prefix under which positional model inputs travel as schedule keyword arguments."""

_SCHEDULES = {
    Schedule.GPIPE: ScheduleGPipe,
    Schedule.ONE_F_ONE_B: Schedule1F1B,
    Schedule.INTERLEAVED_1F1B: ScheduleInterleaved1F1B,
    Schedule.ZERO_BUBBLE: ScheduleInterleavedZeroBubble,
}
_SINGLE_STAGE_SCHEDULES = {Schedule.GPIPE, Schedule.ONE_F_ONE_B}


# ------------------------------------------------------------------ stand-in modules
class _Absent(nn.Module):
    """Stands in for a module another pipeline rank holds; running it is a bug."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.path} is held by another pipeline stage, not this rank")

    def extra_repr(self) -> str:
        return self.path


class _StopForward(Exception):
    """Control flow, not an error: carries the hidden state out of the model's forward."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Stop(nn.Module):
    """Sits after a chunk's last block: ends the model's forward with the hidden state."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _StopForward(_hidden_argument(args, kwargs))


class _Inject(nn.Module):
    """Wraps a chunk's first block for one forward: its hidden-state input becomes ``hidden``."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor) -> None:
        super().__init__()
        self.block = block
        self.hidden = hidden
        self.used = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _hidden_argument(args, kwargs)  # fails clearly when there is none to replace
        if args:
            args = (self.hidden, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": self.hidden}
        self.used = True
        return self.block(*args, **kwargs)


class _Handoff:
    """The received hidden state of a last chunk that holds no blocks (the final norm and head
    alone), for the first of its modules the model's forward calls (:class:`_EnterAtSuffix`)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden
        self.used = False


class _EnterAtSuffix(nn.Module):
    """Wraps a module after the blocks (final norm, head) for one forward of a chunk without blocks:
    the first such module called gets the received hidden state as its input instead of what the
    (absent) blocks would have left."""

    def __init__(self, module: nn.Module, handoff: _Handoff) -> None:
        super().__init__()
        self.module = module
        self.handoff = handoff

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.handoff.used:
            _hidden_argument(args, kwargs)  # fails clearly when there is none to replace
            if args:
                args = (self.handoff.hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": self.handoff.hidden}
            self.handoff.used = True
        return self.module(*args, **kwargs)


class _Placeholder(nn.Module):
    """Stands in for a prefix module on chunks after the first: the right shape, no work.

    An embedding gives zeros ``(*ids.shape, dim)``; any other prefix module (a norm after the
    embedding, say) passes its input through. The values never matter: the first block in range
    gets the received hidden state.
    """

    def __init__(self, dim: int | None, like: torch.Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.like = like

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.dim is None:
            return x
        return self.like.new_zeros(*x.shape, self.dim)


class _Tree(nn.Module):
    """Empty container, so a chunk's submodules keep the user model's paths and state_dict keys."""


def _hidden_argument(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(
            "pipeline stages need the hidden state as a block's first positional argument or as "
            f"hidden_states=, got {type(hidden).__name__}"
        )
    return hidden


# ------------------------------------------------------------------ module-tree helpers
def _swap(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` in ``model``; return what was there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = parent.get_submodule(name)
    setattr(parent, name, module)
    return old


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` under ``root`` at dotted ``path``, creating containers on the way."""
    node = root
    *parents, name = path.split(".")
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, _Tree())
        node = getattr(node, part)
    node.add_module(name, module)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _outer_modules(model: nn.Module, block_path: str) -> tuple[list[str], list[str]]:
    """Parameter-holding modules outside the block list: (registered before it, after it)."""
    prefix: list[str] = []
    suffix: list[str] = []
    node, path = model, ""
    for part in block_path.split("."):
        direct = [name for name, _ in node.named_parameters(recurse=False)]
        if direct:
            raise ValueError(
                f"{path or type(model).__name__} holds parameters {direct} directly; pipeline stages "
                "can only place parameters that live in submodules before or after the block list"
            )
        if not hasattr(node, part):
            raise ValueError(f"block_path {block_path!r}: {path or 'the model'} has no submodule {part!r}")
        after = False
        for name, child in node.named_children():
            if name == part:
                after = True
            elif _has_parameters(child):
                (suffix if after else prefix).append(f"{path}{name}")
        node, path = getattr(node, part), f"{path}{part}."
    if not isinstance(node, nn.ModuleList):
        raise ValueError(f"block_path {block_path!r} is a {type(node).__name__}, not an nn.ModuleList")
    return prefix, suffix


def _tied_names(
    model: nn.Module, block_path: str, plan: Plan, prefix: list[str], suffix: list[str],
) -> tuple[list[str], list[str]]:
    """Names (prefix side, suffix side) of the parameters prefix and suffix share, in one order.

    Raises for any other parameter that two stages would hold (weights shared between blocks of
    different stages, or between a block and an embedding): nothing would keep those copies equal.
    """
    last = len(plan.stages) - 1
    places = [(path, 0) for path in prefix]
    places += [(f"{block_path}.{i}", plan.stage_of(i)) for i in range(plan.num_layers)]
    places += [(path, last) for path in suffix]
    seen: dict[int, tuple[str, int]] = {}
    tied: dict[str, str] = {}
    for path, stage in places:
        for name, param in model.get_submodule(path).named_parameters(remove_duplicate=False):
            full = f"{path}.{name}"
            first, first_stage = seen.setdefault(id(param), (full, stage))
            if first_stage == stage:
                continue
            if not (first.startswith(tuple(f"{p}." for p in prefix)) and path in suffix):
                raise ValueError(f"{first} (stage {first_stage}) and {full} (stage {stage}) are one parameter; "
                                 "only input and output embeddings may be tied across pipeline stages")
            tied.setdefault(first, full)
    return list(tied), list(tied.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (its storage, under no_grad), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


# ------------------------------------------------------------------ the chunk
class StageChunk(nn.Module):
    """One pipeline stage of a user's model: blocks ``layer_range`` (plus the embedding on the first
    stage, the final norm and head on the last) as submodules at the user model's own paths, so
    ``parameters()`` is what this stage trains and ``state_dict()`` keys match the model's.

    ``forward(*received, **inputs)``: ``received`` is empty on the first stage and the previous
    stage's hidden state elsewhere; ``inputs`` are the model inputs (every stage gets them). Returns
    the hidden state for the next stage, or the logits on the last stage.

    To replace a block (an activation-checkpoint wrapper, say), replace it in the chunk with
    ``chunk.set_submodule(f"{block_path}.{i}", new)``: the chunk's submodules are what runs.
    """

    def __init__(
        self, model: nn.Module, block_path: str, *, stage_index: int, num_stages: int, layer_range: range,
        prefix: Sequence[str], suffix: Sequence[str], tied: Sequence[str],
    ) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule: it also holds other chunks' blocks
        self.block_path = block_path
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.layer_range = layer_range
        self._prefix_dims = {
            path: getattr(model.get_submodule(path), "embedding_dim", None) for path in prefix
        }
        self._suffix = list(suffix) if self.is_last else []
        self._after = list(suffix)
        self._ends_blocks = layer_range.stop == len(model.get_submodule(block_path))
        for path in (*self._block_paths(), *(prefix if self.is_first else ()), *self._suffix):
            _attach(self, path, model.get_submodule(path))
        self.tied_names = list(tied)
        """Names of the parameters this chunk shares with the other end of the pipeline (tied embeddings)."""

    @property
    def tied_parameters(self) -> list[nn.Parameter]:
        """The parameters named ``tied_names``, looked up now: TP and FSDP replace a module's
        parameters after the split."""
        return [self.get_parameter(name) for name in self.tied_names]

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def _block_paths(self) -> list[str]:
        return [f"{self.block_path}.{i}" for i in self.layer_range]

    def forward(self, *received: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        if len(received) != (0 if self.is_first else 1):
            raise TypeError(f"stage {self.stage_index} expects {0 if self.is_first else 1} received "
                            f"tensor(s), got {len(received)}")
        args, kwargs = _model_call(inputs)
        hidden = received[0] if received else None
        with self._narrowed(hidden) as inject:
            try:
                out = self._model(*args, **kwargs)
            except _StopForward as stop:
                out = stop.hidden
            else:
                if not self.is_last:
                    raise RuntimeError(f"the model's forward never reached block {self.layer_range.stop}: "
                                       f"does it call the blocks of {self.block_path!r} in order?")
        if inject is not None and not inject.used:
            where = (f"block {self.layer_range.start} of {self.block_path!r}" if self.layer_range else
                     f"any of {', '.join(self._suffix)} after the blocks")
            raise RuntimeError(f"the model's forward never called {where}")
        return _logits(out) if self.is_last else out

    @contextmanager
    def _narrowed(self, hidden: torch.Tensor | None) -> Iterator[_Inject | _Handoff | None]:
        """Install this chunk's view of the model (its blocks only; placeholders for the prefix on
        later stages; a stop after the last block) for one forward, then restore the model. A last
        chunk without blocks hands the received hidden state to the first module after the blocks
        that runs (the final norm, or the head); the chunk before it stops there."""
        blocks: list[nn.Module] = [self.get_submodule(p) for p in self._block_paths()]
        inject: _Inject | _Handoff | None = None
        if hidden is not None:
            if blocks:
                inject = blocks[0] = _Inject(blocks[0], hidden)
            else:
                inject = _Handoff(hidden)
        views: dict[str, nn.Module] = {}
        if not self.is_last and self._ends_blocks:
            # the last stage holds the norm and head alone: stop where the model calls them (a stop
            # after the last block would fall outside models that slice the blocks to their count)
            views.update((path, _Stop()) for path in self._after)
        elif not self.is_last:
            blocks.append(_Stop())
        views[self.block_path] = nn.ModuleList(blocks)
        for path, dim in self._prefix_dims.items():
            views[path] = self.get_submodule(path) if hidden is None else _Placeholder(dim, hidden)
        for path in self._suffix:
            module = self.get_submodule(path)
            views[path] = _EnterAtSuffix(module, inject) if isinstance(inject, _Handoff) else module
        saved = {path: _swap(self._model, path, module) for path, module in views.items()}
        try:
            yield inject
        finally:
            for path, module in saved.items():
                _swap(self._model, path, module)


def _model_call(inputs: Mapping[str, torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
    """Split schedule keyword arguments back into the model's positional and keyword inputs."""
    positional = sorted((int(k[len(_ARG):]), v) for k, v in inputs.items() if k.startswith(_ARG))
    return tuple(v for _, v in positional), {k: v for k, v in inputs.items() if not k.startswith(_ARG)}


def _schedule_kwargs(batch: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        return {f"{_ARG}0": batch}
    if isinstance(batch, Mapping):
        return dict(batch)
    return {f"{_ARG}{i}": t for i, t in enumerate(batch)}


def _logits(out: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, ``.logits`` (Hugging Face), or a tuple's first."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}")


def split_stages(model: nn.Module, block_path: str, plan: Plan, stage_index: int) -> list[StageChunk]:
    """This device group's chunks of ``model``: stages ``stage_index, stage_index + pp, ...``.

    ``block_path`` is the dotted path of the model's ``nn.ModuleList`` of repeated blocks
    (``"blocks"``, ``"model.layers"``, ``"transformer.h"``); the model's forward must call them
    in order, passing the hidden state as the first positional argument or ``hidden_states=``.
    The model is changed in place: modules no chunk of this rank holds are replaced by
    placeholders, so afterwards ``model.to(device)`` moves exactly this rank's part (the chunks
    share the model's modules and buffers; no weight is copied).
    """
    pp = plan.pp
    if not 0 <= stage_index < pp:
        raise PlanError("stages", f"stage index {stage_index} is outside the {pp} pipeline device groups")
    prefix, suffix = _outer_modules(model, block_path)
    blocks = model.get_submodule(block_path)
    if len(blocks) != plan.num_layers:
        raise PlanError("stages", f"the plan covers {plan.num_layers} layers, {block_path} has {len(blocks)}")
    last = len(plan.stages) - 1
    for i, stage in enumerate(plan.stages):
        if stage.start >= stage.end and (last == 0 or i not in (0, last)):
            raise PlanError(f"stages[{i}]", "a pipeline stage needs at least one layer (only the first or the "
                                            "last may hold the embedding, or the norm and head, alone)")
    if plan.stages[last].start == plan.stages[last].end and not suffix:
        raise PlanError(f"stages[{last}]", f"holds no blocks, and the model has no module with parameters after "
                                           f"{block_path} to run there")
    tied_first, tied_last = _tied_names(model, block_path, plan, prefix, suffix)
    num_stages = len(plan.stages)
    chunks = [
        StageChunk(
            model, block_path, stage_index=s, num_stages=num_stages,
            layer_range=range(plan.stages[s].start, plan.stages[s].end), prefix=prefix, suffix=suffix,
            tied=tied_first if s == 0 else tied_last if s == num_stages - 1 else (),
        )
        for s in range(stage_index, num_stages, pp)
    ]
    held = {i for chunk in chunks for i in chunk.layer_range}
    for i in range(len(blocks)):
        if i not in held:
            blocks[i] = _Absent(f"{block_path}.{i}")
    for paths, holds in ((prefix, chunks[0].is_first), (suffix, chunks[-1].is_last)):
        if not holds:
            for path in paths:
                _swap(model, path, _Absent(path))
    return chunks


# ------------------------------------------------------------------ the runner
class _Stage(PipelineStage):
    """A ``PipelineStage`` whose shape-inference forward (torch's dynamic metadata inference, on
    the first step) runs on zeros instead of uninitialised memory where a stage's input exists
    only as metadata. The values must agree across the ranks of a tensor-parallel group: a MoE
    block routes tokens by them and sizes its expert all-reduces by that routing, so different
    garbage on two TP ranks made their collectives disagree (gloo aborts, now and then). torch 2.11
    zero-fills these inputs itself (``torch.zeros_like`` in ``_shape_inference``; no ``_to_tensor``
    to override); later versions materialise them with ``torch.empty``."""

    def _to_tensor(self, arg: Any) -> torch.Tensor:
        t = super()._to_tensor(arg)
        if not isinstance(arg, torch.Tensor):  # materialised from metadata: torch.empty
            with torch.no_grad():
                t.zero_()
        return t


class _MicroBatchMean:
    """``loss_fn / n``: the sum over ``n`` equal micro-batches is then the batch mean."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int) -> None:
        self.loss_fn, self.n = loss_fn, n

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, target) / self.n


class PipelineRunner:
    """Runs one optimizer step's forward and backward over ``plan.num_micro_batches``
    micro-batches of this rank's ``chunks`` (from :func:`split_stages`) with the plan's schedule.

    ``pp_group`` holds one rank per pipeline device group, in stage order (group rank ``k`` runs
    stages ``k, k + pp, ...``); with several ranks per stage, rank ``r`` of stage ``k`` is in a
    group with rank ``r`` of every other stage. ``loss_fn(logits, targets)`` must average over
    the micro-batch; the step's loss is then the mean over the batch, as without a pipeline.
    Gradients accumulate into ``.grad`` as ``loss.backward()`` would; data-parallel reduction and
    the optimizer step are the caller's.
    """

    def __init__(
        self, chunks: Sequence[StageChunk], plan: Plan, pp_group: dist.ProcessGroup,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device | str,
    ) -> None:
        pp = dist.get_world_size(pp_group)
        if pp != plan.pp:
            raise PlanError("stages", f"the plan has {plan.pp} pipeline device groups, pp_group has {pp} ranks")
        if len(chunks) != plan.pipeline.virtual_stages:
            raise PlanError("pipeline.virtual_stages",
                            f"{plan.pipeline.virtual_stages} chunks per rank expected, got {len(chunks)}")
        self.chunks = list(chunks)
        self.group = pp_group
        self.num_micro_batches = plan.num_micro_batches
        self.device = torch.device(device)
        self._last_rank = dist.get_global_rank(pp_group, pp - 1)
        self._tied_peer = self._find_tied_peer(pp)
        self._loss = _MicroBatchMean(loss_fn, plan.num_micro_batches)
        self.schedule = None
        """The ``torch.distributed.pipelining`` schedule; None with one device group, whose chunks
        run micro-batch after micro-batch (gloo in torch 2.11 cannot send to itself in the
        multi-stage schedules' set-up)."""
        if pp > 1:
            stages = [_Stage(c, c.stage_index, c.num_stages, self.device, group=pp_group) for c in self.chunks]
            schedule = plan.pipeline.schedule
            if schedule is Schedule.ONE_F_ONE_B and plan.num_micro_batches < pp:
                # torch's Schedule1F1B wants as many micro-batches as stages; with fewer, 1F1B runs every
                # forward and then every backward, which is GPipe (and what the cost model charges)
                schedule = Schedule.GPIPE
            target = stages[0] if schedule in _SINGLE_STAGE_SCHEDULES else stages
            self.schedule = _SCHEDULES[schedule](target, plan.num_micro_batches, loss_fn=self._loss, scale_grads=False)

    def _find_tied_peer(self, pp: int) -> int | None:
        """Global rank holding the other copy of this rank's tied weights, or None."""
        ends = [c for c in self.chunks if c.tied_names and (c.is_first or c.is_last)]
        if not ends or pp == 1:
            return None
        return dist.get_global_rank(self.group, pp - 1 if ends[0].is_first else 0)

    def parameters(self) -> list[nn.Parameter]:
        """This rank's trainable parameters over all its chunks, each once (for the optimizer)."""
        unique: dict[int, nn.Parameter] = {}
        for chunk in self.chunks:
            for p in chunk.parameters():
                unique.setdefault(id(p), p)
        return list(unique.values())

    def step(
        self, batch: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor], targets: torch.Tensor,
    ) -> torch.Tensor:
        """Forward and backward of one batch (positional model inputs, or a mapping of keyword
        inputs; every rank of the pipeline passes the same batch). Returns the batch's mean loss,
        the same on every rank of ``pp_group``."""
        kwargs = _schedule_kwargs(batch)
        for name, t in kwargs.items():
            if t.shape[0] % self.num_micro_batches:
                raise ValueError(f"input {name} has batch size {t.shape[0]}, not a multiple of the "
                                 f"{self.num_micro_batches} micro-batches")
        losses: list[torch.Tensor] = []
        if self.schedule is None:
            self._accumulate(kwargs, targets, losses)
        else:
            self.schedule.step(target=targets, losses=losses, return_outputs=False, **kwargs)
            self._sync_tied_grads()
        loss = torch.zeros((), device=self.device)
        if losses:
            loss += torch.stack([x.detach().float() for x in losses]).sum()
        if self.schedule is not None:
            dist.broadcast(loss, src=self._last_rank, group=self.group)
        return loss

    def _accumulate(self, kwargs: dict[str, torch.Tensor], targets: torch.Tensor, losses: list[torch.Tensor]) -> None:
        """One device group: every chunk in stage order, micro-batch after micro-batch."""
        n = self.num_micro_batches
        split = {name: t.tensor_split(n) for name, t in kwargs.items()}
        for i, target in enumerate(targets.tensor_split(n)):
            inputs = {name: parts[i] for name, parts in split.items()}
            out = self.chunks[0](**inputs)
            for chunk in self.chunks[1:]:
                out = chunk(out, **inputs)
            loss = self._loss(out, target)
            loss.backward()
            losses.append(loss)

    def _sync_tied_grads(self) -> None:
        """Sum the gradients of tied weights between the first and last stage.

        Both ends hold the weights in one layout (``LayerStrategy.weight_layout``: vocabulary
        shards under TP, FSDP shards under ZeRO-2/3), and the peer is the rank at the same place in
        the other end's stage, so each rank adds the peer's local gradient shard to its own."""
        if self._tied_peer is None:
            return
        params = next(c for c in self.chunks if c.tied_names).tied_parameters
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif isinstance(p, DTensor) and p.grad.placements != p.placements:
                    # a vocabulary-parallel embedding's backward leaves its gradient replicated
                    p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            local = [_local(p.grad) for p in params]
            sent = [g.to(self.device) for g in local]  # offloaded gradients travel from the device
            received = [torch.empty_like(g) for g in sent]
            ops = [dist.P2POp(dist.isend, g, self._tied_peer, self.group) for g in sent]
            ops += [dist.P2POp(dist.irecv, r, self._tied_peer, self.group) for r in received]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            for g, r in zip(local, received):
                g.add_(r.to(g.device))
