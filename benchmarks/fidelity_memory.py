"""Predicted vs measured peak memory per GPU (issue #3).

Check points:

1. Our own H100 runs (``benchmarks/results/profile_fidelity.json`` and ``profile_fidelity_llama.json``,
   ``torch.cuda.max_memory_allocated``): GPT-3 XL 1.3B and Llama 3.2 1B through ``galvatron.wrap`` on one
   H100 80GB, bf16 autocast, fp32 parameters, fused AdamW, eager ``F.cross_entropy(logits.float(), y)``,
   ``zero_grad(set_to_none=True)``, one micro-batch per step; costed with the native runtime's
   ``CostOptions`` (``galvatron.backends.capabilities("native").cost_options()``).
2. torchtitan's published H100 benchmark (pytorch/torchtitan ``benchmarks/llama3_h100_202412_torchtitan.md``,
   Tables 1 and 3, rows "FSDP", eager): Llama 3.1 8B, seq 8192, local batch 2, FSDP2 on 8 and 128 H100
   (96 GB HBM2e), selective *op* activation checkpointing; memory is torchtitan's ``max_reserved`` (the
   caching allocator's reserve, an upper bound of the allocated peak). Op-level SAC saves about every
   other GEMM output, between our ``none`` and ``full`` recomputation, so those two bracket it; the
   difference between 8 and 128 GPUs isolates the sharded states (same activations and loss).

torchtitan's rows are costed with ``CostOptions(elementwise="eager", loss_bytes_per_logit=12)`` (16-bit
activations under FSDP2 mixed precision, eager cross-entropy). With one micro-batch the cost model lets
gradients replace the activations during the backward (``CostOptions.persistent_grads`` None: peak =
static + max(activations + buffers, grads)),
which is what ``zero_grad(set_to_none=True)`` does; the column "gradients held" costs the same runs
with ``persistent_grads=True`` (Megatron's main-grad buffers), the rule before it was modelled.

3. The same two torchtitan runs reproduced as rank 0 of 8 and 128 ranks on one H200
   (``benchmarks/reserved_memory.py``: a fake process group, every allocation the real one): their
   reserved peak beside the published one, their allocated peak beside the cost model's, and the
   least memory each step runs in (``strategies.cost.allocator.memory_needs`` over its trace).

4. The same two runs traced on fake tensors on a CPU (``benchmarks/fake_memory.py``, its results in
   ``benchmarks/results/fake_memory``): the reserved peak predicted without a GPU, beside the published.

Run: ``python benchmarks/fidelity_memory.py``; writes ``benchmarks/results/fidelity_memory.json`` and ``.md``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from galvatron.strategies.cost import CostOptions, cost_plan
from galvatron.strategies.hardware import load_cluster

from galvatron import ModelSpec
from galvatron.backends import capabilities
from galvatron.plan import Plan
from galvatron.spec_config import load_model_config

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "fidelity_memory.json"
EAGER = CostOptions(**capabilities("native").cost_options())  # how galvatron.wrap ran them
TITAN = CostOptions(elementwise="eager", loss_bytes_per_logit=12)
TITAN_OP_SAC = dataclasses.replace(TITAN, selective="torchtitan")  # torchtitan's per-op AC policy
H100 = {"gpu": "H100-SXM", "gpus_per_node": 1, "nodes": 1, "name": "1xH100"}
TORCHTITAN = "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md"
TITAN_POINTS = [("Table 1, FSDP", 1, 82.4), ("Table 3, FSDP", 16, 67.0)]  # (row, 8-GPU nodes, GiB)


def _predict(spec: ModelSpec, plan: Plan, cluster: object, options: CostOptions = EAGER) -> dict:
    cost = cost_plan(plan, spec, cluster, options)  # type: ignore[arg-type]
    held = cost_plan(plan, spec, cluster, dataclasses.replace(options, persistent_grads=True))  # type: ignore[arg-type]
    return {"predicted_gib": cost.peak_memory_gib, "grads_held_gib": held.peak_memory_gib,
            "breakdown_gib": cost.stages[0].memory_gib}


OWN_RUNS = (("gpt3-1.3b", "profile_fidelity.json"), ("llama3.2-1b", "profile_fidelity_llama.json"))


def own_h100() -> list[dict]:
    """The 12 configurations of each model measured on one H100 by benchmarks/profile_fidelity.py."""
    rows = []
    for model, results in OWN_RUNS:
        measured = json.loads((RESULTS / results).read_text())
        for r in measured["rows"]:
            if r.get("peak_memory_gib") is None:
                continue
            spec = ModelSpec.from_config({**load_model_config(model), "seq_len": r["seq_len"]})
            plan = Plan.uniform(spec.num_blocks, global_batch_size=r["micro_batch"], recompute=r["recompute"],
                                dtype="bf16")
            rows.append({"source": f"benchmarks/results/{results} (max_memory_allocated)",
                         "run": f"{model} mb={r['micro_batch']} seq={r['seq_len']} recompute={r['recompute']}",
                         "measured_gib": r["peak_memory_gib"], **_predict(spec, plan, load_cluster(H100))})
    return rows


def _reserved_ratios() -> dict[str, float]:
    """Reserved over allocated peak of our runs that recorded both (the caching allocator's overhead)."""
    ratios = [r["peak_reserved_gib"] / r["peak_memory_gib"] for _, results in OWN_RUNS
              for r in json.loads((RESULTS / results).read_text())["rows"] if r.get("peak_reserved_gib")]
    return {"reserved_ratio_min": min(ratios), "reserved_ratio_max": max(ratios),
            "reserved_ratio_median": statistics.median(ratios)}


def torchtitan() -> list[dict]:
    spec = ModelSpec.from_config({**load_model_config("llama3-8b"), "seq_len": 8192})
    rows = []
    for row, nodes, gib in TITAN_POINTS:
        world = 8 * nodes
        bounds = {}
        for mode in ("none", "full", "selective"):
            plan = Plan.uniform(spec.num_blocks, global_batch_size=2 * world, dp=world, zero=3, recompute=mode)
            bounds[mode] = _predict(spec, plan, load_cluster("8xH100", nodes=nodes), TITAN)
        op_sac = cost_plan(plan, spec, load_cluster("8xH100", nodes=nodes), TITAN_OP_SAC).peak_memory_gib
        traced = json.loads((TRACED / f"titan8b-w{world}.json").read_text())["default"]
        rows.append({"source": f"{TORCHTITAN} {row} (max_reserved)", "run": f"llama3.1-8b FSDP{world} lbs=2 "
                     "seq=8192 op-SAC", "measured_gib": gib, "predicted_none_gib": bounds["none"]["predicted_gib"],
                     "traced_reserved_gib": traced["reserved_gib"], "traced_allocated_gib": traced["allocated_gib"],
                     "predicted_full_gib": bounds["full"]["predicted_gib"], "predicted_op_sac_gib": op_sac,
                     "static_gib": sum(bounds["none"]["breakdown_gib"][k] for k in ("params", "grads", "optimizer"))})
    return rows


REPRODUCED = RESULTS / "reserved_memory"
TRACED = RESULTS / "fake_memory"  # benchmarks/fake_memory.py: the step traced on fake tensors (CPU)


def plans_8() -> list[dict]:
    """8-rank ``galvatron.wrap`` plans of Llama 3.2 1B and Llama 3 8B, rank 0 measured on one H200 with a
    fake process group (benchmarks/results/reserved_memory ``plan-*``: the steps' allocated peak, after
    the model's construction), beside the cost model with the native runtime's options."""
    from reserved_memory import PLAN_CASES, PLAN_WORLD, plan_case

    native = CostOptions(**capabilities("native").cost_options())
    rows = []
    for case in PLAN_CASES:
        measured_path = REPRODUCED / f"{case}.default.json"
        if not measured_path.exists():
            continue
        model, seq, samples, recompute, build, kw = plan_case(case)
        if build != "device":
            continue  # the same plan built on the meta device: the same steps (measured on an H100)
        spec = ModelSpec.from_config({**load_model_config(model), "seq_len": seq})
        plan = Plan.uniform(spec.num_blocks, global_batch_size=samples * kw.get("dp", 1), dtype="bf16",
                            recompute=recompute, **kw)
        cost = cost_plan(plan, spec, load_cluster("8xH100", nodes=PLAN_WORLD // 8), native)
        measured = json.loads(measured_path.read_text())["steady_allocated_gib"]
        rows.append({"run": case, "measured_gib": measured, "predicted_gib": cost.peak_memory_gib,
                     "breakdown_gib": cost.stages[0].memory_gib})
    return rows


def titan_reproduced(titan: list[dict]) -> list[dict]:
    """torchtitan's two rows against their reproduction (default allocator, as published: the
    reproduction's reserved peak matches the published one, not the expandable-segments run's)."""
    from reserved_memory import TITAN_CASES

    replay = {(r["case"], r["allocator"]): r for r in json.loads((REPRODUCED / "replay.json").read_text())["rows"]}
    rows = []
    for row, (case, world) in zip(titan, TITAN_CASES.items(), strict=True):
        default, expandable = replay[(case, "default")], replay[(case, "expandable")]
        rows.append({"run": f"llama3.1-8b FSDP{world}", "published_reserved_gib": row["measured_gib"],
                     "reproduced_reserved_gib": default["reserved_gib"],
                     "reproduced_allocated_gib": default["allocated_gib"],
                     "predicted_allocated_gib": row["predicted_op_sac_gib"],
                     "min_capacity_default_gib": default["min_capacity_gib"],
                     "min_capacity_expandable_gib": expandable["min_capacity_gib"]})
    return rows


def _markdown(own: list[dict], titan: list[dict], summary: dict) -> str:
    date = time.strftime("%Y-%m-%d")
    out = ["# Predicted vs measured peak memory", "", f"`python benchmarks/fidelity_memory.py` ({date})."
           " Predictions: `cost_plan(..., CostOptions(**capabilities(\"native\").cost_options()))`, how"
           " `galvatron.wrap` ran them (eager autocast, fp32 parameters, eager loss).", "",
           "## GPT-3 XL 1.3B and Llama 3.2 1B on one H100 (our measurements, max_memory_allocated)", "",
           "| run | measured GiB | predicted GiB (err) | gradients held GiB (err) |", "|---|---|---|---|"]
    for r in own:
        err, err2 = r["predicted_gib"] / r["measured_gib"] - 1, r["grads_held_gib"] / r["measured_gib"] - 1
        out.append(f"| {r['run']} | {r['measured_gib']:.1f} | {r['predicted_gib']:.1f} ({err:+.1%}) | "
                   f"{r['grads_held_gib']:.1f} ({err2:+.1%}) |")
    out += ["", f"Mean absolute error: cost model {summary['own_mae']:.1%} (max {summary['own_max']:.1%}); "
            f"without the selective-recomputation runs {summary['own_mae_no_selective']:.1%}; with the "
            f"gradients held all step {summary['own_mae_grads_held']:.1%} (max {summary['own_max_grads_held']:.1%}).",
            "", f"## Llama 3.1 8B, FSDP2 on H100 ({TORCHTITAN}, max_reserved)", "",
            "| run | measured GiB | traced reserved (err) | cost model, op-SAC (err) | no recompute | full recompute "
            "| static |", "|---|---|---|---|---|---|---|"]
    for r in titan:
        err = r["predicted_op_sac_gib"] / r["measured_gib"] - 1
        traced = r["traced_reserved_gib"]
        out.append(f"| {r['run']} | {r['measured_gib']:.1f} | {traced:.1f} ({traced / r['measured_gib'] - 1:+.1%}) | "
                   f"{r['predicted_op_sac_gib']:.1f} ({err:+.1%}) | "
                   f"{r['predicted_none_gib']:.1f} | {r['predicted_full_gib']:.1f} | {r['static_gib']:.1f} |")
    out += ["", "Traced reserved: the step run on fake tensors on a CPU (`benchmarks/fake_memory.py`, "
            "`galvatron.profiler.memory_trace`), its allocations replayed through the caching-allocator "
            f"simulator (default allocator): mean absolute error {summary['titan_mae_traced']:.1%} against the "
            "published numbers, without a GPU (benchmarks/results/fake_memory).", "",
            "op-SAC: `CostOptions(selective=\"torchtitan\")` (the SDPA output and every other GEMM output "
            "kept). torchtitan reports `max_reserved` (the caching allocator's reserve, above the allocated "
            f"peak this model predicts): on our own Llama 3.2 1B runs (128K vocabulary) the reserved peak is "
            f"{summary['reserved_ratio_min']:.2f}-{summary['reserved_ratio_max']:.2f}x the allocated one "
            f"(median {summary['reserved_ratio_median']:.2f}).", "",
            f"8 -> 128 GPUs: measured drop {summary['titan_drop_measured']:.1f} GiB, predicted "
            f"{summary['titan_drop_predicted']:.1f} GiB (sharded parameters, gradients, optimizer states).", "",
            "## The same runs reproduced (benchmarks/results/reserved_memory: rank 0 on one H200, fake process group)",
            "", "| run | published reserved | reproduced reserved (vs published) | reproduced allocated "
            "| cost model, allocated (vs reproduced) | least memory: default / expandable allocator |",
            "|---|---|---|---|---|---|"]
    for r in summary["reproduced"]:
        res, alloc = r["reproduced_reserved_gib"], r["reproduced_allocated_gib"]
        out.append(f"| {r['run']} | {r['published_reserved_gib']:.1f} | {res:.1f} "
                   f"({res / r['published_reserved_gib'] - 1:+.1%}) | {alloc:.1f} | {r['predicted_allocated_gib']:.1f} "
                   f"({r['predicted_allocated_gib'] / alloc - 1:+.1%}) | {r['min_capacity_default_gib']:.1f} / "
                   f"{r['min_capacity_expandable_gib']:.1f} |")
    out += ["", "The published numbers are the caching allocator's reserve: the reproduction's reserved peak is "
            "within 1-2% of them and its allocated peak within 2% of the cost model. The reserve above the "
            "allocated peak is FSDP2's side streams (the reduce-scatter stream keeps the sharded gradients' "
            "blocks, the all-gather copy-in stream its outputs' blocks: 3.8 + 2.6 GiB at 8 ranks) and "
            "fragmentation of the default stream's segments; the cost model does not predict it, the traced "
            "step does (above)."]
    out += ["", "## 8-rank plans of Llama 3.2 1B and Llama 3 8B (rank 0 on one H200, fake process group; "
            "allocated peak of the steps)", "", "| plan | measured GiB | predicted GiB (err) |", "|---|---|---|"]
    for r in summary["plans_8"]:
        out.append(f"| {r['run']} | {r['measured_gib']:.2f} | {r['predicted_gib']:.2f} "
                   f"({r['predicted_gib'] / r['measured_gib'] - 1:+.1%}) |")
    out += ["", "benchmarks/results/reserved_memory `plan-*` (the runtime of aeac409: selective recomputation "
            "keeps the TP/SP collectives' outputs, as the cost model's `matmuls` policy counts)."]
    return "\n".join(out) + "\n"


def main() -> int:
    own, titan = own_h100(), torchtitan()
    errs = [abs(r["predicted_gib"] / r["measured_gib"] - 1) for r in own]
    errs2 = [abs(r["grads_held_gib"] / r["measured_gib"] - 1) for r in own]
    plain = [e for e, r in zip(errs, own, strict=True) if "selective" not in r["run"]]
    summary = {"own_mae": statistics.mean(errs), "own_max": max(errs), "own_mae_no_selective": statistics.mean(plain),
               "own_mae_grads_held": statistics.mean(errs2), "own_max_grads_held": max(errs2),
               "titan_drop_measured": titan[0]["measured_gib"] - titan[1]["measured_gib"],
               "titan_drop_predicted": titan[0]["predicted_op_sac_gib"] - titan[1]["predicted_op_sac_gib"],
               "titan_mae_op_sac": statistics.mean(abs(r["predicted_op_sac_gib"] / r["measured_gib"] - 1)
                                                   for r in titan),
               "titan_mae_traced": statistics.mean(abs(r["traced_reserved_gib"] / r["measured_gib"] - 1)
                                                   for r in titan), **_reserved_ratios()}
    summary["reproduced"] = titan_reproduced(titan)
    summary["plans_8"] = plans_8()
    OUT.write_text(json.dumps({"command": "python benchmarks/fidelity_memory.py", "date": time.strftime("%Y-%m-%d"),
                               "summary": summary, "own_h100": own, "torchtitan_h100": titan}, indent=2) + "\n")
    md = _markdown(own, titan, summary)
    OUT.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
