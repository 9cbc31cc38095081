"""Predicted vs published iteration times of Megatron-LM runs on Selene (A100 80GB, NVLink 3, 8x HDR).

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), Table 3
configurations and Table 5 iteration times (full recompute without SP vs selective recompute + SP),
plus §6.3's 530B run with 8-way data parallelism (39.15 s, gradient all-reduce not overlapped).
The software options are what the paper states: no flash attention (2022), dropout, no overlap of
the gradient all-reduce. Run: ``python benchmarks/fidelity_megatron.py``.
"""

from __future__ import annotations

import sys

from galvatron import ModelSpec, Plan
from galvatron.strategies.cost import CostOptions, cost_plan
from galvatron.strategies.hardware import load_cluster

# name, hidden, layers, heads, tp, pp, virtual stages, global batch, micro-batch, dp, recompute+SP s, full s
RUNS = [
    ("22B", 6144, 48, 64, 8, 1, 1, 4, 4, 1, 1.10, 1.42),
    ("175B", 12288, 96, 96, 8, 8, 3, 64, 1, 1, 13.75, 18.13),
    ("530B", 20480, 105, 128, 8, 35, 3, 280, 1, 1, 37.83, 49.05),
    ("1T", 25600, 128, 160, 8, 64, 1, 512, 1, 1, 71.49, 94.42),
    ("530B-dp8", 20480, 105, 128, 8, 35, 3, 2240, 1, 8, 39.15, None),
]
OPTIONS = CostOptions(flash_attention=False, dropout=True, overlap_grad_reduce=False, overlap_param_gather=False)


def gpt(hidden: int, layers: int, heads: int) -> ModelSpec:
    return ModelSpec.from_config({"name": f"gpt-{hidden}", "layers": layers, "hidden": hidden, "heads": heads,
                                  "vocab": 51200, "seq_len": 2048, "activation": "gelu", "norm": "layernorm",
                                  "bias": True, "position": "learned"})


def main() -> int:
    errors = []
    print(f"{'run':10} {'mode':22} {'published s':>11} {'predicted s':>11} {'error':>7} {'peak GiB':>8}")
    for name, h, layers, heads, tp, pp, v, gbs, mbs, dp, t_sel, t_full in RUNS:
        spec = gpt(h, layers, heads)
        cluster = load_cluster("selene", nodes=tp * pp * dp // 8)
        for mode, sp, rc, published in (("selective+SP", True, "selective", t_sel), ("full recompute", False, "full", t_full)):
            if published is None:
                continue
            plan = Plan.uniform(layers, global_batch_size=gbs, num_micro_batches=gbs // (mbs * dp), pp=pp,
                                virtual_stages=v, schedule="interleaved-1f1b" if v > 1 else "1f1b",
                                dp=dp, tp=tp, sp=sp, recompute=rc)
            cost = cost_plan(plan, spec, cluster, OPTIONS)
            err = cost.step_time_s / published - 1
            errors.append(err)
            print(f"{name:10} {mode:22} {published:11.2f} {cost.step_time_s:11.2f} {err:+7.1%} {cost.peak_memory_gib:8.1f}")
    mae = sum(abs(e) for e in errors) / len(errors)
    print(f"\niteration time: mean absolute error {mae:.1%}, max {max(abs(e) for e in errors):.1%}, "
          f"mean signed {sum(errors) / len(errors):+.1%} over {len(errors)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
