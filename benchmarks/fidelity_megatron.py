"""Predicted vs published iteration times of Megatron-LM runs on Selene (A100 80GB, NVLink 3, 8x HDR).

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), Table 3
configurations and Table 5 iteration times (full recompute without SP vs selective recompute + SP),
plus §6.3's 530B run with 8-way data parallelism (39.15 s, gradient all-reduce not overlapped).
The software options are what the paper states: no flash attention (2022), dropout, no overlap of
the gradient all-reduce. Also Narayanan et al. SC'21 Table 1 (weak scaling, 1.7B to 1T on 32 to 3072
A100s, published as TFLOP/s per GPU by the paper's Eq. 3), each run as Megatron-LM's
``examples/sc21/run_table_1.sh`` and ``CONFIG.sh`` launch it, costed with the 2021 stack's options
(:data:`NARAYANAN_OPTIONS`). Run: ``python benchmarks/fidelity_megatron.py``; writes
``benchmarks/results/fidelity_megatron.json`` and ``.md``, with the errors of the model before the
physics changes of issue #3 (``BEFORE``, measured at commit 7a4f10e with this same script) beside them.
"""

from __future__ import annotations

import dataclasses
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
# Narayanan et al. SC'21 ("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"),
# Table 1, with each run's launch settings from NVIDIA/Megatron-LM examples/sc21/run_table_1.sh (micro-batch,
# virtual stages as layers per virtual stage, DDP implementation) and CONFIG.sh (--fp16, sequence 2048,
# vocabulary 51200 as the paper states, full recomputation: --recompute-method uniform).
# name, heads, hidden, layers, tp, pp, GPUs, global batch, micro-batch, virtual stages, DDP, TFLOP/s per GPU
NARAYANAN = [("1.7B", 24, 2304, 24, 1, 1, 32, 512, 16, 1, "torch", 137),
             ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 16, 1, "torch", 138),
             ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 16, 1, "torch", 142),
             ("18B", 48, 6144, 40, 8, 1, 256, 1024, 8, 1, "torch", 135),
             ("39B", 64, 8192, 48, 8, 2, 512, 1536, 4, 1, "local", 138),
             ("76B", 80, 10240, 60, 8, 4, 1024, 1792, 2, 3, "local", 140),
             ("145B", 96, 12288, 80, 8, 8, 1536, 2304, 2, 2, "local", 148),
             ("310B", 128, 16384, 96, 8, 16, 1920, 2160, 1, 2, "local", 155),
             ("530B", 128, 20480, 105, 8, 35, 2520, 2520, 1, 3, "local", 163),
             ("1T", 160, 25600, 128, 8, 64, 3072, 3072, 1, 1, "local", 163)]
NARAYANAN_SOURCE = ("Narayanan et al. SC'21, Efficient Large-Scale Language Model Training on GPU Clusters Using "
                    "Megatron-LM, Table 1; launch settings from NVIDIA/Megatron-LM examples/sc21/run_table_1.sh "
                    "and CONFIG.sh")
SOURCE = ("Korthikanti et al. 2022, Reducing Activation Recomputation in Large Transformer Models, "
          "Table 3 (configurations) and Table 5 (iteration times), §6.3 (530B with data parallelism 8)")
OUT = Path(__file__).parent / "results"
# Extra check points, reported beside (not in) the Megatron error, each with its stack's CostOptions.elementwise
# and the fused stack's prediction (what the model said before eager kernels were modelled) beside it.
# torchtitan docs/performance.md (pytorch/torchtitan, "Llama 3 / Llama 2 performance numbers"): FSDP2 on 64 A100
# 80GB, eager PyTorch, Llama 3 at 8192 tokens, Llama 2 at 4096. model, recompute (selective: op AC), local batch,
# tok/s/GPU. The "selective layer" rows (full AC on every other block) are left out.
TORCHTITAN = [("llama3-8b", "selective", 1, 2973), ("llama3-70b", "full", 1, 331), ("llama2-13b", "none", 2, 2162),
              ("llama2-13b", "selective", 2, 1904), ("llama2-70b", "selective", 1, 355), ("llama2-70b", "full", 2, 353)]
TORCHTITAN_SOURCE = "pytorch/torchtitan docs/performance.md, Llama 3 and Llama 2 on 64 A100 80GB with FSDP2"
# torchtitan benchmarks/llama3_h100_202412_torchtitan.md Table 1: Llama 3.1 8B, FSDP on 8 H100 (Grand Teton:
# 96 GB HBM2e at 2.4 TB/s, default 500 W power limit), local batch 2 x 8192, selective (op) AC. stack, TPS/GPU
TITAN_H100 = [("eager", 5762), ("fused", 6667)]
TITAN_H100_SOURCE = ("pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md Table 1 "
                     "(FSDP; FSDP + torch.compile)")
# Our own runs (benchmarks/results/gpu_speed_eager.json, gpu_speed_compiled.json, hand-written side): the
# reference GPT (RoPE, LayerNorm, GELU) on one H100 SXM, bf16 autocast over fp32 parameters, fused AdamW, SDPA.
OWN = ("gpu_speed_eager.json", "gpu_speed_compiled.json")
OWN_SOURCE = "benchmarks/results/gpu_speed_eager.json and gpu_speed_compiled.json (one H100 SXM, hand-written side)"
# Megatron-LM keeps a contiguous gradient buffer for the whole step (persistent_grads)
# Megatron keeps 16-bit parameters with fp32 copies in the optimizer and recomputes the attention core
OPTIONS = CostOptions(flash_attention=False, dropout=True, overlap_grad_reduce=False, overlap_param_gather=False,
                      persistent_grads=True, master_weights="optimizer", selective="megatron")
TITAN_OPTIONS = CostOptions(selective="torchtitan")  # torchtitan's per-op AC: every other GEMM output kept
# Megatron-LM as the SC'21 runs used it (early 2021), where it differs from the 2022 stack of OPTIONS: fp16
# gradients (2 bytes kept and all-reduced: no --accumulate-allreduce-grads-in-fp32 in CONFIG.sh) that
# autograd adds up over micro-batches (the fused fp32 weight-gradient accumulation came later), flattened
# into buckets for the all-reduce and copied back (bucket copies), and tensor-parallel all-reduces that
# wait for the backward GEMMs (the asynchronous input-gradient all-reduce is Korthikanti et al. 2022's).
# The gradient all-reduce overlaps the backward under PyTorch DDP (the runs without pipelining) and follows
# it under Megatron's local DDP (per run below).
NARAYANAN_OPTIONS = dataclasses.replace(OPTIONS, grad_bytes=2, wgrad_fp32_accumulation=False, bucket_copies=True,
                                        overlap_tp_backward=False)


def titan_options(elementwise: str, attention_kernel: str | None = None) -> CostOptions:
    """torchtitan: per-op AC (every other GEMM output kept); FSDP2 bf16 parameters, fp32 reduce; weight
    gradients written in bf16, eager or compiled."""
    return dataclasses.replace(TITAN_OPTIONS, elementwise=elementwise, attention_kernel=attention_kernel,
                               wgrad_fp32_accumulation=False)


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
    weak = _narayanan()
    both = [r["error"] for r in rows] + [r["error"] for r in weak]
    summary["narayanan"] = {"mae": sum(abs(r["error"]) for r in weak) / len(weak),
                            "max": max(abs(r["error"]) for r in weak),
                            "mean_signed": sum(r["error"] for r in weak) / len(weak)}
    summary["both"] = {"mae": sum(map(abs, both)) / len(both), "max": max(map(abs, both)),
                       "mean_signed": sum(both) / len(both), "runs": len(both)}
    nar, all_ = summary["narayanan"], summary["both"]
    print(f"Narayanan Table 1: mean absolute error {nar['mae']:.1%}, max {nar['max']:.1%}, mean signed "
          f"{nar['mean_signed']:+.1%}; both papers: {all_['mae']:.1%} over {all_['runs']} runs")
    extra = _torchtitan() + _titan_h100() + _own()
    command = "python benchmarks/fidelity_megatron.py"
    (OUT / "fidelity_megatron.json").write_text(json.dumps(
        {"command": command, "date": time.strftime("%Y-%m-%d"), "source": SOURCE, "cluster": "selene (A100 80GB, "
         "NVLink3, 8 HDR NICs per node)", "cost_options": str(OPTIONS), "summary": summary, "runs": rows,
         "narayanan_source": NARAYANAN_SOURCE, "narayanan_cost_options": str(NARAYANAN_OPTIONS), "narayanan": weak,
         "extra_sources": [TORCHTITAN_SOURCE, TITAN_H100_SOURCE, OWN_SOURCE], "extra": extra},
        indent=2) + "\n")
    lines = [f"# Predicted vs published Megatron-LM iteration times\n\n`{command}` ({time.strftime('%Y-%m-%d')}). "
             f"Source: {SOURCE}.\n", "| run | mode | GPUs | published s | predicted s | error | before #3 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['mode']} | {r['gpus']} | {r['published_s']:.2f} | {r['predicted_s']:.2f} | "
              f"{r['error']:+.1%} | {r['error_before']:+.1%} |" for r in rows]
    lines.append(f"\nMean absolute error {now['mae']:.1%} (before {then['mae']:.1%}), max {now['max']:.1%} "
                 f"(before {then['max']:.1%}), mean signed {now['mean_signed']:+.1%}.\n")
    lines += ["## Narayanan et al. SC'21 Table 1 (weak scaling, fp16, full recomputation)\n",
              f"Source: {NARAYANAN_SOURCE}. Published TFLOP/s per GPU turned into seconds per iteration with the "
              "paper's Eq. 3 (96 B s l h^2 (1 + s/6h + V/16lh) FLOPs, recomputation counted). Costed with "
              "`NARAYANAN_OPTIONS` (the 2021 stack: fp16 gradients added up by autograd and all-reduced in "
              "fp16 through flattened buckets, no asynchronous tensor-parallel all-reduce) and the gradient "
              "all-reduce overlapped only under PyTorch DDP.\n",
              "| run | GPUs | tp | pp | vpp | dp | micro-batches | DDP | published TFLOP/s | published s | "
              "predicted s | error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['gpus']} | {r['tp']} | {r['pp']} | {r['vpp']} | {r['dp']} | {r['micro_batches']} | "
              f"{r['ddp']} | {r['published_tflops']} | {r['published_s']:.2f} | {r['predicted_s']:.2f} | "
              f"{r['error']:+.1%} |" for r in weak]
    lines.append(f"\nMean absolute error {nar['mae']:.1%}, max {nar['max']:.1%}, mean signed "
                 f"{nar['mean_signed']:+.1%}. Both papers together: {all_['mae']:.1%} mean absolute over "
                 f"{all_['runs']} runs, mean signed {all_['mean_signed']:+.1%}.\n")
    lines += _same_replica(rows, weak)
    lines += ["Extra check points (error > 0: the prediction is too fast), each costed with its stack's "
              "`CostOptions.elementwise`; *fused* is what the model predicts for the same run with fused kernels "
              "(the prediction before eager kernels were modelled).\n",
              "| source | run | stack | published | predicted | error | fused | error fused |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['run']} | {r['elementwise']} | {r['published']:g} {r['unit']} | "
              f"{r['predicted']:.0f} | {r['error']:+.1%} | {r['predicted_fused']:.0f} | {r['error_fused']:+.1%} |"
              for r in extra]
    lines.append("\nSources: " + "; ".join(f"{k}: {v}" for k, v in (("A", TORCHTITAN_SOURCE), ("B", TITAN_H100_SOURCE),
                                                                       ("C", OWN_SOURCE))) + ".")
    lines.append("\n" + _titan_reproduced())
    (OUT / "fidelity_megatron.md").write_text("\n".join(lines) + "\n")
    return 0


def _row(source: str, run: str, elementwise: str, published: float, unit: str, predicted: float,
         fused: float) -> dict:
    """One extra check point; ``unit`` ms: a step time (errors as published over predicted, so that
    > 0 is too fast everywhere), else a throughput."""
    err = (published / predicted if unit == "ms" else predicted / published) - 1
    err_fused = (published / fused if unit == "ms" else fused / published) - 1
    print(f"{source} {run:22} {elementwise:8} published {published:g} {unit}, predicted {predicted:.0f} ({err:+.1%}), "
          f"fused {fused:.0f} ({err_fused:+.1%})")
    return {"source": source, "run": run, "elementwise": elementwise, "published": published, "unit": unit,
            "predicted": predicted, "error": err, "predicted_fused": fused, "error_fused": err_fused}


def _narayanan() -> list[dict]:
    """Narayanan et al. SC'21 Table 1: seconds per iteration, predicted vs published."""
    out = []
    for name, heads, h, layers, tp, pp, gpus, gbs, mbs, v, ddp, tflops in NARAYANAN:
        dp, s, vocab = gpus // (tp * pp), 2048, 51200
        flops = 96 * gbs * s * layers * h * h * (1 + s / (6 * h) + vocab / (16 * layers * h))  # Eq. 3
        published = flops / (tflops * 1e12 * gpus)
        m = gbs // (mbs * dp)
        plan = Plan.uniform(layers, global_batch_size=gbs, num_micro_batches=m, pp=pp, virtual_stages=v,
                            schedule="interleaved-1f1b" if v > 1 else "1f1b", dp=dp, tp=tp, recompute="full",
                            dtype="fp16")
        options = dataclasses.replace(NARAYANAN_OPTIONS, overlap_grad_reduce=ddp == "torch")
        cost = cost_plan(plan, gpt(h, layers, heads), load_cluster("selene", nodes=gpus // 8), options)
        row = {"run": name, "gpus": gpus, "tp": tp, "pp": pp, "vpp": v, "dp": dp, "global_batch": gbs,
               "micro_batch": mbs, "micro_batches": m, "ddp": ddp, "published_tflops": tflops,
               "published_s": published, "predicted_s": cost.step_time_s, "error": cost.step_time_s / published - 1,
               "peak_memory_gib": cost.peak_memory_gib}
        print(f"{name:10} {'SC21 Table 1':22} {published:11.2f} {cost.step_time_s:11.2f} {row['error']:+7.1%} "
              f"{'':>7} {cost.peak_memory_gib:8.1f}")
        out.append(row)
    return out


def _same_replica(korthikanti: list[dict], narayanan: list[dict]) -> list[str]:
    """The runs both papers made with the same work per data-parallel replica (same model, tp, pp,
    virtual stages, micro-batch and micro-batches; full recomputation): published times side by side."""
    lines = []
    for k in korthikanti:
        if k["mode"] != "full recompute":
            continue
        for n in narayanan:
            if (n["run"], n["tp"], n["pp"], n["vpp"], n["micro_batch"]) == (k["run"], k["tp"], k["pp"], k["vpp"],
                                                                          k["micro_batch"]) and \
                    n["micro_batches"] == k["global_batch"] // (k["micro_batch"] * k["dp"]):
                lines.append(f"- {k['run']}: the same pipeline per replica ran {k['published_s']:.2f} s in 2022 "
                             f"(dp {k['dp']}) and {n['published_s']:.2f} s in 2021 (dp {n['dp']}, "
                             f"{n['published_s'] / k['published_s'] - 1:+.1%}); predicted {k['predicted_s']:.2f} "
                             f"and {n['predicted_s']:.2f} s with each year's stack.")
    if lines:
        lines = ["Runs with the same work per replica in both papers:\n", *lines, ""]
    return lines


def _torchtitan() -> list[dict]:
    """torchtitan's FSDP2 runs on 64 A100: throughput per GPU predicted vs published."""
    out = []
    cluster = load_cluster("64xA100-80GB")
    for model, recompute, local_batch, published in TORCHTITAN:
        spec = ModelSpec.from_config(model)
        plan = Plan.uniform(spec.num_blocks, global_batch_size=64 * local_batch, num_micro_batches=1, dp=64, zero=3,
                            recompute=recompute)
        tps = [cost_plan(plan, spec, cluster, titan_options(e)).tokens_per_s / 64 for e in ("eager", "fused")]
        out.append(_row("A", f"{model} lbs {local_batch} {recompute} AC", "eager", published, "tok/s/GPU", *tps))
    return out


def _titan_h100() -> list[dict]:
    """torchtitan's Llama 3.1 8B on 8 H100 of 96 GB HBM2e at 2.4 TB/s (the database's H100 SXM with that
    memory), attention on FlashAttention-2: PyTorch's SDPA did not pick cuDNN on Hopper in Dec 2024
    (pytorch/pytorch#142132, nightly 2.6.0.dev20241204: SDPA 329 TFLOP/s where cuDNN ran 631). The
    500 W power limit (700 W TDP; the source: peak "between SXM and NVL") is not modelled: GEMMs and
    attention keep the 700 W rates."""
    base = load_cluster("8xH100")
    cluster = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, hbm_gbps=2400, memory_gib=95.0))
    spec = ModelSpec.from_config("llama3-8b")
    plan = Plan.uniform(spec.num_blocks, global_batch_size=16, num_micro_batches=1, dp=8, zero=3, recompute="selective")
    fused = cost_plan(plan, spec, cluster, titan_options("fused", "flash2")).tokens_per_s / 8
    out = []
    for elementwise, published in TITAN_H100:
        tps = cost_plan(plan, spec, cluster, titan_options(elementwise, "flash2")).tokens_per_s / 8
        run = "llama3.1-8b FSDP" + (" + compile" if elementwise == "fused" else "")
        out.append(_row("B", run, elementwise, published, "tok/s/GPU", tps, fused))
    return out


def _titan_reproduced() -> str:
    """B's step reproduced on one 700 W H100 SXM (benchmarks/titan_reproduce.py) against the model."""
    from titan_reproduce import predictions

    rows = predictions(OUT / "titan_reproduce.json")
    published = dict(zip(("eager", "compiled"), (tps for _, tps in TITAN_H100), strict=True))
    parts = [f"{r['variant']} {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU (predicted "
             f"{r['predicted_tokens_per_s_per_gpu'] / r['tokens_per_s_per_gpu'] - 1:+.1%}; published / measured "
             f"{published[r['variant']] / r['tokens_per_s_per_gpu']:.2f})" for r in rows]
    return ("B reproduced as rank 0 on one 700 W H100 SXM with HBM3 (benchmarks/results/titan_reproduce.md): "
            + ", ".join(parts) + ". B's 96 GB HBM2e is modelled, its 500 W power limit is not.")


def _own() -> list[dict]:
    """The reference GPT on one H100: step time predicted vs measured, eager (autocast) and compiled."""
    out = []
    cluster = load_cluster("8xH100", gpus_per_node=1)
    for path in OWN:
        for case in json.loads((OUT / path).read_text())["results"]:
            cfg, compiled = case["config"], case["compiled"]
            spec = ModelSpec.from_config({"name": case["case"], **{k: cfg[k] for k in (
                "layers", "hidden", "heads", "kv_heads", "vocab", "seq_len", "activation", "norm", "bias", "position",
                "ffn_hidden")}})
            plan = Plan.uniform(cfg["layers"], global_batch_size=case["batch"], num_micro_batches=1)
            # torch.compile writes bf16 weight gradients (autocast), no fp32 accumulation in the GEMM
            fused = cost_plan(plan, spec, cluster, CostOptions(wgrad_fp32_accumulation=False)).step_time_s * 1e3
            eager = cost_plan(plan, spec, cluster, CostOptions(elementwise="autocast")).step_time_s * 1e3
            measured = round(case["sides"]["hand-written"]["median_step_s"] * 1e3, 1)
            run = f"{case['case']} {'compiled' if compiled else 'eager'}"
            out.append(_row("C", run, "fused" if compiled else "autocast", measured, "ms",
                            fused if compiled else eager, fused))
    return out


if __name__ == "__main__":
    sys.exit(main())
