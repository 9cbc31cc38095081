"""Optimizers for wrapped models, with ZeRO-1 optimizer-state sharding (Rajbhandari et al. SC'20).

Build the optimizer with ``model.optimizer(torch.optim.AdamW, lr=...)`` (any
``torch.optim.Optimizer`` class). Layer ranges with ZeRO-1 then keep optimizer states for
only their ``1/dp`` slice of the parameters: the optimizer steps on views of that slice and
the updated slices are all-gathered after the step. A plain ``torch.optim.AdamW(model.parameters())``
also trains every plan exactly, but without ZeRO-1's memory saving.

For checkpoints, :func:`dense_optimizer` gives the optimizer an unsharded ZeRO-1 optimizer would be
(each parameter's state gathered from its data-parallel group), and :func:`load_dense` takes this
rank's slices back from one: the checkpoint format is the plain optimizer's, under any plan.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galvatron.errors import GalvatronError
from galvatron.runtime.data import Bucket, GradientSync, _like_param, local_grad, local_view
from galvatron.runtime.relayout import _all_gather_single


class _Piece:
    """The part ``[start, start + length)`` of one parameter that this rank's optimizer owns."""

    def __init__(self, param: nn.Parameter, start: int, length: int, offload: bool) -> None:
        self.param, self.start, self.length = param, start, length
        view = self._flat(param)[start: start + length]
        self.offload = offload and view.device.type != "cpu"
        self.shard = nn.Parameter(view.detach().to("cpu", copy=True) if self.offload else view)

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        local = local_view(t)
        if not local.is_contiguous():
            raise RuntimeError("ZeRO-1 needs contiguous parameters")
        return local.view(-1)

    def load_grad(self) -> None:
        grad = local_grad(self.param)
        if grad is None:
            self.shard.grad = None
            return
        part = self._flat(grad)[self.start: self.start + self.length]
        self.shard.grad = part.to("cpu") if self.offload else part

    def values(self) -> torch.Tensor:
        return self.shard.detach().to(self._flat(self.param).device)

    def flat(self, value: Any) -> bool:
        """Whether an optimizer state entry of this piece is per element (sliced like the parameter)."""
        return isinstance(value, torch.Tensor) and value.shape == self.shard.shape

    def cut(self, value: Any) -> Any:
        """This piece's part of a state entry held for the whole (local) parameter."""
        local = local_view(value) if isinstance(value, torch.Tensor) else None
        if local is None or local.shape != local_view(self.param).shape:
            return value.clone() if isinstance(value, torch.Tensor) else value
        return local.reshape(-1)[self.start: self.start + self.length].to(self.shard.device, copy=True)


class _Shard:
    """One ZeRO-1 bucket: this rank's contiguous slice of the bucket's flattened parameters."""

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        sizes = [local_view(p).numel() for p in bucket.params]
        k, r = bucket.size, dist.get_rank(bucket.group)
        self.per_rank = math.ceil(sum(sizes) / k)
        lo, hi = r * self.per_rank, min((r + 1) * self.per_rank, sum(sizes))
        self.pieces, offset = [], 0
        for p, n in zip(bucket.params, sizes, strict=True):
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                self.pieces.append(_Piece(p, a - offset, b - a, bucket.offload))
            offset += n

    def gather(self) -> None:
        """All-gather the updated slices into every rank's full parameters."""
        params = self.bucket.params
        dtype, device = local_view(params[0]).dtype, local_view(params[0]).device
        mine = [piece.values().reshape(-1).to(dtype) for piece in self.pieces]
        pad = self.per_rank - sum(t.numel() for t in mine)
        own = torch.cat([*mine, torch.zeros(pad, dtype=dtype, device=device)])
        out = own.new_empty(self.per_rank * self.bucket.size)
        _all_gather_single(out, own, group=self.bucket.group)
        offset = 0
        with torch.no_grad():
            for p in params:
                flat = local_view(p).view(-1)
                flat.copy_(out[offset: offset + flat.numel()])
                offset += flat.numel()


    def gather_state(self, state: dict[Any, dict[str, Any]], names: dict[int, str]) -> dict[nn.Parameter, dict]:
        """Each bucket parameter's optimizer state as an unsharded optimizer would hold it (per-element
        entries shaped like the parameter, DTensors for DTensor parameters), from every rank's slices in
        ``state``; a collective over the bucket's group. Raises if the ranks holding slices of a
        parameter disagree on its entries (one rank's slice of the state lost)."""
        params = self.bucket.params
        index = {id(p): i for i, p in enumerate(params)}
        mine = {}
        for piece in self.pieces:
            entry = state.get(piece.shard, {})
            mine[index[id(piece.param)]] = ({k: v.dtype for k, v in entry.items() if piece.flat(v)},
                                            {k: _cpu(v) for k, v in entry.items() if not piece.flat(v)})
        everyone: list[Any] = [None] * self.bucket.size
        dist.all_gather_object(everyone, mine, group=self.bucket.group)
        held: dict[int, list[tuple[int, dict, dict]]] = {}
        for r, per_rank in enumerate(everyone):
            for i, (flat, other) in per_rank.items():
                held.setdefault(i, []).append((r, flat, other))
        for i, holders in held.items():
            if len({frozenset((*flat, *other)) for _, flat, other in holders}) > 1:
                keys = {r: sorted({*flat, *other}) for r, flat, other in holders}
                raise GalvatronError(f"ZeRO-1 optimizer state of {names.get(id(params[i]), i)}: the ranks of its "
                                     f"data-parallel group hold different entries {keys} (a rank's slice is missing)")
        dtypes = {k: d for holders in held.values() for _, flat, _ in holders for k, d in flat.items()}
        gathered = {k: self._gather_flat(state, k, d) for k, d in dtypes.items()}
        out, offset = {}, 0
        for i, p in enumerate(params):
            local = local_view(p)
            if i in held and (held[i][0][1] or held[i][0][2]):
                _, flat, other = held[i][0]
                entry = {k: _like_param(p, gathered[k][offset: offset + local.numel()].view_as(local).clone())
                         for k in flat}
                out[p] = {**other, **entry}
            offset += local.numel()
        return out

    def _gather_flat(self, state: dict[Any, dict[str, Any]], key: str, dtype: torch.dtype) -> torch.Tensor:
        """The per-element state ``key`` of the whole bucket, flattened (zeros where a parameter has none)."""
        device = local_view(self.bucket.params[0]).device
        parts = [state.get(piece.shard, {}).get(key) for piece in self.pieces]
        mine = [torch.zeros(piece.length, dtype=dtype, device=device) if part is None else
                part.detach().reshape(-1).to(device, dtype) for piece, part in zip(self.pieces, parts, strict=True)]
        pad = self.per_rank - sum(piece.length for piece in self.pieces)
        own = torch.cat([*mine, torch.zeros(pad, dtype=dtype, device=device)])
        out = own.new_empty(self.per_rank * self.bucket.size)
        _all_gather_single(out, own, group=self.bucket.group)
        return out


def _cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


class _ZeroOneMixin:
    """Steps on this rank's ZeRO-1 slices, then all-gathers them; clears the full gradients."""

    _galvatron_shards: list[_Shard]

    def step(self, closure: Any = None) -> Any:
        for shard in self._galvatron_shards:
            for piece in shard.pieces:
                piece.load_grad()
        loss = super().step(closure)  # type: ignore[misc]
        for shard in self._galvatron_shards:
            shard.gather()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # type: ignore[misc]
        for shard in self._galvatron_shards:
            for p in shard.bucket.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


class _ByKindMixin:
    """Steps each parameter group as one group per tensor kind (:func:`_tensor_kind`): PyTorch's
    multi-tensor (``foreach``, the CUDA default) and ``fused`` paths run one kernel over a list of
    tensors and refuse lists that mix plain tensors and DTensors (tensor parallelism shards linear
    weights but leaves norm weights whole; FSDP2 shards only some layer ranges) or DTensors of
    different meshes. The split lasts for the step only: ``param_groups`` stay as built, for LR
    schedulers and checkpoints under any plan."""

    def step(self, closure: Any = None) -> Any:
        groups = self.param_groups  # type: ignore[has-type]
        self.param_groups = [{**g, "params": part} for g in groups for part in _by_kind(g["params"])]
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            self.param_groups = groups


def _by_kind(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    parts: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    for p in params:
        parts.setdefault(_tensor_kind(p), []).append(p)
    return list(parts.values())


def build_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], sync: GradientSync,
                    **kwargs: Any) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over ``model``'s parameters whose ZeRO-1 layer ranges keep states
    for this rank's slice only, and whose steps run each kind of parameter tensor apart
    (:class:`_ByKindMixin`) where they mix. The result is an instance of ``optimizer_cls`` (LR
    schedulers and ``state_dict`` work as usual)."""
    shards = [_Shard(b) for b in sync.buckets if b.zero1 and b.size > 1]
    sharded = {id(p) for s in shards for p in s.bucket.params}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]
    params += [piece.shard for s in shards for piece in s.pieces]
    bases: tuple[type, ...] = (_ByKindMixin,) if len({_tensor_kind(p) for p in params}) > 1 else ()
    if shards:
        bases = (_ZeroOneMixin, *bases)
    if not bases:
        return optimizer_cls(params, **kwargs)
    prefix = "ZeroOne" if shards else "ByKind"
    cls = type(f"{prefix}{optimizer_cls.__name__}", (*bases, optimizer_cls), {})
    optimizer = cls(params, **kwargs)
    optimizer._galvatron_shards = shards
    optimizer._galvatron_base = optimizer_cls
    return optimizer


def _tensor_kind(p: torch.Tensor) -> tuple[Any, ...]:
    """Plain tensor, or a DTensor's mesh and placements."""
    if not hasattr(p, "placements"):
        return ()
    return (id(p.device_mesh), tuple(p.placements))


def is_zero_one(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` shards states over data-parallel ranks (ZeRO-1)."""
    return bool(getattr(optimizer, "_galvatron_shards", None))


def dense_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer (of ``optimizer``'s torch class) over ``model``'s own parameters that ``optimizer``
    would be without ZeRO-1: the same hyper-parameters, each sharded parameter's state gathered from
    its data-parallel group, the other states shared; ``optimizer`` itself when it shards nothing.
    Every rank calls it (collectives over each bucket's group); for checkpoints, not for stepping."""
    if not is_zero_one(optimizer):
        return optimizer
    shards: list[_Shard] = optimizer._galvatron_shards
    names = {id(p): n for n, p in model.named_parameters()}
    owner = {id(piece.shard): piece.param for s in shards for piece in s.pieces}
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    params: list[list[nn.Parameter]] = [[p for p in g["params"] if id(p) not in owner] for g in optimizer.param_groups]
    state = {p: optimizer.state[p] for ps in params for p in ps if p in optimizer.state}
    for s in shards:  # every bucket parameter, also those with no slice on this rank
        params[next((group_of[id(piece.shard)] for piece in s.pieces), 0)].extend(s.bucket.params)
        state.update(s.gather_state(optimizer.state, names))
    dense = optimizer._galvatron_base([{**g, "params": ps} for g, ps in zip(optimizer.param_groups, params,
                                                                             strict=True)])
    dense.state.update(state)
    return dense


def load_dense(optimizer: torch.optim.Optimizer, dense: torch.optim.Optimizer) -> None:
    """Load ``dense`` (from :func:`dense_optimizer`, its state replaced since) into ``optimizer``:
    hyper-parameters, this rank's slices of the sharded parameters' states, the other states."""
    if dense is optimizer:
        return
    for group, loaded in zip(optimizer.param_groups, dense.param_groups, strict=True):
        group.update({k: v for k, v in loaded.items() if k != "params"})
    owned = {id(piece.shard) for s in optimizer._galvatron_shards for piece in s.pieces}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in owned and p in dense.state:
                optimizer.state[p] = dense.state[p]
    for s in optimizer._galvatron_shards:
        for piece in s.pieces:
            entry = dense.state.get(piece.param)
            if entry is not None:
                optimizer.state[piece.shard] = {k: piece.cut(v) for k, v in entry.items()}
