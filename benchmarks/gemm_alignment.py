"""16-bit GEMM throughput when one dimension is not a multiple of 8 elements (16 bytes), on a GPU.

An LM head over a vocabulary like GPT-2's 50257 has such a dimension: the logits' row length, which
is the output's leading dimension in the forward, the incoming gradient's in both backward GEMMs.
cuBLAS then cannot use its 16-byte-aligned tensor-core kernels at full rate (NVIDIA, "Matrix
Multiplication Background User's Guide", Tensor Core requirements); eager PyTorch runs it as is,
while Megatron pads the vocabulary and torch.compile pads the GEMM. For each shape the three GEMMs
of a linear layer (forward ``x @ W^T``, input gradient ``dY @ W``, weight gradient ``dY^T @ x``) are
timed with the odd dimension and padded up to a multiple of 64, and the ratio of achieved TFLOP/s
is reported (the hardware database keeps the rates as the GPU's ``unaligned_matmul_tflops``).

    python benchmarks/gemm_alignment.py --out benchmarks/results/gemm_alignment.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from gpu_breakdown import kernel_times  # device kernel time, calls back to back

SHAPES = [(4096, 2048, 50257), (8192, 2048, 50257), (4096, 4096, 50257), (8192, 1024, 50257), (4096, 2048, 32003)]
"""(tokens m, hidden k, vocabulary n): GPT-2/GPT-3 and a Llama-2-style vocabulary plus one."""


def linear_gemms(m: int, k: int, n: int, dtype: torch.dtype = torch.bfloat16, iters: int = 10) -> dict[str, float]:
    """Seconds of device kernel time of the three GEMMs of an (n x k) linear layer over m tokens, each
    run back to back (``gpu_breakdown.kernel_times``): forward ``x @ W^T``, input gradient ``dY @ W``,
    weight gradient ``dY^T @ x``."""
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    calls = {"forward": lambda: x @ w.t(), "input_grad": lambda: dy @ w, "weight_grad": lambda: dy.t() @ x}
    return {gemm: kernel_times(fn, iters)[0] / 1e3 for gemm, fn in calls.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for m, k, n in SHAPES:
        padded = -(-n // 64) * 64
        odd, even = linear_gemms(m, k, n, iters=args.iters), linear_gemms(m, k, padded, iters=args.iters)
        flops = 2.0 * m * k * n
        row = {"m": m, "k": k, "n": n, "n_padded": padded}
        for gemm in odd:
            row[gemm] = {"unaligned_tflops": flops / odd[gemm] / 1e12,
                         "padded_tflops": 2.0 * m * k * padded / even[gemm] / 1e12,
                         "ratio": (flops / odd[gemm]) / (2.0 * m * k * padded / even[gemm])}
        rows.append(row)
        print(f"m={m} k={k} n={n}: " + ", ".join(f"{g} {row[g]['unaligned_tflops']:.0f} vs "
                                                 f"{row[g]['padded_tflops']:.0f} TFLOP/s ({row[g]['ratio']:.2f})"
                                                 for g in odd), flush=True)
    ratios = [r[g]["ratio"] for r in rows for g in ("forward", "input_grad", "weight_grad")]
    result = {"command": "python benchmarks/gemm_alignment.py --out " + args.out,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "median_ratio": statistics.median(ratios),
              "min_ratio": min(ratios), "max_ratio": max(ratios)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio unaligned / padded: median {result['median_ratio']:.3f} (min {result['min_ratio']:.3f}, "
          f"max {result['max_ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
