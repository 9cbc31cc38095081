"""Saving and loading wrapped models with ``torch.distributed.checkpoint`` (DCP).

Parameters keep the user model's own names (no wrapper prefixes), so a checkpoint is a plain
state dict of the model:

- :func:`save` / :func:`load` with ``full=False`` (default): DCP's sharded format, a folder
  every rank writes its shards into; loading reshards to the current plan (another dp/tp
  layout, ZeRO stage, pipeline split or world size; a single process too).
- ``full=True``: one ``torch.save`` file of full tensors written by rank 0 (pipeline stages
  send theirs to it); loadable anywhere, including by an unwrapped model.

The optimizer state reshards like the model, in both formats. A ZeRO-1 optimizer
(``model.optimizer(...)`` on a plan with ZeRO-1 ranges) holds per-rank slices of flattened
buckets: it is saved as the unsharded optimizer it stands for (:func:`galvatron.runtime.optim.dense_optimizer`,
each parameter's state by name, gathered over its data-parallel group), and loads from any
checkpoint by cutting its slices out, so ZeRO-1 checkpoints load under other plans and the reverse.

Expert-parallel layers hold their experts' blocks under the full names
(:class:`galvatron.runtime.expert_wrap.ExpertShard`): DCP gets them as sharded tensors with their
offsets in the full tensor (each block written once, whichever ranks hold it), full state dicts
gather them; both formats load under any plan (other ep / tp, no EP, one process) and the reverse.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.api import ShardedTensorBase
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from galvatron.errors import GalvatronError
from galvatron.runtime.expert_wrap import ExpertShard, expert_shards
from galvatron.runtime.optim import dense_optimizer, load_dense


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of the model as a full CPU tensor, on every rank
    (a collective: all ranks call it)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    if _pipelined(model):  # each stage holds its own part: merge them
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, state)
        state = {k: v for part in parts for k, v in part.items()}
    shards = expert_shards(model)
    if shards:
        state = _gather_experts(state, shards)
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (as from :func:`full_state_dict` or an unwrapped model) into the
    model's shards (expert-parallel layers: their experts' blocks); entries of other pipeline
    stages are ignored."""
    own = get_model_state_dict(model)
    missing = sorted(set(own) - set(state))
    if missing:
        raise GalvatronError(f"the state dict lacks {len(missing)} entries of this model, e.g. {missing[0]}")
    shards = expert_shards(model)
    own = {k: shards[k].take(state[k]) if k in shards else state[k] for k in own}
    set_model_state_dict(model, own, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state as a single-process optimizer's, keyed by parameter name, with full
    CPU tensors (DTensors, ZeRO-1 slices and expert blocks gathered; copies, never the live state), on
    every rank (a collective)."""
    state = _full_optimizer_state(model, dense_optimizer(model, optimizer))
    return {"state": {fqn: {k: _cpu(v) for k, v in entry.items()} for fqn, entry in state["state"].items()},
            "param_groups": [{**g, "params": list(g["params"])} for g in state["param_groups"]]}


def save(model: nn.Module, path: str | Path, optimizer: torch.optim.Optimizer | None = None, *,
         full: bool = False) -> None:
    """Save the model (and optimizer) to ``path``: a DCP folder, or with ``full`` one file.
    Every rank calls it."""
    if full:
        state = {"model": full_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = full_optimizer_state_dict(model, optimizer)
        if dist.get_rank() == 0:
            torch.save(state, path)
        dist.barrier()
        return
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, dense_optimizer(model, optimizer))
    dcp.save(_sharded_experts(model, state), checkpoint_id=Path(path))


def load(model: nn.Module, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what :func:`save` wrote (either format) into the model (and optimizer), resharding
    the model to its current plan. Every rank calls it."""
    dense = dense_optimizer(model, optimizer) if optimizer is not None else None
    if Path(path).is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        load_full_state_dict(model, state["model"])
        if dense is not None:
            _load_full_optimizer_state(model, dense, state["optimizer"])
            load_dense(optimizer, dense)
        return
    state = {"model": get_model_state_dict(model)}
    if dense is not None:
        state["optimizer"] = get_optimizer_state_dict(model, dense)
    groups = [g["params"] for g in state["optimizer"]["param_groups"]] if "optimizer" in state else []
    loading = _sharded_experts(model, state)  # expert blocks as views of state's tensors
    _check_complete(path, state["model"])
    dcp.load(loading, checkpoint_id=Path(path))
    set_model_state_dict(model, state["model"])
    if dense is None:
        return
    state["optimizer"]["param_groups"] = loading["optimizer"]["param_groups"]
    for group, params in zip(state["optimizer"]["param_groups"], groups, strict=True):
        group["params"] = params  # the saving rank's names; under EP each rank names its own experts
    set_optimizer_state_dict(model, dense, state["optimizer"])
    load_dense(optimizer, dense)


def _check_complete(path: str | Path, model_state: dict[str, Any]) -> None:
    """Refuse a DCP checkpoint that lacks entries of the model (say, one rank's ModuleList experts
    never written) before any collective. (DCP's save already refuses tensors its blocks do not fill.)"""
    metadata = dcp.FileSystemReader(Path(path)).read_metadata()
    missing = [k for k in model_state if f"model.{k}" not in metadata.state_dict_metadata]
    if missing:
        raise GalvatronError(f"{path} lacks {len(missing)} entries of this model, e.g. {missing[0]}")


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    shards = expert_shards(model)
    if not shards:
        return state
    entries = {(fqn, k): v for fqn, entry in state["state"].items() if fqn in shards for k, v in entry.items()}
    gathered = _gather_experts(entries, {key: _state_shard(v, shards[key[0]]) for key, v in entries.items()})
    for (fqn, k), v in gathered.items():
        state["state"].setdefault(fqn, {})[k] = v
    names: list[Any] = [None] * dist.get_world_size()  # each rank's groups name its own experts
    dist.all_gather_object(names, [g["params"] for g in state["param_groups"]])
    for i, group in enumerate(state["param_groups"]):
        group["params"] = list(dict.fromkeys(n for per_rank in names for n in per_rank[i]))
    return state


def _load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> None:
    shards = expert_shards(model)
    if shards:  # keep this rank's experts, cut to its blocks
        own = {n for n, _ in model.named_parameters()}
        state = {"state": {fqn: {k: _take(v, shards[fqn]) if fqn in shards else v for k, v in entry.items()}
                           for fqn, entry in state["state"].items() if fqn in own},
                 "param_groups": [{**g, "params": [n for n in g["params"] if n in own]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------- expert parallelism
def _state_shard(value: Any, shard: ExpertShard) -> ExpertShard | None:
    """The layout of an optimizer state entry: its parameter's when shaped like it (None: whole)."""
    return shard if isinstance(value, torch.Tensor) and tuple(value.shape) == shard.local_shape else None


def _take(value: Any, shard: ExpertShard) -> Any:
    return shard.take(value) if isinstance(value, torch.Tensor) and tuple(value.shape) == shard.shape else value


def _gather_experts(state: dict[Any, Any], shards: dict[Any, ExpertShard | None]) -> dict[Any, Any]:
    """``state`` with the entries named in ``shards`` (this rank's expert blocks; None: an entry held
    whole) replaced by full tensors, and the entries only other ranks hold added. Each block travels
    once, from the lowest rank holding it; raises when the ranks' blocks do not cover a tensor."""
    rank, world = dist.get_rank(), dist.get_world_size()
    held = {}
    for key, shard in shards.items():
        blocks = shard.views(state[key]) if shard is not None else [((), state[key])]
        held.update({(key, offsets): value for offsets, value in blocks})
    shapes = {key: shard.shape if shard is not None else None for key, shard in shards.items()}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (shapes, list(held)))
    first: dict[Any, int] = {}
    for r, (_, blocks) in enumerate(everyone):
        for block in blocks:
            first.setdefault(block, r)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, {b: _cpu(v) for b, v in held.items() if first[b] == rank})
    out = {k: v for k, v in state.items() if k not in shards}
    shapes = {k: shape for per_rank, _ in everyone for k, shape in per_rank.items()}
    filled = dict.fromkeys(shapes, 0)
    for part in parts:
        for (key, offsets), value in part.items():
            if shapes[key] is None:
                out[key] = value
                continue
            full = out.setdefault(key, value.new_empty(shapes[key]))
            full[tuple(slice(o, o + n) for o, n in zip(offsets, value.shape, strict=True))] = value
            filled[key] += value.numel()
    for key, shape in shapes.items():
        if shape is not None and filled[key] != math.prod(shape):
            raise GalvatronError(f"expert tensor {key}: the ranks hold {filled[key]} of its {math.prod(shape)} "
                                 "elements")
    return out


def _cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def _sharded_experts(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (``model`` and ``optimizer`` state dicts) for DCP: expert entries as sharded tensors
    whose local shards are views of this rank's blocks, placed in the full tensor."""
    shards = expert_shards(model)
    if not shards:
        return state
    out = {**state, "model": {k: _sharded(v, shards[k]) if k in shards else v for k, v in state["model"].items()}}
    if "optimizer" in state:
        opt = state["optimizer"]
        out["optimizer"] = {**opt, "state": {
            fqn: {k: _sharded(v, shards[fqn]) if fqn in shards and _state_shard(v, shards[fqn]) else v
                  for k, v in entry.items()} for fqn, entry in opt["state"].items()}}
    return out


def _sharded(tensor: torch.Tensor, shard: ExpertShard) -> ShardedTensor:
    place = f"rank:{dist.get_rank() if dist.is_initialized() else 0}/{tensor.device}"
    local = [Shard(view, ShardMetadata(list(offsets), list(view.shape), place))
             for offsets, view in shard.views(tensor)]
    grid = [ShardMetadata(list(offsets), list(sizes), place) for offsets, sizes in shard.grid]
    meta = ShardedTensorMetadata(grid, torch.Size(shard.shape), TensorProperties.create_from_tensor(tensor))
    # ShardedTensor's own constructor wants contiguous shards ([gate; up] blocks are strided views)
    sharded = ShardedTensorBase._init_from_local_shards_and_global_metadata(local, meta)
    sharded._prepare_init(process_group=None, init_rrefs=False)
    return sharded


def _pipelined(model: nn.Module) -> bool:
    runtime = getattr(model, "_galvatron", None)
    return runtime is not None and runtime.plan.pp > 1
