"""Optimizers for wrapped models, with ZeRO-1 optimizer-state sharding (Rajbhandari et al. SC'20).

Build the optimizer with ``model.optimizer(torch.optim.AdamW, lr=...)`` (any
``torch.optim.Optimizer`` class). Layer ranges with ZeRO-1 then keep optimizer states for
only their ``1/dp`` slice of the parameters: the optimizer steps on views of that slice and
the updated slices are all-gathered after the step. A plain ``torch.optim.AdamW(model.parameters())``
also trains every plan exactly, but without ZeRO-1's memory saving.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galvatron.runtime.data import Bucket, GradientSync, local_grad, local_view
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


def build_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], sync: GradientSync,
                    **kwargs: Any) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over ``model``'s parameters whose ZeRO-1 layer ranges keep states
    for this rank's slice only. The result is an instance of ``optimizer_cls`` (LR schedulers
    and ``state_dict`` work as usual)."""
    shards = [_Shard(b) for b in sync.buckets if b.zero1 and b.size > 1]
    sharded = {id(p) for s in shards for p in s.bucket.params}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]
    params += [piece.shard for s in shards for piece in s.pieces]
    if not shards:
        return optimizer_cls(params, **kwargs)
    cls = type(f"ZeroOne{optimizer_cls.__name__}", (_ZeroOneMixin, optimizer_cls), {})
    optimizer = cls(params, **kwargs)
    optimizer._galvatron_shards = shards
    return optimizer
