"""Measured vs predicted causal attention time on one GPU (the cost model's attention term).

``F.scaled_dot_product_attention`` (PyTorch's default backend choice: cuDNN on an H100 with torch
2.11) in bf16, causal, with q/k/v laid out as attention modules hand them over ((B, S, H, D) memory
viewed as (B, H, S, D)), for the attention shapes of the models the benchmarks train, forward and
forward + backward, against ``DatasheetPerf.attention_time`` for the GPU in the hardware database.
FLOPs as the cost model counts them (FlashAttention-2 convention): forward ``4 B S^2 H D / 2``,
backward 2.5x.

    python benchmarks/attention_rates.py --out benchmarks/results/attention_rates.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from galvatron.strategies.cost import DatasheetPerf
from galvatron.strategies.hardware import load_cluster
from gpu_breakdown import timed  # median milliseconds over CUDA events

CASES = [  # (name, batch, seq, heads, kv heads, head dim)
    ("gpt-2b", 2, 4096, 32, 32, 128),
    ("gpt-1.4b", 8, 2048, 16, 16, 128),
    ("gpt3-1.3b mb2", 2, 2048, 16, 16, 128),
    ("gpt3-1.3b mb8 s512", 8, 512, 16, 16, 128),
    ("llama3.2-1b mb2", 2, 2048, 32, 8, 64),
    ("llama3-8b s8192", 2, 8192, 32, 8, 128),
    ("long 16k", 1, 16384, 32, 8, 128),
    ("long 64k", 1, 65536, 32, 8, 128),
]


def _measure(b: int, s: int, h: int, kv: int, d: int) -> tuple[float, float]:
    """(forward, forward + backward) seconds."""
    def make(heads: int) -> torch.Tensor:
        return torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    q, k, v = make(h), make(kv), make(kv)
    grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)

    def both() -> None:
        forward().backward(grad)

    return timed(forward) / 1e3, timed(both) / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--gpu", default="H100-SXM", help="hardware database entry to predict with")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    perf = DatasheetPerf(load_cluster({"gpu": args.gpu, "gpus_per_node": 1, "nodes": 1, "name": "one"}))
    rows = []
    for name, b, s, h, kv, d in CASES:
        fwd, total = _measure(b, s, h, kv, d)
        flops = 4.0 * b * s * s * h * d / 2
        pred_f, pred_b = perf.attention_time(flops, False), perf.attention_time(2.5 * flops, True)
        rows.append({"case": name, "batch": b, "seq": s, "heads": h, "kv_heads": kv, "head_dim": d,
                     "forward_s": fwd, "backward_s": total - fwd, "forward_tflops": flops / fwd / 1e12,
                     "backward_tflops": 2.5 * flops / (total - fwd) / 1e12, "predicted_forward_s": pred_f,
                     "predicted_backward_s": pred_b, "error": (pred_f + pred_b) / total - 1})
        r = rows[-1]
        print(f"{name}: forward {r['forward_tflops']:.0f} TFLOP/s, backward {r['backward_tflops']:.0f} TFLOP/s; "
              f"predicted {r['error']:+.1%} (fwd+bwd)", flush=True)
    result = {"command": f"python benchmarks/attention_rates.py --out {args.out}",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "gpu_in_database": args.gpu,
              "rows": rows, "median_error": statistics.median(r["error"] for r in rows)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"predicted / measured - 1, median {result['median_error']:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
