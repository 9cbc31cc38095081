"""DeepSpeed-Ulysses (Jacobs et al. 2023) and its 2-D form with a ring inside, USP (Fang & Zhao 2024).

Ulysses trades the sequence split for a head split with one all-to-all before attention and one
after: each of the P ranks then attends S tokens with H/P heads, an ordinary local attention.
Q, K and V travel in one all-to-all. GQA: K/V heads are sent as they are when P divides their
count; otherwise each K/V head is repeated P/gcd(Hkv, P) times first, the fewest copies that
split evenly and keep every query head with its own K/V head (DeepSpeed does the same).

USP ("hybrid") runs Ulysses inside a group of ``u`` ranks and Ring Attention across the ``r``
groups: after the all-to-all, the ``u`` ranks of a ring position hold the ring position's
contiguous chunk of S/r tokens, which the ring then treats like any ring chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from galvatron.runtime.context_ring import ring_attention

AttentionCore = Callable[..., torch.Tensor]


def _all_to_all(tensors: tuple[torch.Tensor, ...], group: dist.ProcessGroup, scatter: int,
                gather: int) -> tuple[torch.Tensor, ...]:
    """Split each (B, H, S, D) tensor into P pieces along dim ``scatter``, send piece p to rank p,
    and concatenate the pieces received along dim ``gather``: one all-to-all for all tensors."""
    size = dist.get_world_size(group)
    pieces = [t.unflatten(scatter, (size, -1)).movedim(scatter, 0) for t in tensors]
    send = torch.cat([p.reshape(size, -1) for p in pieces], dim=1)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    out, start = [], 0
    for piece in pieces:
        numel = piece[0].numel()
        chunk = received[:, start:start + numel].reshape(piece.shape)
        out.append(chunk.movedim(0, gather).flatten(gather, gather + 1))
        start += numel
    return tuple(out)


class SeqToHeadAllToAll(torch.autograd.Function):
    """Ulysses' first all-to-all: (B, H, S/P, D) sequence shards -> (B, H/P, S, D) head shards."""

    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        return _all_to_all(tensors, group, scatter=1, gather=2)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, *_all_to_all(tuple(g.contiguous() for g in grads), ctx.group, scatter=2, gather=1)


class HeadToSeqAllToAll(torch.autograd.Function):
    """Ulysses' second all-to-all: (B, H/P, S, D) head shards -> (B, H, S/P, D) sequence shards."""

    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        return _all_to_all(tensors, group, scatter=2, gather=1)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, *_all_to_all(tuple(g.contiguous() for g in grads), ctx.group, scatter=1, gather=2)


def kv_replication(kv_heads: int, degree: int) -> int:
    """How many copies of each K/V head Ulysses sends so that ``degree`` ranks split them evenly."""
    return degree // math.gcd(kv_heads, degree)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: float | None = None) -> torch.Tensor:
    """Single-rank attention core (PyTorch SDPA, flash kernels on GPU); K/V may have fewer heads."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _ulysses(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
             inner: AttentionCore, causal: bool, scale: float | None) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return inner(q, k, v, causal=causal, scale=scale)
    if q.shape[1] % size:
        raise ValueError(f"Ulysses degree {size} does not divide the {q.shape[1]} local query heads "
                         "(heads / tp must be a multiple of the Ulysses degree)")
    copies = kv_replication(k.shape[1], size)
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=1), v.repeat_interleave(copies, dim=1)
    q, k, v = SeqToHeadAllToAll.apply(group, q, k, v)
    out = inner(q, k, v, causal=causal, scale=scale)
    return HeadToSeqAllToAll.apply(group, out)[0]


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                      causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """DeepSpeed-Ulysses over ``group`` on contiguous sequence chunks.

    ``q`` (B, H, S/P, D), ``k``/``v`` (B, Hkv, S/P, D) with P dividing H; returns (B, H, S/P, D)."""
    return _ulysses(q, k, v, group, local_attention, causal, scale)


def hybrid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses_group: dist.ProcessGroup,
                     ring_group: dist.ProcessGroup, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """USP: Ulysses over ``ulysses_group`` (inner) and Ring Attention over ``ring_group`` (outer).

    Contiguous chunks over the whole context-parallel group, whose rank ``c`` is ring position
    ``c // u`` and Ulysses position ``c % u`` (build the groups with ``new_context_groups``)."""

    def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
        return ring_attention(q, k, v, ring_group, causal=causal, scale=scale)

    return _ulysses(q, k, v, ulysses_group, ring, causal, scale)
