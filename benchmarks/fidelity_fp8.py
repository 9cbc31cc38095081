"""Predicted vs published FP8 pre-training throughput on DGX-H100 (NVIDIA's NeMo and Megatron-Bridge tables).

NVIDIA publishes tokens per second per GPU of FP8 pre-training runs on DGX-H100 (8 H100 SXM per node,
NVLink 4, 8 x 400 Gb/s InfiniBand per node) with the parallel layout of each run:

* NeMo 24.07 (``NVIDIA/NeMo docs/source/performance/performance_summary.md`` @070a0bb): 12 runs, GPT-3 5B to
  175B, Llama 2 7B to 70B, Nemotron 8B to 340B, Llama 3 8B and 70B, Transformer Engine delayed scaling;
* Megatron-Bridge 25.09 / 25.11 / 26.02 (``NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md``
  @0a25f91 and ``performance-summary.md`` @00b7660): Llama 3 8B, 70B and Llama 3.1 405B, current scaling
  ("FP8-CS") from 25.11 on.

Each run's recipe (architecture, recomputation, dropout, gradient-reduction dtype, TP communication overlap,
attention backend, FP8 recipe) was read from the public configuration files that launched it
(NeMo-Framework-Launcher ``launcher_scripts/conf/training/*`` and ``examples/training/*/h100/*_fp8*.sh``;
Megatron-Bridge ``scripts/performance/*`` and ``src/megatron/bridge/training/*``); ``RECIPE`` in each row
says which. A row is *scored* when the files name the run's layout and batch; the others are listed with
the recipe assumed (NeMo's GPT-3 20B and 175B and Nemotron 8B and 340B runs: no stored recipe has their
batch or virtual stages, and the 340B recipe turns FP8 off; Megatron-Bridge 25.09: its table names no FP8
recipe). NeMo's launcher exported ``NVTE_FUSED_ATTN=0`` ("Disable cudnn FA until we've tested it more":
FlashAttention-2 in place of cuDNN's fused attention) in ``launcher_scripts/conf/config.yaml`` @01d0773, the
last stored version, which pins the 24.03.01 container (the 23.11 version did not); the 24.07 version is not
stored. The 24.07 rows are costed with FlashAttention-2 and the table gives cuDNN's beside them.

The model costs each run's published plan with the Megatron-Core + Transformer Engine stack
(``strategies.cost.fp8``: FP8 GEMMs in the blocks, the output layer in bf16, TE's casts and transposes,
FP8 all-gathers under sequence parallelism) and nothing fitted to these rows. Error > 0: the prediction is
faster than published. ``BEFORE``: the same plans and options costed at commit fbae6a1, before FP8 was
modelled beyond its GEMM rate.

    python benchmarks/fidelity_fp8.py      # writes benchmarks/results/fidelity_fp8.json and .md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from galvatron.strategies.cost import CostOptions, cost_plan
from galvatron.strategies.hardware import load_cluster
from galvatron.strategies.search.space import accounted_split

from galvatron import ModelSpec, Plan

OUT = Path(__file__).parent / "results"
NEMO = "NVIDIA/NeMo docs/source/performance/performance_summary.md @070a0bb (NeMo 24.07, DGX-H100, FP8)"
BRIDGE = ("NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md @0a25f91 and docs/performance-summary.md "
          "@00b7660 (DGX-H100)")
LAUNCHER = "NVIDIA/NeMo-Framework-Launcher"


def _pad(vocab: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by`` (128) times TP."""
    step = 128 * tp
    return -(-vocab // step) * step


def gpt3(layers: int, hidden: int, heads: int, tp: int) -> dict:
    """NeMo's GPT-3: learned positions, LayerNorm, GELU, biases, tied embeddings (NeMo's GPT defaults),
    GPT-2 BPE vocabulary (50257) padded for TP, sequence 2048."""
    return {"layers": layers, "hidden": hidden, "heads": heads, "ffn_hidden": 4 * hidden,
            "vocab": _pad(50257, tp), "seq_len": 2048, "activation": "gelu", "norm": "layernorm", "bias": True,
            "position": "learned", "tied_embeddings": True}


def llama(layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int, seq: int, tp: int) -> dict:
    return {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv, "ffn_hidden": ffn,
            "vocab": _pad(vocab, tp), "seq_len": seq, "activation": "swiglu", "norm": "rmsnorm", "bias": False,
            "position": "rope"}


def nemotron(layers: int, hidden: int, heads: int, kv: int, tp: int) -> dict:
    """Nemotron: squared-ReLU MLP of 4h (costed as a non-gated MLP: the same GEMMs), LayerNorm, no biases,
    RoPE, untied, 256000-token vocabulary, sequence 4096."""
    return {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv, "ffn_hidden": 4 * hidden,
            "vocab": _pad(256000, tp), "seq_len": 4096, "activation": "gelu", "norm": "layernorm", "bias": False,
            "position": "rope"}


# Megatron-Core with Transformer Engine: 16-bit parameters with fp32 master weights in the distributed optimizer,
# contiguous gradient buffers, gradient-accumulation fusion, flash attention, fused kernels, overlapped gradient
# reduce-scatter and parameter all-gather, Megatron's selective recomputation where a run recomputes.
MEGATRON = {"persistent_grads": True, "master_weights": "optimizer", "selective": "megatron"}
# overlap_p2p: the recipes' overlap_p2p_comm, on for interleaved schedules (NeMo's YAMLs; Megatron-Bridge's
# CommOverlapConfig when PP > 1 and VP > 1); it changes nothing without interleaving.
NEMO_2407 = {**MEGATRON, "fp8_scaling": "delayed", "attention_kernel": "flash2", "overlap_p2p": True}
BRIDGE_CS = {**MEGATRON, "fp8_scaling": "current", "fp8_params": True, "grad_bytes": 2, "overlap_p2p": True}
UB = {"tp_comm_overlap": True}
BF16_GRADS = {"grad_bytes": 2}  # grad_sync_dtype / grad_reduce_in_fp32=False: a bf16 gradient buffer

# name, source, spec, GPUs, global batch, micro-batch, TP, PP, CP, VP, zero, recompute, options, scored,
# published tokens/s/GPU, published model TFLOP/s/GPU, recipe read
RUNS = [
    ("GPT3-5B", NEMO, gpt3(24, 4096, 32, 1), 64, 2048, 4, 1, 1, 1, 1, 1, "none",
     {**NEMO_2407, **BF16_GRADS, "dropout": True}, True, 22521, 736,
     f"{LAUNCHER} gpt3/5b.yaml @3dd3561 (dropout 0.1, no recompute), examples/training/gpt/h100/5b_fp8_8node.sh"),
    ("GPT3-20B", NEMO, gpt3(44, 6144, 48, 2), 64, 256, 2, 2, 1, 1, 1, 1, "none",
     {**NEMO_2407, **BF16_GRADS, **UB}, False, 5851, 750,
     "20b_fp8_8node.sh (TP2 MBS2, GBS 2048 not 256), ub_cfg_h100_h6144_tp2_mbs2_seqlen2048.yaml; recompute and "
     "dropout of 2024 unknown: none assumed"),
    ("GPT3-175B 128", NEMO, gpt3(96, 12288, 96, 4), 128, 256, 1, 4, 8, 1, 6, 1, "none",
     {**NEMO_2407, **BF16_GRADS, **UB}, False, 726, 782,
     "VP6 only in NeMo 2.0's gpt3_175b recipe; recompute (selective or none), dropout and TP overlap differ "
     "between stored versions: none, none, on assumed"),
    ("GPT3-175B 512", NEMO, gpt3(96, 12288, 96, 4), 512, 2048, 2, 4, 8, 1, 6, 1, "none",
     {**NEMO_2407, **BF16_GRADS, **UB}, False, 782, 842, "as above; the TFLOP/s cell links to MLPerf"),
    ("LLAMA2-7B", NEMO, llama(32, 4096, 32, 32, 11008, 32000, 4096, 1), 8, 128, 1, 1, 1, 1, 1, 1, "none",
     NEMO_2407, True, 16847, 776, f"{LAUNCHER} llama/llama2_7b.yaml @3dd3561, examples/.../llama2_7b_fp8.sh"),
    ("LLAMA2-13B", NEMO, llama(40, 5120, 40, 40, 13824, 32000, 4096, 1), 16, 128, 1, 1, 4, 1, 10, 1, "none",
     NEMO_2407, True, 8646, 754, f"{LAUNCHER} llama/llama2_13b.yaml @3dd3561 (TP1 PP4 VP10)"),
    ("LLAMA2-70B", NEMO, llama(80, 8192, 64, 8, 28672, 32000, 4096, 4), 64, 128, 1, 4, 4, 1, 20, 1, "none",
     {**NEMO_2407, **BF16_GRADS, **UB}, True, 1707, 759,
     f"{LAUNCHER} llama/llama2_70b.yaml @4a9b61b (VP20, TP overlap), llama2_70b_fp8.sh (grad_sync bf16)"),
    ("Nemotron-8B", NEMO, nemotron(32, 4096, 32, 32, 2), 64, 256, 4, 2, 1, 1, 1, 1, "none",
     {**NEMO_2407, **UB}, False, 12701, 653,
     f"{LAUNCHER} nemotron/nemotron_8b.yaml @089b90e (TP2, TP overlap); MBS 4 / GBS 256 in no stored file"),
    ("Nemotron-22B", NEMO, nemotron(40, 6144, 48, 48, 2), 64, 256, 2, 2, 4, 1, 10, 1, "none",
     {**NEMO_2407, **UB}, True, 4256, 554, f"{LAUNCHER} nemotron/nemotron_22b.yaml @3dd3561 (TP2 PP4 VP10)"),
    ("Nemotron-340B", NEMO, nemotron(96, 18432, 96, 8, 8), 128, 32, 1, 8, 8, 1, 12, 1, "selective",
     {**NEMO_2407, **BF16_GRADS, "overlap_p2p": False}, False, 322, 678,
     "nemotron_340b.yaml is TP8 PP12 VP8 with fp8 off; selective recompute, no TP or p2p overlap assumed from it"),
    ("LLAMA3-8B", NEMO, llama(32, 4096, 32, 8, 14336, 128256, 8192, 1), 8, 128, 1, 1, 1, 2, 1, 1, "none",
     {**NEMO_2407, **BF16_GRADS}, True, 12036, 697,
     f"{LAUNCHER} llama/llama3_8b.yaml @157ea78 (CP2), llama3_8b_fp8.sh (grad_sync bf16)"),
    ("LLAMA3-70B", NEMO, llama(80, 8192, 64, 8, 28672, 128256, 8192, 4), 64, 128, 1, 4, 4, 2, 5, 1, "none",
     {**NEMO_2407, **BF16_GRADS, **UB}, True, 1533, 738,
     f"{LAUNCHER} llama/llama3_70b.yaml @3dd3561, llama3_70b_fp8.sh (TP overlap, grad_sync bf16)"),
    # Megatron-Bridge: FP8 current scaling with FP8 parameters, bf16 gradient reduction, cuDNN attention (TE's default)
    ("LLAMA3_8B 25.09", BRIDGE, llama(32, 4096, 32, 8, 14336, 128256, 8192, 1), 8, 128, 1, 1, 1, 1, 1, 3, "none",
     {**BRIDGE_CS, "wgrad_fp32_accumulation": False}, False, 14079, 725,
     "scripts/performance/configs/llama3/llama3_8b_llm_pretrain.py @0813a3f (Megatron-FSDP over 8 GPUs, no "
     "gradient-accumulation fusion); the 25.09 table names no FP8 recipe: current scaling assumed"),
    ("LLAMA3_8B 25.11", BRIDGE, llama(32, 4096, 32, 8, 14336, 128256, 8192, 1), 8, 128, 1, 1, 1, 1, 1, 3, "none",
     {**BRIDGE_CS, "wgrad_fp32_accumulation": False}, True, 14451, 744,
     "configs/llama3/llama3_llm_pretrain.py @0a0cb29, workload_base_configs.py @0fa501a (Megatron-FSDP)"),
    ("LLAMA3_70B 25.09", BRIDGE, llama(80, 8192, 64, 8, 28672, 128256, 8192, 4), 64, 128, 1, 4, 8, 1, 5, 1, "none",
     {**BRIDGE_CS, **UB}, False, 1619, 727, "llama3_70b_llm_pretrain.py @27dfb3d; FP8 recipe unnamed: current assumed"),
    ("LLAMA3_70B 25.11", BRIDGE, llama(80, 8192, 64, 8, 28672, 128256, 8192, 4), 64, 128, 1, 4, 8, 1, 5, 1, "none",
     {**BRIDGE_CS, **UB}, True, 1602, 719,
     "llama3_llm_pretrain.py @0a0cb29 (userbuffers_fp8_h100_h8192_tp4_mbs1_seqlen8192)"),
    ("LLAMA3_70B 26.02", BRIDGE, llama(80, 8192, 64, 8, 28672, 128256, 8192, 4), 64, 256, 1, 4, 8, 1, 5, 1, "none",
     {**BRIDGE_CS, **UB}, True, 1621, 728, "configs/llama/llama3_workload_base_configs.py @00919dc (GBS 256)"),
    ("LLAMA3.1_405B 25.09", BRIDGE, llama(126, 16384, 128, 8, 53248, 128256, 8192, 8), 1024, 512, 1, 8, 8, 2, 8, 1,
     "none", {**BRIDGE_CS, **UB}, False, 302, 763, "llama31_405b_llm_pretrain.py @27dfb3d; FP8 recipe unnamed"),
    ("LLAMA3.1_405B 25.11", BRIDGE, llama(126, 16384, 128, 8, 53248, 128256, 8192, 8), 1024, 512, 1, 8, 8, 2, 8, 1,
     "none", {**BRIDGE_CS, **UB}, True, 292, 737,
     "llama31_llm_pretrain.py @0a0cb29 (embedding and loss counted as pipeline layers, h16384_tp8_cp2 TP overlap)"),
    ("LLAMA3.1_405B 26.02", BRIDGE, llama(126, 16384, 128, 8, 53248, 128256, 8192, 8), 1024, 1536, 1, 8, 8, 2, 8, 1,
     "none", {**BRIDGE_CS, **UB}, True, 311, 784, "llama31_workload_base_configs.py @0013c9a (GBS 1536)"),
]
# Predicted tokens/s/GPU of the same plans at commit fbae6a1 (FP8 as its GEMM rate only; options the model then
# had: everything above but tp_comm_overlap, overlap_p2p, fp8_scaling and fp8_params).
BEFORE = {"GPT3-5B": 25642, "GPT3-20B": 6131, "GPT3-175B 128": 644, "GPT3-175B 512": 750, "LLAMA2-7B": 16715,
          "LLAMA2-13B": 8895, "LLAMA2-70B": 1554, "Nemotron-8B": 14776, "Nemotron-22B": 4849, "Nemotron-340B": 306,
          "LLAMA3-8B": 12315, "LLAMA3-70B": 1408, "LLAMA3_8B 25.09": 14773, "LLAMA3_8B 25.11": 14773,
          "LLAMA3_70B 25.09": 1613, "LLAMA3_70B 25.11": 1613, "LLAMA3_70B 26.02": 1631, "LLAMA3.1_405B 25.09": 293,
          "LLAMA3.1_405B 25.11": 293, "LLAMA3.1_405B 26.02": 298}


def split(layers: int, chunks: int, name: str) -> list[int] | None:
    """Megatron-Bridge's 405B recipe counts the embedding and the loss as a layer each in its pipeline split
    (``account_for_embedding_in_pipeline_split``, ``account_for_loss_in_pipeline_split``): the first and last
    chunks hold one block fewer. None: an even split (every other recipe)."""
    return accounted_split(layers, chunks) if "405B" in name else None


def cost_run(run: tuple, **overrides: object) -> tuple[object, dict]:
    (name, _source, cfg, gpus, gbs, mbs, tp, pp, cp, vp, zero, recompute, options, _scored, _tps, _tflops,
     _recipe) = run
    spec = ModelSpec.from_config({"name": name, **cfg})
    dp = gpus // (tp * pp * cp)
    cluster = load_cluster("1024xH100", nodes=gpus // 8)
    plan = Plan.uniform(cfg["layers"], global_batch_size=gbs, num_micro_batches=gbs // (mbs * dp), pp=pp,
                        virtual_stages=vp, schedule="interleaved-1f1b" if vp > 1 else "1f1b", dtype="fp8",
                        layer_split=split(cfg["layers"], pp * vp, name), dp=dp, tp=tp, sp=tp > 1, cp=cp,
                        cp_kind="striped", zero=zero, recompute=recompute)
    opts = CostOptions(**{**options, **overrides})
    return cost_plan(plan, spec, cluster, opts), {"plan": plan, "spec": spec, "options": opts, "dp": dp}


def main() -> int:
    rows = []
    print(f"{'run':20} {'GPUs':>5} {'layout':>22} {'published':>9} {'predicted':>9} {'error':>7} {'other attn':>10} "
          f"{'peak GiB':>8}")
    for run in RUNS:
        name, source, cfg, gpus, gbs, mbs, tp, pp, cp, vp, zero, recompute, options, scored, tps, tflops, recipe = run
        cost, info = cost_run(run)
        other_kernel = "cudnn" if options.get("attention_kernel") == "flash2" else "flash2"
        other, _ = cost_run(run, attention_kernel=other_kernel)
        tokens = gbs * cfg["seq_len"] / gpus
        predicted = tokens / cost.step_time_s
        layout = f"tp{tp} pp{pp} cp{cp} vp{vp} dp{info['dp']}" + (" zero3" if zero == 3 else "")
        row = {"run": name, "source": source, "scored": scored, "gpus": gpus, "global_batch": gbs, "micro_batch": mbs,
               "layout": layout, "recompute": recompute, "recipe": recipe, "cost_options": str(info["options"]),
               "published_tokens_per_s_per_gpu": tps, "published_tflops_per_gpu": tflops,
               "predicted_tokens_per_s_per_gpu": predicted, "error": predicted / tps - 1,
               "attention_kernel": info["options"].attention_kernel or "cudnn", "other_attention_kernel": other_kernel,
               "error_other_attention": tokens / other.step_time_s / tps - 1,
               "predicted_step_s": cost.step_time_s, "peak_memory_gib": cost.peak_memory_gib,
               "stage0_s": {"compute": cost.stages[0].compute_s, **cost.stages[0].comm_s,
                            "bubble": cost.stages[0].bubble_s}}
        if name in BEFORE:
            row["predicted_before"] = BEFORE[name]
            row["error_before"] = BEFORE[name] / tps - 1
        rows.append(row)
        print(f"{name:20} {gpus:5d} {layout:>22} {tps:9.0f} {predicted:9.0f} {row['error']:+7.1%} "
              f"{row['error_other_attention']:+10.1%} {cost.peak_memory_gib:8.1f}{'' if scored else '  (not scored)'}")
    scored = [r for r in rows if r["scored"]]
    summary = {"mae": sum(abs(r["error"]) for r in scored) / len(scored), "max": max(abs(r["error"]) for r in scored),
               "mean_signed": sum(r["error"] for r in scored) / len(scored), "runs": len(scored),
               "all_rows_mae": sum(abs(r["error"]) for r in rows) / len(rows)}
    if all("error_before" in r for r in scored):
        summary["mae_before"] = sum(abs(r["error_before"]) for r in scored) / len(scored)
    summary["sensitivity"] = _sensitivity()
    print(f"\nscored runs: mean absolute error {summary['mae']:.1%}, max {summary['max']:.1%}, mean signed "
          f"{summary['mean_signed']:+.1%} over {len(scored)}; all {len(rows)} rows {summary['all_rows_mae']:.1%}"
          + (f"; before {summary['mae_before']:.1%}" if "mae_before" in summary else ""))
    command = "python benchmarks/fidelity_fp8.py"
    (OUT / "fidelity_fp8.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "sources": [NEMO, BRIDGE],
         "cluster": "1024xH100 preset cut to each run's nodes (H100 SXM, NVLink 4, 8 NDR NICs per node)",
         "summary": summary, "runs": rows}, indent=2) + "\n")
    (OUT / "fidelity_fp8.md").write_text(_markdown(command, rows, summary))
    return 0


def _sensitivity() -> dict[str, float]:
    """Mean absolute error over the scored runs with one recipe fact changed for every run: what the result
    leans on."""
    variants = {"TP communication not overlapped": {"tp_comm_overlap": False},
                "pipeline handoffs not overlapped": {"overlap_p2p": False},
                "cuDNN attention for NeMo 24.07": {"attention_kernel": None},
                "FlashAttention-2 for Megatron-Bridge": {"attention_kernel": "flash2"},
                "delayed scaling for Megatron-Bridge": {"fp8_scaling": "delayed"}}
    out = {}
    for label, change in variants.items():
        errors = []
        for run in RUNS:
            _name, source, cfg, gpus, gbs = run[:5]
            if not run[13]:
                continue
            applies = not (("24.07" in label and source != NEMO) or ("Bridge" in label and source != BRIDGE))
            cost, _ = cost_run(run, **(change if applies else {}))
            errors.append(gbs * cfg["seq_len"] / gpus / cost.step_time_s / run[14] - 1)
        out[label] = sum(map(abs, errors)) / len(errors)
    return out


def _markdown(command: str, rows: list[dict], summary: dict) -> str:
    before = "mae_before" in summary
    lines = [f"# Predicted vs published FP8 pre-training throughput (DGX-H100)\n\n`{command}` "
             f"({time.strftime('%Y-%m-%d')}). Sources: {NEMO}; {BRIDGE}. Recipes: `benchmarks/fidelity_fp8.py` "
             "(each row's `recipe`). Error > 0: the prediction is faster than published. *Other attention*: the "
             "same run with the other fused attention kernel (NeMo 24.07: cuDNN in place of FlashAttention-2; "
             "Megatron-Bridge: FlashAttention-2 in place of cuDNN).\n",
             "| run | GPUs | layout | mbs / gbs | scored | published tok/s/GPU | predicted | error | other attention |"
             + (" before |" if before else "") + " peak GiB |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if before else "") + "---|"]
    for r in rows:
        cells = (f"| {r['run']} | {r['gpus']} | {r['layout']} | {r['micro_batch']} / {r['global_batch']} | "
                 f"{'yes' if r['scored'] else 'no'} | {r['published_tokens_per_s_per_gpu']} | "
                 f"{r['predicted_tokens_per_s_per_gpu']:.0f} | {r['error']:+.1%} | {r['error_other_attention']:+.1%} |")
        if before:
            cells += f" {r.get('error_before', float('nan')):+.1%} |"
        lines.append(cells + f" {r['peak_memory_gib']:.1f} |")
    lines.append(f"\nScored runs: mean absolute error {summary['mae']:.1%}, max {summary['max']:.1%}, mean signed "
                 f"{summary['mean_signed']:+.1%} over {summary['runs']}"
                 + (f" (before: {summary['mae_before']:.1%})" if before else "")
                 + f"; all {len(rows)} rows {summary['all_rows_mae']:.1%}.\n")
    lines += ["With one recipe fact changed for every scored run (mean absolute error):\n",
              "| change | MAE |", "|---|---|"]
    lines += [f"| {label} | {mae:.1%} |" for label, mae in summary["sensitivity"].items()]
    lines += ["", "Recipes (what each row was costed with):\n"]
    lines += [f"- {r['run']} ({r['gpus']} GPUs): {r['recipe']}" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
