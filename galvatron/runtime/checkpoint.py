"""Saving and loading wrapped models with ``torch.distributed.checkpoint`` (DCP).

Parameters keep the user model's own names (no wrapper prefixes), so a checkpoint is a plain
state dict of the model:

- :func:`save` / :func:`load` with ``full=False`` (default): DCP's sharded format, a folder
  every rank writes its shards into; loading reshards to the current plan (another dp/tp
  layout, ZeRO stage, pipeline split or world size; a single process too).
- ``full=True``: one ``torch.save`` file of full tensors written by rank 0 (pipeline stages
  send theirs to it); loadable anywhere, including by an unwrapped model.

The optimizer state of a standard optimizer reshards like the model. A ZeRO-1 optimizer
(``model.optimizer(...)`` on a plan with ZeRO-1 ranges) holds per-rank slices: its state is
saved per rank next to the DCP shards and reloads under the same plan only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from galvatron.errors import GalvatronError


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of the model as a full CPU tensor, on every rank
    (a collective: all ranks call it)."""
    _refuse_expert_parallel(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    if _pipelined(model):  # each stage holds its own part: merge them
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, state)
        state = {k: v for part in parts for k, v in part.items()}
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (as from :func:`full_state_dict` or an unwrapped model) into the
    model's shards; entries of other pipeline stages are ignored."""
    _refuse_expert_parallel(model)
    own = get_model_state_dict(model)
    missing = sorted(set(own) - set(state))
    if missing:
        raise GalvatronError(f"the state dict lacks {len(missing)} entries of this model, e.g. {missing[0]}")
    set_model_state_dict(model, {k: state[k] for k in own}, options=StateDictOptions(full_state_dict=True))


def save(model: nn.Module, path: str | Path, optimizer: torch.optim.Optimizer | None = None, *,
         full: bool = False) -> None:
    """Save the model (and optimizer) to ``path``: a DCP folder, or with ``full`` one file.
    Every rank calls it."""
    _refuse_expert_parallel(model)
    if full:
        state = {"model": full_state_dict(model)}
        if optimizer is not None:
            state["optimizer"] = _full_optimizer_state(model, optimizer)
        if dist.get_rank() == 0:
            torch.save(state, path)
        dist.barrier()
        return
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None and not _zero_one(optimizer):
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=Path(path))
    if optimizer is not None and _zero_one(optimizer):
        torch.save({"plan": _plan_dict(model), "state": optimizer.state_dict()}, _zero_one_file(path))


def load(model: nn.Module, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what :func:`save` wrote (either format) into the model (and optimizer), resharding
    the model to its current plan. Every rank calls it."""
    _refuse_expert_parallel(model)
    if Path(path).is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        load_full_state_dict(model, state["model"])
        if optimizer is not None:
            _load_full_optimizer_state(model, optimizer, state["optimizer"])
        return
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None and not _zero_one(optimizer):
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=Path(path))
    set_model_state_dict(model, state["model"])
    if optimizer is None:
        return
    if not _zero_one(optimizer):
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return
    file = _zero_one_file(path)
    if not file.is_file():
        raise GalvatronError(f"{path} holds no ZeRO-1 optimizer state for rank {dist.get_rank()}")
    saved = torch.load(file, map_location="cpu", weights_only=False)
    if saved["plan"] != _plan_dict(model):
        raise GalvatronError(f"{path}: ZeRO-1 optimizer state reloads only under the plan it was saved with")
    optimizer.load_state_dict(saved["state"])


def _refuse_expert_parallel(model: nn.Module) -> None:
    """Expert-parallel layers hold per-rank expert shards under the full parameter names, which
    neither DCP nor a full state dict can tell apart yet."""
    from galvatron.runtime.expert_wrap import expert_parallel_state

    for module in model.modules():
        state = expert_parallel_state(module)
        if state is not None and (state.ep_group is not None or state.tp_group is not None):
            raise GalvatronError("checkpoints of expert-parallel models (ep > 1) are not supported yet")


def _full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    if _zero_one(optimizer):
        raise GalvatronError("a full checkpoint of a ZeRO-1 optimizer is not supported; save with full=False")
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def _load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> None:
    if _zero_one(optimizer):
        raise GalvatronError("a ZeRO-1 optimizer cannot load a full checkpoint's optimizer state")
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _zero_one(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_galvatron_shards", None))


def _zero_one_file(path: str | Path) -> Path:
    return Path(path) / f"zero1-optimizer-rank{dist.get_rank()}.pt"


def _plan_dict(model: nn.Module) -> dict[str, Any]:
    return model._galvatron.plan.to_dict()


def _pipelined(model: nn.Module) -> bool:
    runtime = getattr(model, "_galvatron", None)
    return runtime is not None and runtime.plan.pp > 1
