"""Predicted vs published BF16 and FP8 step times of NVIDIA's DGX Cloud benchmarking recipes on H100.

``NVIDIA/dgxc-benchmarking`` publishes, per model and NeMo container, the seconds per training step of one
recipe in BF16 and in FP8 at 8 to 2304 H100 GPUs (weak scaling: the global batch grows with the GPUs), with
the launch scripts that ran it. The rows here are its NeMo 1.0 tables (step time of the last of 50 steps):
Llama 3.1 8B, 70B and 405B (containers 24.09 and 24.12; the 405B below 576 GPUs is the README's proxy with
fewer layers), Nemotron-4 15B (24.09, 24.12) and 340B (24.09), Grok-1 314B (MoE, 24.12, its full-size runs
from 512 GPUs), GPT-3 175B (24.05; its 24.12 rows are listed but not scored: the README says 12 virtual
stages and the configuration shipped with it 6).

Recipes: each model's ``launch.sh`` / ``configure.sh`` (overrides and environment) and the configuration it
names, at the commits ``RECIPES`` cites: the attention backend each launch script exports
(``NVTE_FUSED_ATTN=1``: cuDNN's fused attention for Llama 3.1 and Nemotron-4 15B; ``0``: FlashAttention-2
for Nemotron-4 340B and GPT-3), FP8 with Transformer Engine's delayed scaling and FP8 parameters
(``+model.fp8_params=$FP8``), sequence parallelism with userbuffers TP overlap where TP > 1, Megatron's
overlapped pipeline handoffs for interleaved schedules, the distributed optimizer. The Llama 3.1 NeMo 1.0
configurations themselves are not stored; their recomputation (none), TP overlap and gradient dtype are
NeMo-Framework-Launcher's ``llama3_1_*.yaml`` defaults (inferred), the layout the README's.

Error > 0: the prediction is faster than published. Also compared: the FP8 speed-up over BF16 of the same
recipe at the same scale, published and predicted, which shares every recipe fact but the precision.

    python benchmarks/fidelity_dgxc.py     # writes benchmarks/results/fidelity_dgxc.json and .md
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from fidelity_fp8 import MEGATRON, UB, gpt3, llama, nemotron
from galvatron.strategies.cost import CostOptions, cost_plan
from galvatron.strategies.hardware import load_cluster

from galvatron import ModelSpec, Plan

OUT = Path(__file__).parent / "results"
REPO = "NVIDIA/dgxc-benchmarking"
SOURCE = (f"{REPO}: llama3.1/README_{{8b,70b,405b}}.md @143b90d (24.09) and @8f5cbb3 (24.12), "
          "nemotron/README_15b.md @143b90d / @8f5cbb3, nemotron/README_340b.md @35a9aec (24.09), "
          "nemo_megatron/README_175b.md @35a9aec (24.05) and @8f5cbb3 (24.12)")
DELAYED_FP8_PARAMS = {"fp8_scaling": "delayed", "fp8_params": True}  # applies to FP8 rows only
CUDNN = {"attention_kernel": None}  # the H100's default in the database: cuDNN's fused attention
FLASH2 = {"attention_kernel": "flash2"}
P2P = {"overlap_p2p": True}

# model -> (spec config, tp, pp, cp, vp, micro-batch, recompute, options, recipe)
RECIPES = {
    "llama3.1-8b": (llama(32, 4096, 32, 8, 14336, 128256, 8192, 1), 1, 1, 2, 1, 1, "none",
                    {**MEGATRON, **CUDNN, **DELAYED_FP8_PARAMS},
                    "llama3.1/launch.sh, configure.sh @143b90d (NVTE_FUSED_ATTN=1, +model.fp8_params=$FP8); "
                    "TP1 PP1 CP2, no SP (inferred from the launcher's llama3_1_8b.yaml)"),
    "llama3.1-70b": (llama(80, 8192, 64, 8, 28672, 128256, 8192, 4), 4, 4, 2, 5, 1, "none",
                     {**MEGATRON, **CUDNN, **DELAYED_FP8_PARAMS, **UB, **P2P},
                     "as 8B; TP4 PP4 CP2 VP5 (README), SP, userbuffers TP overlap and overlap_p2p_comm "
                     "(inferred from llama3_1_70b.yaml, whose VP is 10)"),
    "llama3.1-405b": (llama(126, 16384, 128, 8, 53248, 50257, 8192, 8), 8, 9, 2, 7, 1, "none",
                      {**MEGATRON, **CUDNN, **DELAYED_FP8_PARAMS, **UB, **P2P},
                      "as 70B; TP8 PP9 CP2 VP7, GPT-2 BPE as proxy tokenizer (README), ub_cfg_h100_*_h16384_tp8_cp2 "
                      "(inferred); proxies with 7 / 21 / 42 layers below 576 GPUs"),
    "nemotron4-15b": (nemotron(32, 6144, 48, 8, 4), 4, 1, 1, 1, 4, "none",
                      {**MEGATRON, **CUDNN, **DELAYED_FP8_PARAMS, **UB},
                      "nemotron/configure.sh @8f5cbb3 (NVTE_FUSED_ATTN=1 for 15B, SP, ub_tp_comm_overlap), "
                      "nemotron4-15b-synth.yaml (no recompute, mcore distributed optimizer)"),
    "nemotron4-340b": (nemotron(96, 18432, 96, 8, 8), 8, 8, 1, 12, 1, "selective",
                       {**MEGATRON, **FLASH2, **DELAYED_FP8_PARAMS, **UB, **P2P, "grad_bytes": 2},
                       "nemotron/configure.sh @35a9aec (NVTE_FUSED_ATTN=0, SP, TP overlap, overlap_p2p_comm), "
                       "nemotron4-340b-synth.yaml (selective recompute, grad_sync_dtype bf16)"),
    "grok1-314b": ({**llama(64, 6144, 48, 8, 32768, 128256, 8192, 4),
                    "moe": {"experts": 8, "top_k": 2, "ffn_hidden": 32768}}, 4, 8, 2, 8, 1, "none",
                   {**MEGATRON, **FLASH2, **DELAYED_FP8_PARAMS, **UB, **P2P, "grad_bytes": 2,
                    "moe_grouped_gemm": False, "moe_capacity_factor": 1.0},
                   "grok1/configure.sh @8f5cbb3 (NVTE_FUSED_ATTN=0, SP, TP overlap, model.fp8_params), grok1_314b.yaml "
                   "@35a9aec (8 experts top-2, GeGLU costed as SwiGLU, no grouped GEMM, alltoall dispatcher padded to "
                   "capacity 1.0, overlap_p2p_comm, grad_sync_dtype bf16); experts split over TP (inferred)"),
    "gpt3-175b": (gpt3(96, 12288, 96, 4), 4, 8, 1, 12, 1, "none",
                  {**MEGATRON, **FLASH2, **DELAYED_FP8_PARAMS, **UB, **P2P, "grad_bytes": 2, "dropout": True},
                  "nemo_megatron/configure.sh @143b90d (NVTE_FUSED_ATTN=0), gpt3_175b_hydra.yaml @35a9aec (VP12, "
                  "dropout 0.1, no recompute, inline userbuffers config, overlap_p2p_comm, grad_sync_dtype bf16)"),
}
# (model, container, scored, GPUs -> global batch, {GPUs: (BF16 s, FP8 s)}); 405B proxies: {GPUs: layers, pp}
TABLES = [
    ("llama3.1-8b", "24.09", True, lambda g: 16 * g,
     {8: (12.91, 9.67), 16: (13.00, 9.73), 32: (13.05, 9.75), 64: (13.08, 9.80), 128: (13.10, 9.82)}),
    ("llama3.1-8b", "24.12", True, lambda g: 16 * g,
     {8: (12.78, 9.44), 16: (12.99, 9.47), 32: (13.00, 9.60), 64: (13.00, 9.64), 128: (13.16, 9.73)}),
    ("llama3.1-70b", "24.09", True, lambda g: 2 * g,
     {64: (14.72, 11.01), 128: (14.73, 10.93), 256: (14.8, 11.16), 512: (14.89, 11.18), 1024: (14.92, 11.28),
      2048: (14.98, 11.39)}),
    ("llama3.1-70b", "24.12", True, lambda g: 2 * g,
     {64: (14.61, 10.46), 128: (14.70, 10.52), 256: (14.72, 10.75), 512: (14.80, 10.76), 1024: (14.86, 10.83),
      2048: (14.84, 10.99)}),
    ("llama3.1-405b", "24.09", True, None,  # the 96-GPU BF16 cell is printed "8.7  5" (its tokens/s give 8.75)
     {32: (8.85, 5.80), 96: (8.75, 5.71), 192: (16.93, 11.00), 576: (17.20, 11.24), 1152: (17.52, 11.31),
      2304: (17.62, 12.35)}),
    ("llama3.1-405b", "24.12", True, None,
     {32: (9.00, 5.75), 96: (8.87, 5.63), 192: (17.30, 10.8), 576: (17.50, 11.00), 1152: (17.60, 11.10),
      2304: (17.70, 11.20)}),
    ("nemotron4-15b", "24.09", True, lambda g: 4 * g,
     {16: (2.83, 2.08), 32: (2.86, 2.07), 64: (2.86, 2.09), 128: (2.89, 2.08), 256: (2.88, 2.1), 512: (2.92, 2.12),
      1024: (2.92, 2.12), 2048: (2.96, 2.18)}),
    ("nemotron4-15b", "24.12", True, lambda g: 4 * g,
     {16: (2.812, 2.039), 32: (2.824, 2.046), 64: (2.845, 2.048), 128: (2.859, 2.059), 256: (2.852, 2.075),
      512: (2.875, 2.12), 1024: (2.895, 2.094), 2048: (2.887, 2.12)}),
    ("nemotron4-340b", "24.09", True, lambda g: 2 * g // 8,
     {128: (4.61, 3.16), 256: (4.67, 3.21), 512: (4.7, 3.26), 1024: (4.73, 3.34), 2048: (4.84, 3.49)}),
    ("grok1-314b", "24.12", True, lambda g: 2 * g,  # the full 64 layers from 512 GPUs (proxies below)
     {512: (21.01, 16.90), 1024: (21.20, 17.01), 2048: (21.29, 17.30)}),
    ("gpt3-175b", "24.05", True, lambda g: 16 * g // 8,
     {128: (8.91, 5.92), 256: (8.95, 5.96), 512: (9.09, 6.44), 1024: (9.01, 6.72), 2048: (9.02, 6.24)}),
    ("gpt3-175b", "24.12", False, lambda g: 16 * g // 8,
     {128: (8.309, 5.626), 256: (8.408, 5.725), 512: (8.42, 5.774), 1024: (8.453, 5.82), 2048: (8.49, 5.96)}),
]
# Llama 3.1 405B's per-scale layouts (README table): GPUs -> (layers, global batch, PP, VP)
PROXY_405B = {32: (7, 126, 1, 1), 96: (21, 126, 3, 7), 192: (42, 252, 3, 7), 576: (126, 252, 9, 7),
              1152: (126, 504, 9, 7), 2304: (126, 1008, 9, 7)}


def cost(model: str, gpus: int, batch_of: object, dtype: str, **change: object) -> tuple[float, object]:
    cfg, tp, pp, cp, vp, mbs, recompute, options, _ = RECIPES[model]
    options = {**options, **change}
    cfg = dict(cfg)
    if model == "llama3.1-405b":
        cfg["layers"], gbs, pp, vp = PROXY_405B[gpus]
    else:
        gbs = batch_of(gpus)  # type: ignore[operator]
    dp = gpus // (tp * pp * cp)
    spec = ModelSpec.from_config({"name": model, **cfg})
    ep = 8 if "moe" in cfg else 1
    plan = Plan.uniform(cfg["layers"], global_batch_size=gbs, num_micro_batches=gbs // (mbs * dp), pp=pp,
                        virtual_stages=vp, schedule="interleaved-1f1b" if vp > 1 else "1f1b", dtype=dtype, dp=dp,
                        tp=tp, sp=tp > 1, cp=cp, cp_kind="striped", ep=ep, zero=1, recompute=recompute)
    result = cost_plan(plan, spec, load_cluster("1024xH100", nodes=gpus // 8), CostOptions(**options))
    return result.step_time_s, result


def main() -> int:
    rows = []
    print(f"{'model':15} {'ctr':5} {'GPUs':>5} {'BF16 pub':>8} {'pred':>6} {'err':>7} {'FP8 pub':>7} {'pred':>6} "
          f"{'err':>7} {'speed-up pub':>12} {'pred':>5} {'GiB':>5}")
    for model, container, scored, batch_of, cells in TABLES:
        for gpus, (bf16, fp8) in cells.items():
            t16, c16 = cost(model, gpus, batch_of, "bf16")
            t8, c8 = cost(model, gpus, batch_of, "fp8")
            row = {"model": model, "container": container, "scored": scored, "gpus": gpus,
                   "published_bf16_s": bf16, "predicted_bf16_s": t16, "error_bf16": bf16 / t16 - 1,
                   "published_fp8_s": fp8, "predicted_fp8_s": t8, "error_fp8": fp8 / t8 - 1,
                   "published_speedup": bf16 / fp8, "predicted_speedup": t16 / t8,
                   "peak_memory_gib_bf16": c16.peak_memory_gib, "peak_memory_gib_fp8": c8.peak_memory_gib,
                   "plan": c16.plan.describe().splitlines()[0]}
            rows.append(row)
            print(f"{model:15} {container:5} {gpus:5d} {bf16:8.2f} {t16:6.2f} {row['error_bf16']:+7.1%} {fp8:7.2f} "
                  f"{t8:6.2f} {row['error_fp8']:+7.1%} {row['published_speedup']:12.3f} "
                  f"{row['predicted_speedup']:5.3f} {max(c16.peak_memory_gib, c8.peak_memory_gib):5.1f}"
                  f"{'' if scored else '  (not scored)'}")
    scored = [r for r in rows if r["scored"]]
    errors = {p: [r[f"error_{p}"] for r in scored] for p in ("bf16", "fp8")}
    both = errors["bf16"] + errors["fp8"]
    speedup = [r["predicted_speedup"] / r["published_speedup"] - 1 for r in scored]
    summary = {"runs": len(both), "mae": statistics.fmean(map(abs, both)), "mean_signed": statistics.fmean(both),
               "max": max(map(abs, both)),
               **{f"mae_{p}": statistics.fmean(map(abs, e)) for p, e in errors.items()},
               **{f"mean_signed_{p}": statistics.fmean(e) for p, e in errors.items()},
               "speedup_mae": statistics.fmean(map(abs, speedup)), "speedup_mean_signed": statistics.fmean(speedup),
               "per_table": {f"{m} {c}": statistics.fmean(abs(r[f"error_{p}"]) for r in rows
                                                        if r["model"] == m and r["container"] == c
                                                        for p in ("bf16", "fp8"))
                             for m, c, *_ in TABLES}}
    summary["sensitivity"] = _sensitivity()
    print(f"\nscored: {summary['runs']} step times, mean absolute error {summary['mae']:.1%} (BF16 "
          f"{summary['mae_bf16']:.1%}, FP8 {summary['mae_fp8']:.1%}), mean signed {summary['mean_signed']:+.1%}, "
          f"max {summary['max']:.1%}; FP8 speed-up {summary['speedup_mae']:.1%} mean absolute "
          f"({summary['speedup_mean_signed']:+.1%} signed)")
    command = "python benchmarks/fidelity_dgxc.py"
    (OUT / "fidelity_dgxc.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "source": SOURCE,
         "recipes": {m: r[-1] for m, r in RECIPES.items()},
         "cost_options": {m: str(CostOptions(**r[7])) for m, r in RECIPES.items()},
         "summary": summary, "rows": rows}, indent=2) + "\n")
    (OUT / "fidelity_dgxc.md").write_text(_markdown(command, rows, summary))
    return 0


def _sensitivity() -> dict[str, dict[str, float]]:
    """Mean absolute and signed error over the scored step times with one recipe fact changed for every run."""
    variants = {"TP communication not overlapped": {"tp_comm_overlap": False},
                "pipeline handoffs not overlapped": {"overlap_p2p": False},
                "the other attention kernel (cuDNN <-> FlashAttention-2)": None}
    out = {}
    for label, change in variants.items():
        errors = []
        for model, _container, scored, batch_of, cells in TABLES:
            if not scored:
                continue
            swap = change
            if swap is None:
                kernel = RECIPES[model][7].get("attention_kernel")
                swap = {"attention_kernel": None if kernel == "flash2" else "flash2"}
            for gpus, published in cells.items():
                for dtype, t in zip(("bf16", "fp8"), published, strict=True):
                    errors.append(t / cost(model, gpus, batch_of, dtype, **swap)[0] - 1)
        out[label] = {"mae": statistics.fmean(map(abs, errors)), "mean_signed": statistics.fmean(errors)}
    return out


def _markdown(command: str, rows: list[dict], summary: dict) -> str:
    lines = [f"# Predicted vs published step times of NVIDIA's DGX Cloud recipes (H100, BF16 and FP8)\n\n`{command}` "
             f"({time.strftime('%Y-%m-%d')}). Source: {SOURCE}. Error > 0: the prediction is faster than "
             "published. Speed-up: BF16 step time over FP8 at the same recipe and scale.\n",
             f"Scored: {summary['runs']} step times, mean absolute error **{summary['mae']:.1%}** (BF16 "
             f"{summary['mae_bf16']:.1%}, mean signed {summary['mean_signed_bf16']:+.1%}; FP8 "
             f"{summary['mae_fp8']:.1%}, mean signed {summary['mean_signed_fp8']:+.1%}), max {summary['max']:.1%}; "
             "the FP8 speed-up within "
             f"{summary['speedup_mae']:.1%} mean absolute ({summary['speedup_mean_signed']:+.1%} signed).\n",
             "| model | container | GPUs | BF16 s | predicted | error | FP8 s | predicted | error | speed-up | "
             "predicted | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["scored"] else " (not scored)"
        lines.append(f"| {r['model']}{mark} | {r['container']} | {r['gpus']} | {r['published_bf16_s']:g} | "
                     f"{r['predicted_bf16_s']:.2f} | {r['error_bf16']:+.1%} | {r['published_fp8_s']:g} | "
                     f"{r['predicted_fp8_s']:.2f} | {r['error_fp8']:+.1%} | {r['published_speedup']:.3f} | "
                     f"{r['predicted_speedup']:.3f} | {max(r['peak_memory_gib_bf16'], r['peak_memory_gib_fp8']):.1f} |")
    lines += ["\nMean absolute error per table (BF16 and FP8 together):\n", "| table | MAE |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in summary["per_table"].items()]
    lines += ["\nWith one recipe fact changed for every scored run:\n", "| change | MAE | mean signed |",
              "|---|---|---|"]
    lines += [f"| {k} | {v['mae']:.1%} | {v['mean_signed']:+.1%} |" for k, v in summary["sensitivity"].items()]
    lines += ["\nRecipes:\n"] + [f"- {m}: {r[-1]}" for m, r in RECIPES.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
