"""FP8 GEMMs with fast and with split accumulation, side by side on one GPU.

Transformer Engine runs the forward GEMM of an FP8 linear layer with Hopper's fast accumulation
(``_2X_ACC_FPROP = False`` in ``transformer_engine/pytorch/module/base.py``: partial sums stay in the
tensor cores' reduced-precision accumulator) and the input- and weight-gradient GEMMs with split
accumulation (``_2X_ACC_DGRAD = _2X_ACC_WGRAD = True``: partial sums promoted to fp32 every few
k-steps). ``torch._scaled_mm`` exposes the same choice (``use_fast_accum``). This script times both for
the GEMM shapes of the FP8 runs in ``benchmarks/fidelity_fp8.py`` (forward shapes, e4m3 operands,
per-tensor scales, bf16 output), each pair in alternating blocks so that both see the same clocks,
and writes the ratio the cost model's forward FP8 GEMMs take (``fp8_fast_accumulation`` in the
GPU's hardware entry).

    python benchmarks/fp8_accumulation.py --out benchmarks/results/fp8_accumulation.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from sustained_clocks import _time_calls  # CUDA-event time per call

# (label, rows m, outputs n, inputs k): forward GEMMs of the FP8 check points at their micro-batch rows
SHAPES = [
    ("llama2-7b qkv", 4096, 12288, 4096), ("llama2-7b out", 4096, 4096, 4096),
    ("llama2-7b gate+up", 4096, 22016, 4096), ("llama2-7b down", 4096, 4096, 11008),
    ("llama3-8b qkv (cp2)", 4096, 6144, 4096), ("llama3-8b gate+up", 8192, 28672, 4096),
    ("llama3-8b down", 8192, 4096, 14336),
    ("llama3-70b tp4 qkv", 8192, 2560, 8192), ("llama3-70b tp4 out", 8192, 8192, 2048),
    ("llama3-70b tp4 gate+up", 8192, 14336, 8192), ("llama3-70b tp4 down", 8192, 8192, 7168),
    ("405b tp8 cp2 qkv", 4096, 2304, 16384), ("405b tp8 cp2 gate+up", 4096, 13312, 16384),
    ("405b tp8 cp2 down", 4096, 16384, 6656),
    ("gpt3-5b mbs4 fc1", 8192, 16384, 4096), ("nemotron-22b tp2 fc1", 8192, 12288, 6144),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--iters", type=int, default=40, help="GEMMs per timed block")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per accumulation mode")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("fp8_accumulation: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    one = torch.ones((), device=dev)
    rows = []
    for label, m, n, k in SHAPES:
        a = (torch.randn(m, k, device=dev) * 0.5).to(torch.float8_e4m3fn)
        b = (torch.randn(n, k, device=dev) * 0.5).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        times: dict[bool, list[float]] = {False: [], True: []}
        for fast in (False, True):  # warm-up, and a check that both run
            for _ in range(5):
                torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast)
        torch.cuda.synchronize()
        for _ in range(args.blocks):
            for fast in (False, True):
                def gemm(a=a, b=b, fast=fast):
                    return torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16, use_fast_accum=fast)

                times[fast].append(_time_calls(gemm, args.iters))
        split, fast = statistics.median(times[False]), statistics.median(times[True])
        flops = 2.0 * m * n * k
        row = {"gemm": label, "m": m, "n": n, "k": k, "split_tflops": flops / split / 1e12,
               "fast_tflops": flops / fast / 1e12, "fast_over_split": split / fast}
        rows.append(row)
        print(f"{label:26} {m:6d} {n:6d} {k:6d}  split {row['split_tflops']:7.1f}  fast {row['fast_tflops']:7.1f}  "
              f"x{row['fast_over_split']:.3f}")
    kernels = _quantize_kernels(torch, dev, args.iters)
    weights = [2.0 * r["m"] * r["n"] * r["k"] for r in rows]
    ratio = sum(w * r["fast_over_split"] for w, r in zip(weights, rows, strict=True)) / sum(weights)
    median = statistics.median(r["fast_over_split"] for r in rows)
    print(f"FLOP-weighted fast / split rate: {ratio:.3f}; median {median:.3f}")
    result = {"command": "python benchmarks/fp8_accumulation.py --out ...", "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "iters": args.iters,
              "blocks": args.blocks, "flop_weighted_fast_over_split": ratio, "gemms": rows,
              "quantize_kernels": kernels}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return 0


def _quantize_kernels(torch: object, dev: object, iters: int) -> list[dict]:
    """The memory-bound kernels an FP8 linear needs, as PyTorch runs them one op at a time (Transformer
    Engine fuses some: a cast with its transpose, a norm with its cast): bytes moved over time, for the
    cost model's HBM efficiency of memory-bound kernels (``memory_efficiency``)."""
    out = []
    for m, k in ((8192, 4096), (8192, 14336), (4096, 16384)):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        x8 = x.to(torch.float8_e4m3fn)
        ops = {"cast bf16->e4m3 (read 2, write 1)": (lambda x=x: x.to(torch.float8_e4m3fn), 3),
               "transpose e4m3 (read 1, write 1)": (lambda x8=x8: x8.t().contiguous(), 2),
               "amax of bf16 (read 2)": (lambda x=x: torch.linalg.vector_norm(x, float("inf")), 2)}
        for name, (fn, per_elem) in ops.items():
            for _ in range(3):
                fn()
            t = _time_calls(fn, iters)
            row = {"op": name, "m": m, "k": k, "seconds": t, "gbps": per_elem * m * k / t / 1e9}
            out.append(row)
            print(f"{name:36} {m:6d} x {k:6d}  {t * 1e6:8.1f} us  {row['gbps']:7.0f} GB/s")
    return out


if __name__ == "__main__":
    sys.exit(main())
