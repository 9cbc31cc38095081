"""Block attention that returns its log-sum-exp: the local compute of ring and striped attention.

A ring step attends the local queries to one block of keys/values and later merges the partial
outputs by their log-sum-exp (LSE), the online softmax of Milakov & Gimelshein 2018 used by Ring
Attention (Liu et al. 2023). The backward of a block takes the *merged* output and LSE, as
FlashAttention's backward does (Dao 2023, Alg. 2), so each block's dq/dk/dv are exact pieces of
the full gradient.

Which kernel runs where (:func:`select_kernel`):

- ``cudnn``: CUDA, fp16/bf16, compute capability >= 9.0 (Hopper and newer), head dim a multiple of
  8 and <= 128, PyTorch's cuDNN SDPA backend enabled: ``aten._scaled_dot_product_cudnn_attention``
  with ``compute_log_sumexp=True``, and its backward. On an H100 this is the kernel plain
  ``F.scaled_dot_product_attention`` dispatches to (torch 2.11), 1.75x faster than FlashAttention-2
  (``benchmarks/results/context_parallel.json``).
- ``flash``: other CUDA fp16/bf16 cases with compute capability >= 8.0, head dim a multiple of 8
  and <= 256: ``aten._scaled_dot_product_flash_attention`` and its backward (the FlashAttention-2
  kernels inside PyTorch's SDPA).
- ``efficient``: other CUDA cases (fp32 included): ``aten._scaled_dot_product_efficient_attention``
  (xFormers memory-efficient kernel) with ``compute_log_sumexp=True``, and its backward.
- ``math``: CPU and everything else: matmul + logsumexp in fp32 (fp64 for fp64 inputs), GQA by
  broadcasting instead of copying K/V.

Masks are relative to one (query block, key block) pair of equal length: ``FULL``, ``CAUSAL``
(key index <= query index) or ``STRICT`` (key index < query index; the off-diagonal blocks of
Striped Attention, Brandon et al. 2023). A fused kernel runs ``STRICT`` as ``CAUSAL`` on
``q[1:]`` against ``k[:-1]``; query row 0 then sees nothing: output 0, LSE ``-inf``.
"""

from __future__ import annotations

import enum

import torch

Kernel = str  # "cudnn" | "flash" | "efficient" | "math"
_ALIGN_LSE = 32  # the memory-efficient kernel pads its LSE rows to a multiple of 32


class BlockMask(enum.Enum):
    """Which (query, key) pairs of one block pair may attend."""

    FULL = "full"
    CAUSAL = "causal"
    STRICT = "strict"


def select_kernel(q: torch.Tensor) -> Kernel:
    """The kernel :func:`block_forward` uses for inputs like ``q`` (see the module docstring)."""
    if not q.is_cuda:
        return "math"
    head_dim = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or head_dim % 8:
        return "efficient"
    major = torch.cuda.get_device_capability(q.device)[0]
    if major >= 9 and head_dim <= 128 and torch.backends.cuda.cudnn_sdp_enabled():
        return "cudnn"
    if major >= 8 and head_dim <= 256 and torch.backends.cuda.flash_sdp_enabled():
        return "flash"
    return "efficient"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision in which partial outputs, LSEs and gradients are accumulated."""
    return torch.promote_types(dtype, torch.float32)


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float, kernel: Kernel | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend ``q`` (B, H, S, D) to ``k``/``v`` (B, Hkv, S, D); return the output (B, H, S, D),
    in the kernel's dtype, and the LSE (B, H, S) in :func:`accumulation_dtype`."""
    kernel = kernel or select_kernel(q)
    if kernel == "math":
        return _math_forward(q, k, v, mask, scale)
    if mask is BlockMask.STRICT:
        return _strict_forward(q, k, v, scale, kernel)
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
    causal = mask is BlockMask.CAUSAL
    if kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                      scale=scale)[:2]
        lse = lse.squeeze(-1)  # (B, H, S, 1)
    elif kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                          scale=scale)[:2]
    return out, lse[..., : q.shape[2]].to(accumulation_dtype(q.dtype))


def block_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: BlockMask, scale: float, kernel: Kernel | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block, given the merged output ``out`` and LSE ``lse`` of all blocks and
    the gradient ``dout`` of the merged output. dk/dv have K/V's (possibly fewer) heads."""
    kernel = kernel or select_kernel(q)
    if kernel == "math":
        return _math_backward(dout, q, k, v, out, lse, mask, scale)
    if mask is BlockMask.STRICT:
        return _strict_backward(dout, q, k, v, out, lse, scale, kernel)
    heads_kv = k.shape[1]
    k, v = _expand_heads(k, q.shape[1]), _expand_heads(v, q.shape[1])
    causal = mask is BlockMask.CAUSAL
    if kernel == "cudnn":
        # cuDNN reads out/dout with the strides it gave its output, which matches the query's layout
        like_q = [torch.empty_like(q).copy_(t) for t in (out, dout)]
        seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)  # no dropout: not read
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            like_q[1], q, k, v, like_q[0], lse.float().unsqueeze(-1).contiguous(), seed, offset, None, None, None,
            q.shape[2], k.shape[2], 0.0, causal, scale=scale)
    elif kernel == "flash":
        seed = torch.empty(2, dtype=torch.uint64, device=q.device)  # no dropout: the RNG state is not read
        offset = torch.empty((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.float().contiguous(), None, None, q.shape[2],
            k.shape[2], 0.0, causal, seed, offset, scale=scale)
    else:
        rows = -(-q.shape[2] // _ALIGN_LSE) * _ALIGN_LSE
        padded = lse.new_zeros(*lse.shape[:-1], rows, dtype=torch.float32)
        padded[..., : q.shape[2]] = lse
        seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
        # out/dout in the (B, S, H, D) memory layout the forward returns: with (B, H, S, D)-contiguous
        # ones the fp16/bf16 kernel gives wrong dq/dk without an error (H100, torch 2.11)
        out, dout = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (out, dout))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False], causal, scale=scale)
    return dq, _sum_heads(dk, heads_kv), _sum_heads(dv, heads_kv)


# ----------------------------------------------------------------------------- fused kernels, STRICT
def _strict_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    kernel: Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, s, d = q.shape
    out = q.new_zeros(b, h, s, d)
    lse = torch.full((b, h, s), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    if s > 1:
        out[:, :, 1:], lse[:, :, 1:] = block_forward(q[:, :, 1:], k[:, :, :-1], v[:, :, :-1], BlockMask.CAUSAL,
                                                     scale, kernel)
    return out, lse


def _strict_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, scale: float, kernel: Kernel) -> tuple[torch.Tensor, ...]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.shape[2] > 1:
        dq[:, :, 1:], dk[:, :, :-1], dv[:, :, :-1] = block_backward(
            dout[:, :, 1:], q[:, :, 1:], k[:, :, :-1], v[:, :, :-1], out[:, :, 1:], lse[:, :, 1:],
            BlockMask.CAUSAL, scale, kernel)
    return dq, dk, dv


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """K/V with ``heads`` heads, each of its own heads repeated for its group of query heads."""
    groups = heads // x.shape[1]
    return x.contiguous() if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_heads(grad: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_expand_heads` for gradients: sum each group's copies."""
    b, h, s, d = grad.shape
    return grad if h == heads else grad.view(b, heads, h // heads, s, d).sum(2)


# ----------------------------------------------------------------------------- math kernel
def _scores(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, scale: float) -> torch.Tensor:
    """Masked scores (B, Hkv, G, Sq, Sk) in the accumulation dtype; GQA groups broadcast over K."""
    b, h, sq, d = q.shape
    dtype = accumulation_dtype(q.dtype)
    qg = q.reshape(b, k.shape[1], h // k.shape[1], sq, d).to(dtype)
    scores = torch.matmul(qg, k.to(dtype).unsqueeze(2).transpose(-1, -2)) * scale
    if mask is not BlockMask.FULL:
        diagonal = 0 if mask is BlockMask.CAUSAL else -1
        allowed = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _probabilities(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse), with rows that see no key (LSE ``-inf``) all zero instead of NaN."""
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite.unsqueeze(-1))


def _math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _scores(q, k, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(_probabilities(scores, lse), v.to(scores.dtype).unsqueeze(2))
    return out.flatten(1, 2), lse.flatten(1, 2)


def _math_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, mask: BlockMask, scale: float) -> tuple[torch.Tensor, ...]:
    b, h, sq, d = q.shape
    hk = k.shape[1]
    scores = _scores(q, k, mask, scale)
    dtype = scores.dtype
    prob = _probabilities(scores, lse.view(b, hk, h // hk, sq).to(dtype))
    dout_g = dout.reshape(b, hk, h // hk, sq, d).to(dtype)
    delta = (dout_g * out.reshape(b, hk, h // hk, sq, d).to(dtype)).sum(-1, keepdim=True)
    dv = torch.matmul(prob.transpose(-1, -2), dout_g).sum(2)
    dscores = prob * (torch.matmul(dout_g, v.to(dtype).unsqueeze(2).transpose(-1, -2)) - delta) * scale
    dq = torch.matmul(dscores, k.to(dtype).unsqueeze(2)).flatten(1, 2)
    dk = torch.matmul(dscores.transpose(-1, -2), q.reshape(b, hk, h // hk, sq, d).to(dtype)).sum(2)
    return dq, dk, dv
