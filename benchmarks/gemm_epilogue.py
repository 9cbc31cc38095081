"""What a GEMM's output costs on this GPU: 16-bit output, fp32 output, and fp32 accumulation into an
existing gradient (Megatron's ``gradient_accumulation_fusion``: the weight-gradient GEMM reads and
writes a fp32 ``main_grad``), for the per-rank GEMMs of tensor-parallel transformer blocks.

The cost model's GEMM term adds the output's bytes at the HBM rate after the FLOPs (a serial
epilogue, ``DatasheetPerf.gemm_time``); back-to-back kernel times on an H100 run faster than that for
16-bit outputs (``benchmarks/results/gemm_rates.json``), while the fused Megatron runs the model is
checked against need it. This times the three output modes of each weight-gradient GEMM, and the
forward and input-gradient GEMMs, as device kernel time (``gpu_breakdown.kernel_times``), next to
the model's prediction for 2-byte and 8-byte (read + write fp32) outputs.

    python benchmarks/gemm_epilogue.py --out benchmarks/results/gemm_epilogue.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from gpu_breakdown import kernel_times, one_gpu_benchmark

# (name, tokens per micro-batch on the rank's GEMMs, hidden, tensor-parallel degree): Korthikanti et al.
# 2022 Table 3 (seq 2048; 22B micro-batch 4, the others 1; TP 8), Mixtral 8x22B's attention (TP 2, seq 4096),
# our 1.4B GPT (no TP, 8 x 2048 tokens)
CASES = [("22B tp8", 8192, 6144, 8), ("175B tp8", 2048, 12288, 8), ("530B tp8", 2048, 20480, 8),
         ("1T tp8", 2048, 25600, 8), ("mixtral-8x22b attn tp2", 4096, 6144, 2), ("gpt-1.4b", 16384, 2048, 1)]


def linears(hidden: int, tp: int) -> list[tuple[str, int, int]]:
    """(name, in, out) of a GELU block's linear layers on one tensor-parallel rank."""
    return [("qkv", hidden, 3 * hidden // tp), ("proj", hidden // tp, hidden), ("fc1", hidden, 4 * hidden // tp),
            ("fc2", 4 * hidden // tp, hidden)]


def main(argv: list[str] | None = None) -> int:
    setup = one_gpu_benchmark(__doc__, argv)
    if setup is None:
        return 2
    args, perf = setup
    bf16, fp32 = torch.bfloat16, torch.float32
    rows = []
    for case, tokens, hidden, tp in CASES:
        for name, d_in, d_out in linears(hidden, tp):
            x = torch.randn(tokens, d_in, device="cuda", dtype=bf16)
            w = torch.randn(d_out, d_in, device="cuda", dtype=bf16)
            dy = torch.randn(tokens, d_out, device="cuda", dtype=bf16)
            main_grad = torch.randn(d_out, d_in, device="cuda", dtype=fp32)
            calls = {
                "forward": lambda x=x, w=w: x @ w.t(),
                "input_grad": lambda dy=dy, w=w: dy @ w,
                "wgrad_bf16": lambda dy=dy, x=x: dy.t() @ x,
                "wgrad_fp32_out": lambda dy=dy, x=x: torch.mm(dy.t(), x, out_dtype=fp32),
                "wgrad_fp32_accumulate": lambda dy=dy, x=x, g=main_grad: torch.addmm(g, dy.t(), x, out_dtype=fp32),
            }
            m_n_k = {"forward": (tokens, d_out, d_in), "input_grad": (tokens, d_in, d_out)}
            row = {"case": case, "linear": name, "tokens": tokens, "in": d_in, "out": d_out}
            for gemm, fn in calls.items():
                try:
                    ms = kernel_times(fn, 10)[0]
                except (RuntimeError, TypeError) as err:
                    row[gemm] = {"error": str(err).splitlines()[0][:160]}
                    continue
                m, n, k = m_n_k.get(gemm, (d_out, d_in, tokens))
                out_bytes = {"wgrad_fp32_out": 4, "wgrad_fp32_accumulate": 8}.get(gemm, 2)
                row[gemm] = {"ms": ms, "tflops": 2.0 * m * n * k / ms / 1e9,
                             "predicted_ms": perf.gemm_time(m, n, k, "bf16", out_bytes=out_bytes) * 1e3}
            rows.append(row)
            print(f"{case} {name}: " + ", ".join(
                f"{g} {r['tflops']:.0f} TFLOP/s (pred {r['predicted_ms'] / r['ms'] - 1:+.0%})"
                for g, r in row.items() if isinstance(r, dict) and "ms" in r), flush=True)
            del x, w, dy, main_grad
    summary = {}
    for gemm in ("forward", "input_grad", "wgrad_bf16", "wgrad_fp32_out", "wgrad_fp32_accumulate"):
        errs = [r[gemm]["predicted_ms"] / r[gemm]["ms"] - 1 for r in rows if "ms" in r.get(gemm, {})]
        if errs:
            summary[gemm] = {"median_error": statistics.median(errs), "n": len(errs)}
    print(json.dumps(summary, indent=1))
    args.out.write_text(json.dumps({"command": f"python benchmarks/gemm_epilogue.py --out {args.out}",
                                    "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__, "gpu_in_database": args.gpu, "rows": rows,
                                    "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
