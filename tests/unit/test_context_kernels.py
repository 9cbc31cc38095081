"""Block kernels with log-sum-exp, masks and merging of ring/striped attention, in one process.

``_simulated_ring`` runs the ring algorithm's arithmetic for all P ranks in a loop (the same
``ring_mask``, ``block_forward``, ``_merge`` and ``block_backward`` the autograd function uses,
without the p2p), so every kernel is checked against SDPA on CPU and, where CUDA is present,
the flash and memory-efficient paths too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from galvatron.runtime.context import shard_sequence, unshard_sequence
from galvatron.runtime.context_kernels import BlockMask, block_backward, block_forward, select_kernel
from galvatron.runtime.context_ring import _merge, ring_mask


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
               causal: bool) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         is_causal=causal)
    out.backward(dout.double())
    return out, q.grad, k.grad, v.grad


def _simulated_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, size: int, causal: bool,
                    striped: bool, kernel: str) -> tuple[torch.Tensor, ...]:
    kind = "striped" if striped else "ring"
    shard = [[shard_sequence(t, kind, r, size, dim=2) for r in range(size)] for t in (q, k, v, dout)]
    qs, ks, vs, douts = shard
    outs, lses = [], []
    for rank in range(size):
        out = lse = None
        for step in range(size):
            mask = ring_mask(step, rank, size, causal, striped)
            if mask is not None:
                src = (rank - step) % size
                out, lse = _merge(out, lse, *block_forward(qs[rank], ks[src], vs[src], mask, q.shape[-1] ** -0.5,
                                                           kernel))
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dqs = [torch.zeros_like(t, dtype=torch.float64) for t in qs]
    dks = [torch.zeros_like(t, dtype=torch.float64) for t in ks]
    dvs = [torch.zeros_like(t, dtype=torch.float64) for t in vs]
    for rank in range(size):
        for step in range(size):
            mask = ring_mask(step, rank, size, causal, striped)
            if mask is not None:
                src = (rank - step) % size
                dq, dk, dv = block_backward(douts[rank], qs[rank], ks[src], vs[src], outs[rank], lses[rank], mask,
                                            q.shape[-1] ** -0.5, kernel)
                dqs[rank] += dq
                dks[src] += dk
                dvs[src] += dv
    return tuple(unshard_sequence(parts, kind, dim=2) for parts in (outs, dqs, dks, dvs))


def _max_error(q: torch.Tensor, kv_heads: int, size: int, causal: bool, striped: bool, kernel: str) -> float:
    gen = torch.Generator(device=q.device).manual_seed(3)
    b, h, s, d = q.shape
    k, v = (torch.randn(b, kv_heads, s, d, generator=gen, device=q.device).to(q.dtype) for _ in range(2))
    dout = torch.randn(b, h, s, d, generator=gen, device=q.device).to(q.dtype)
    expected = _reference(q, k, v, dout, causal)
    actual = _simulated_ring(q, k, v, dout, size, causal, striped, kernel)
    return max(((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(actual, expected))


CASES = [(size, causal, striped, kv) for size in (1, 2, 4) for causal in (True, False) for striped in (False, True)
         for kv in (4, 2, 1)]


def test_math_kernel_is_the_cpu_path() -> None:
    assert select_kernel(torch.zeros(1, 1, 4, 8)) == "math"


@pytest.mark.parametrize(("size", "causal", "striped", "kv_heads"), CASES)
def test_simulated_ring_matches_sdpa_on_cpu(size: int, causal: bool, striped: bool, kv_heads: int) -> None:
    q = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert _max_error(q, kv_heads, size, causal, striped, "math") < 1e-12


def test_strict_mask_row_zero_sees_nothing() -> None:
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    out, lse = block_forward(q, q[:, :1], q[:, :1], BlockMask.STRICT, 0.5, "math")
    assert torch.isneginf(lse[:, :, 0]).all() and torch.isfinite(lse[:, :, 1:]).all()
    assert out[:, :, 0].abs().max().item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "dtype", "tol"), [("cudnn", torch.bfloat16, 2e-2), ("cudnn", torch.float16, 5e-3),
                                                      ("flash", torch.bfloat16, 2e-2), ("flash", torch.float16, 5e-3),
                                                      ("efficient", torch.float32, 1e-4),
                                                      ("efficient", torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("size", "causal", "striped", "kv_heads"), [c for c in CASES if c[0] != 2])
def test_simulated_ring_matches_sdpa_on_gpu(kernel: str, dtype: torch.dtype, tol: float, size: int, causal: bool,
                                            striped: bool, kv_heads: int) -> None:
    if kernel == "cudnn" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cuDNN block kernel runs on compute capability >= 9.0")
    q = torch.randn(2, 4, 256, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
    assert _max_error(q, kv_heads, size, causal, striped, kernel) < tol


@pytest.mark.gpu
def test_cudnn_then_flash_is_the_bf16_gpu_path() -> None:
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert select_kernel(torch.zeros(1, 1, 4, 64, device="cuda", dtype=torch.bfloat16)) == (
        "cudnn" if hopper else "flash")
    assert select_kernel(torch.zeros(1, 1, 4, 192, device="cuda", dtype=torch.bfloat16)) == "flash"
    assert select_kernel(torch.zeros(1, 1, 4, 64, device="cuda")) == "efficient"


@pytest.mark.gpu
@pytest.mark.parametrize("mask", list(BlockMask))
def test_cudnn_block_takes_any_layout(mask: BlockMask) -> None:
    """q/k/v as (B, S, H, D) memory viewed as (B, H, S, D), the layout attention modules hand over,
    and a merged output/gradient in yet another layout: the same results as contiguous inputs."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cuDNN block kernel runs on compute capability >= 9.0")
    gen = torch.Generator("cuda").manual_seed(5)
    q, k, v, dout = (torch.randn(2, 256, 4, 64, generator=gen, device="cuda").to(torch.bfloat16).transpose(1, 2)
                     for _ in range(4))
    out, lse = block_forward(q, k, v, mask, 0.125, "cudnn")
    ref_out, ref_lse = block_forward(*(t.contiguous() for t in (q, k, v)), mask, 0.125, "cudnn")
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    grads = block_backward(dout, q, k, v, out.contiguous(), lse, mask, 0.125, "cudnn")
    ref = block_backward(dout.contiguous(), *(t.contiguous() for t in (q, k, v)), ref_out, ref_lse, mask, 0.125,
                         "cudnn")
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
