"""Predicted vs published iteration times of Megatron-LM runs on Selene (A100 80GB, NVLink 3, 8x HDR).

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), Table 3
configurations and Table 5 iteration times (full recompute without SP vs selective recompute + SP),
plus §6.3's 530B run with 8-way data parallelism (39.15 s, gradient all-reduce not overlapped).
The software options are what the paper states: no flash attention (2022), dropout, no overlap of
the gradient all-reduce. Run: ``python benchmarks/fidelity_megatron.py``; writes
``benchmarks/results/fidelity_megatron.json`` and ``.md``, with the errors of the model before the
physics changes of issue #3 (``BEFORE``, measured at commit 7a4f10e with this same script) beside them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from galvatron.strategies.cost import CostOptions, cost_plan
from galvatron.strategies.hardware import load_cluster

from galvatron import ModelSpec, Plan

# name, hidden, layers, heads, tp, pp, virtual stages, global batch, micro-batch, dp, recompute+SP s, full s
RUNS = [
    ("22B", 6144, 48, 64, 8, 1, 1, 4, 4, 1, 1.10, 1.42),
    ("175B", 12288, 96, 96, 8, 8, 3, 64, 1, 1, 13.75, 18.13),
    ("530B", 20480, 105, 128, 8, 35, 3, 280, 1, 1, 37.83, 49.05),
    ("1T", 25600, 128, 160, 8, 64, 1, 512, 1, 1, 71.49, 94.42),
    ("530B-dp8", 20480, 105, 128, 8, 35, 3, 2240, 1, 8, 39.15, None),
]
# Predicted seconds of the model before issue #3's physics changes (commit 7a4f10e), same runs and options.
BEFORE = {("22B", "selective+SP"): 0.92, ("22B", "full recompute"): 1.35, ("175B", "selective+SP"): 11.38,
          ("175B", "full recompute"): 16.42, ("530B", "selective+SP"): 31.97, ("530B", "full recompute"): 44.44,
          ("1T", "selective+SP"): 63.09, ("1T", "full recompute"): 87.00, ("530B-dp8", "selective+SP"): 32.59}
SOURCE = ("Korthikanti et al. 2022, Reducing Activation Recomputation in Large Transformer Models, "
          "Table 3 (configurations) and Table 5 (iteration times), §6.3 (530B with data parallelism 8)")
OUT = Path(__file__).parent / "results"
# Extra check points, reported beside (not in) the Megatron error: torchtitan docs/performance.md (pytorch/torchtitan,
# "Llama 3 performance numbers"): FSDP2 on 64 A100 80GB, local batch 1 at 8192 tokens, eager PyTorch.
# model, recompute (8B: selective op AC, 70B: full AC), published tokens/s per GPU
TORCHTITAN = [("llama3-8b", "selective", 2973), ("llama3-70b", "full", 331)]
TORCHTITAN_SOURCE = "pytorch/torchtitan docs/performance.md, Llama 3 on 64 A100 80GB with FSDP2 (local batch 1)"
# Megatron-LM keeps a contiguous gradient buffer for the whole step (persistent_grads)
# Megatron keeps 16-bit parameters with fp32 copies in the optimizer and recomputes the attention core
OPTIONS = CostOptions(flash_attention=False, dropout=True, overlap_grad_reduce=False, overlap_param_gather=False,
                      persistent_grads=True, master_weights="optimizer", selective="megatron")
TITAN_OPTIONS = CostOptions(selective="torchtitan")  # torchtitan's per-op AC: every other GEMM output kept


def gpt(hidden: int, layers: int, heads: int) -> ModelSpec:
    return ModelSpec.from_config({"name": f"gpt-{hidden}", "layers": layers, "hidden": hidden, "heads": heads,
                                  "vocab": 51200, "seq_len": 2048, "activation": "gelu", "norm": "layernorm",
                                  "bias": True, "position": "learned"})


def main() -> int:
    rows = []
    print(f"{'run':10} {'mode':22} {'published s':>11} {'predicted s':>11} {'error':>7} {'before':>7} {'peak GiB':>8}")
    for name, h, layers, heads, tp, pp, v, gbs, mbs, dp, t_sel, t_full in RUNS:
        spec = gpt(h, layers, heads)
        cluster = load_cluster("selene", nodes=tp * pp * dp // 8)
        modes = (("selective+SP", True, "selective", t_sel), ("full recompute", False, "full", t_full))
        for mode, sp, rc, published in modes:
            if published is None:
                continue
            plan = Plan.uniform(layers, global_batch_size=gbs, num_micro_batches=gbs // (mbs * dp), pp=pp,
                                virtual_stages=v, schedule="interleaved-1f1b" if v > 1 else "1f1b",
                                dp=dp, tp=tp, sp=sp, recompute=rc)
            cost = cost_plan(plan, spec, cluster, OPTIONS)
            before = BEFORE[name, mode] / published - 1
            row = {"run": name, "mode": mode, "gpus": tp * pp * dp, "tp": tp, "pp": pp, "vpp": v, "dp": dp,
                   "global_batch": gbs, "micro_batch": mbs, "published_s": published,
                   "predicted_s": cost.step_time_s, "error": cost.step_time_s / published - 1,
                   "error_before": before, "peak_memory_gib": cost.peak_memory_gib}
            rows.append(row)
            print(f"{name:10} {mode:22} {published:11.2f} {cost.step_time_s:11.2f} {row['error']:+7.1%} "
                  f"{before:+7.1%} {cost.peak_memory_gib:8.1f}")
    summary = {key: {"mae": sum(abs(r[key]) for r in rows) / len(rows), "max": max(abs(r[key]) for r in rows),
                     "mean_signed": sum(r[key] for r in rows) / len(rows)} for key in ("error", "error_before")}
    now, then = summary["error"], summary["error_before"]
    print(f"\niteration time: mean absolute error {now['mae']:.1%} (before {then['mae']:.1%}), max {now['max']:.1%} "
          f"(before {then['max']:.1%}), mean signed {now['mean_signed']:+.1%} over {len(rows)} runs")
    extra = _torchtitan()
    command = "python benchmarks/fidelity_megatron.py"
    (OUT / "fidelity_megatron.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "source": SOURCE, "cluster": "selene (A100 80GB, "
         "NVLink3, 8 HDR NICs per node)", "cost_options": str(OPTIONS), "summary": summary, "runs": rows,
         "extra_source": TORCHTITAN_SOURCE, "extra": extra},
        indent=2) + "\n")
    lines = [f"# Predicted vs published Megatron-LM iteration times\n\n`{command}` ({time.strftime('%Y-%m-%d')}). "
             f"Source: {SOURCE}.\n", "| run | mode | GPUs | published s | predicted s | error | before #3 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['mode']} | {r['gpus']} | {r['published_s']:.2f} | {r['predicted_s']:.2f} | "
              f"{r['error']:+.1%} | {r['error_before']:+.1%} |" for r in rows]
    lines.append(f"\nMean absolute error {now['mae']:.1%} (before {then['mae']:.1%}), max {now['max']:.1%} "
                 f"(before {then['max']:.1%}), mean signed {now['mean_signed']:+.1%}.\n")
    lines += [f"Extra check points ({TORCHTITAN_SOURCE}; 64xA100-80GB cluster preset, "
              "`CostOptions(selective='torchtitan')`):\n",
              "| model | recompute | published tok/s/GPU | predicted | error |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['recompute']} | {r['published_tokens_per_s_per_gpu']} | "
              f"{r['predicted_tokens_per_s_per_gpu']:.0f} | {r['error']:+.1%} |" for r in extra]
    (OUT / "fidelity_megatron.md").write_text("\n".join(lines) + "\n")
    return 0


def _torchtitan() -> list[dict]:
    """torchtitan's FSDP2 runs: throughput per GPU predicted vs published (error > 0: too optimistic)."""
    out = []
    cluster = load_cluster("64xA100-80GB")
    for model, recompute, published in TORCHTITAN:
        spec = ModelSpec.from_config(model)
        plan = Plan.uniform(spec.num_blocks, global_batch_size=64, num_micro_batches=1, dp=64, zero=3,
                            recompute=recompute)
        tps = cost_plan(plan, spec, cluster, TITAN_OPTIONS).tokens_per_s / 64
        out.append({"model": model, "recompute": recompute, "gpus": 64, "published_tokens_per_s_per_gpu": published,
                    "predicted_tokens_per_s_per_gpu": tps, "error": tps / published - 1})
        print(f"torchtitan {model:11} {recompute:9} published {published} tok/s/GPU, predicted {tps:.0f} "
              f"({tps / published - 1:+.1%})")
    return out


if __name__ == "__main__":
    sys.exit(main())
