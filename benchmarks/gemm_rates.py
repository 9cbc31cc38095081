"""Measured vs predicted time of a transformer block's GEMMs on one GPU (the cost model's GEMM term).

For each model, the block's GEMMs as the cost model lists them (``strategies.cost.layer._block_gemms``:
QKV, attention output, MLP up and down; the LM head too) are timed in bf16 three ways, as a linear
layer runs them: forward ``x @ W^T``, input gradient ``dY @ W``, weight gradient ``dY^T @ x`` (fp32
accumulation into the weight gradient is not included: eager PyTorch writes a 16-bit gradient), and
compared with ``DatasheetPerf.gemm_time`` for the GPU in the hardware database.

    python benchmarks/gemm_rates.py --out benchmarks/results/gemm_rates.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from galvatron.strategies.cost import DatasheetPerf
from galvatron.strategies.cost.layer import _block_gemms
from gemm_alignment import linear_gemms  # the three GEMMs of a linear layer, timed
from gpu_breakdown import one_gpu_benchmark

from galvatron import ModelSpec
from galvatron.plan import LayerStrategy

CASES = [  # (name, model config, tokens per step)
    ("gpt-2b", {"name": "gpt-2b", "layers": 8, "hidden": 4096, "heads": 32, "vocab": 50304, "seq_len": 4096,
                "activation": "gelu", "norm": "layernorm"}, 8192),
    ("gpt-1.4b", {"name": "gpt-1.4b", "layers": 24, "hidden": 2048, "heads": 16, "vocab": 50304, "seq_len": 2048,
                  "activation": "gelu", "norm": "layernorm"}, 16384),
    ("llama3.2-1b", "llama3.2-1b", 4096),
]


def _predict(perf: DatasheetPerf, m: int, n: int, k: int) -> dict[str, float]:
    return {"forward": perf.gemm_time(m, n, k, "bf16"), "input_grad": perf.gemm_time(m, k, n, "bf16"),
            "weight_grad": perf.gemm_time(k, n, m, "bf16")}


def main(argv: list[str] | None = None) -> int:
    setup = one_gpu_benchmark(__doc__, argv)
    if setup is None:
        return 2
    args, perf = setup
    rows = []
    for name, config, tokens in CASES:
        spec = ModelSpec.from_config(config)
        gemms = [(int(m), int(n), int(k)) for m, n, k, _ in _block_gemms(spec.blocks[0], LayerStrategy(), tokens)]
        gemms.append((tokens, spec.vocab, spec.hidden))
        for m, n, k in gemms:
            measured, predicted = linear_gemms(m, k, n), _predict(perf, m, n, k)
            for gemm in measured:
                rows.append({"model": name, "m": m, "n": n, "k": k, "gemm": gemm, "measured_s": measured[gemm],
                             "predicted_s": predicted[gemm], "measured_tflops": 2 * m * n * k / measured[gemm] / 1e12,
                             "error": predicted[gemm] / measured[gemm] - 1})
            print(f"{name} {m}x{n}x{k}: " + ", ".join(
                f"{g} {2 * m * n * k / measured[g] / 1e12:.0f} TFLOP/s (pred {predicted[g] / measured[g] - 1:+.1%})"
                for g in measured), flush=True)
    errors = [r["error"] for r in rows]
    total_m, total_p = sum(r["measured_s"] for r in rows), sum(r["predicted_s"] for r in rows)
    result = {"command": f"python benchmarks/gemm_rates.py --out {args.out}", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "gpu_in_database": args.gpu, "rows": rows,
              "median_error": statistics.median(errors), "mean_abs_error": statistics.mean(abs(e) for e in errors),
              "total_error": total_p / total_m - 1}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"predicted / measured - 1: median {result['median_error']:+.1%}, mean abs {result['mean_abs_error']:.1%}, "
          f"summed over all GEMMs {result['total_error']:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
