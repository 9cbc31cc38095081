"""Ring Attention (Liu et al. 2023) and Striped Attention (Brandon et al. 2023) as one autograd function.

Each of the P ranks of the ring group holds S/P tokens of Q, K and V. In P steps every rank
attends its queries to every rank's keys/values: K and V (packed in one buffer, with the K/V
heads only, so GQA sends less) move one rank forward per step over p2p, and the partial outputs
merge by their log-sum-exp. The backward runs the same ring once more and also sends the
accumulated dK/dV with the block they belong to; after P sends they arrive at their owner.

The next p2p exchange is started before the current block is computed, so on GPUs (NCCL runs
p2p on its own stream) communication overlaps compute; the block kernel is FlashAttention where
it can run (see :mod:`galvatron.runtime.context_kernels`).

Layouts and causal masks (query rank i, key/value block of rank j):

- ring (contiguous chunks, rank r holds tokens [r*S/P, (r+1)*S/P)): j == i causal, j < i full,
  j > i skipped. Rank i computes i + 1/2 blocks of work: the last rank is the slowest.
- striped (token t on rank t mod P): j <= i causal (include the diagonal), j > i strictly below
  the diagonal. Every rank does P/2 blocks of work, up to one diagonal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from galvatron.runtime.context_kernels import BlockMask, accumulation_dtype, block_backward, block_forward

_KV_TAG, _GRAD_TAG = 0, 1


def ring_mask(step: int, rank: int, size: int, causal: bool, striped: bool) -> BlockMask | None:
    """Mask of the block that ``rank`` attends at ``step``: the K/V of rank ``(rank - step) mod
    size``. None: the block is entirely masked out and skipped."""
    if not causal:
        return BlockMask.FULL
    if step == 0:
        return BlockMask.CAUSAL
    source = (rank - step) % size
    if striped:
        return BlockMask.CAUSAL if source < rank else BlockMask.STRICT
    return BlockMask.FULL if source < rank else None


class _RingExchange:
    """Send a tensor to the next rank of the ring and receive the previous rank's, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def start(self, tensor: torch.Tensor, tag: int) -> tuple[torch.Tensor, list[Any]]:
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
               dist.P2POp(dist.irecv, received, self.prev, self.group, tag)]
        return received, dist.batch_isend_irecv(ops)

    @staticmethod
    def finish(pending: tuple[torch.Tensor, list[Any]]) -> torch.Tensor:
        received, works = pending
        for work in works:
            work.wait()
        return received


def _merge(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of a block's output into the running one, in sigmoid form (stable
    when either LSE is ``-inf``; zhuzilin/ring-flash-attention #34)."""
    block_out = block_out.to(block_lse.dtype)
    if out is None or lse is None:
        return block_out, block_lse
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    return out - weight * (out - block_out), lse - torch.nn.functional.logsigmoid(lse - block_lse)


class RingAttention(torch.autograd.Function):
    """Ring (contiguous) or striped attention over ``group``; ``q`` (B, H, S/P, D), ``k``/``v``
    (B, Hkv, S/P, D) with Hkv dividing H."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                causal: bool, scale: float, striped: bool) -> torch.Tensor:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        ring = _RingExchange(group) if size > 1 else None
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(size):
            pending = ring.start(kv, _KV_TAG) if ring is not None and step + 1 < size else None
            mask = ring_mask(step, rank, size, causal, striped)
            if mask is not None:
                out, lse = _merge(out, lse, *block_forward(q, kv[0], kv[1], mask, scale))
            if pending is not None:
                kv = _RingExchange.finish(pending)
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.striped = group, causal, scale, striped
        return result

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        ring = _RingExchange(group) if size > 1 else None
        dout = dout.contiguous()
        kv = torch.stack([k, v])
        dq = torch.zeros_like(q, dtype=accumulation_dtype(q.dtype))
        dkv = torch.zeros_like(kv, dtype=dq.dtype)
        pending_grad = None
        for step in range(size):
            pending_kv = ring.start(kv, _KV_TAG) if ring is not None and step + 1 < size else None
            mask = ring_mask(step, rank, size, ctx.causal, ctx.striped)
            grads = None
            if mask is not None:
                grads = block_backward(dout, q, kv[0], kv[1], out, lse, mask, ctx.scale)
                dq += grads[0]
            if pending_grad is not None:
                dkv = _RingExchange.finish(pending_grad)
            if grads is not None:
                dkv[0] += grads[1]
                dkv[1] += grads[2]
            if ring is not None:
                pending_grad = ring.start(dkv, _GRAD_TAG)
            if pending_kv is not None:
                kv = _RingExchange.finish(pending_kv)
        if pending_grad is not None:
            dkv = _RingExchange.finish(pending_grad)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                   causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Ring Attention over ``group`` on contiguous sequence chunks (rank r holds chunk r).

    ``q`` (B, H, S/P, D), ``k``/``v`` (B, Hkv, S/P, D); returns (B, H, S/P, D). Every rank of
    the group must hold the same number of tokens."""
    return RingAttention.apply(q, k, v, group, causal, _scale(q, scale), False)


def striped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                      causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Striped Attention over ``group``: as :func:`ring_attention`, with token t on rank t mod P
    (shard the batch with ``shard_sequence(..., "striped", ...)``)."""
    return RingAttention.apply(q, k, v, group, causal, _scale(q, scale), True)


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale
