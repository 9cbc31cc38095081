"""Predicted against measured step time of CPU-worker plans on this machine, side by side.

What ``galvatron demo`` and ``galvatron launch --search`` do on CPUs: profile the model and gloo here
(``launcher.local_cpu_perf``), search, and run the plan on gloo workers. This script costs the
search's ``--top`` best plans (and the best plan of the nominal CPU model the launcher used before,
``local_cpu_cluster``: one GEMM rate, assumed gloo) with both models and with the profile's
collectives as fast beside compute as alone, then trains each for ``--steps`` timed steps on
``--workers`` forked gloo ranks (127.0.0.1) and records the median step. ``--rounds`` repeats it all,
profiles included: on shared cores the profiles and the runs differ from one round to the next.
``--data-parallel 1,0 2,0`` also runs one-stage data-parallel plans (micro-batches, ZeRO stage).

    python benchmarks/cpu_plans.py --rounds 3 --top 2 --data-parallel 1,0 2,0 4,0 1,1 \\
        --out benchmarks/results/cpu_plans.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def measure(plan_dict: dict, model: str, global_batch: int, steps: int, warmup: int) -> float:
    """Median seconds per training step of the demo's loop under the plan, on this rank."""
    import torch.distributed as dist
    from galvatron.launch.demo import gpt_config, lm_loss

    from galvatron import wrap
    from galvatron.models.gpt import GPT
    from galvatron.plan import Plan

    torch.set_num_threads(1)
    gpt = gpt_config(model)
    torch.manual_seed(0)
    wrapped = wrap(GPT(gpt), plan=Plan.from_dict(plan_dict))
    optimizer = wrapped.optimizer(torch.optim.AdamW, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, gpt.vocab, (global_batch, gpt.seq_len + 1), generator=gen)
    batch = wrapped.shard_batch((tokens[:, :-1], tokens[:, 1:]))
    times = []
    for step in range(warmup + steps):
        dist.barrier()
        start = time.perf_counter()
        wrapped.train_step(batch, lm_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_round(args: argparse.Namespace) -> dict[str, Any]:
    """Profile here, search, cost the plans (also as the cost model ran before) and measure them."""
    import dataclasses

    from galvatron.launch.launcher import (
        CPU_FIXED,
        _profile_cpu_model,
        local_cpu_cluster,
        local_cpu_perf,
        native_cost_options,
        search_runnable,
    )
    from galvatron.strategies.cost import cost_plan

    from galvatron.plan import Plan
    from galvatron.spec import ModelSpec
    from galvatron.testing import run_ranks

    spec = ModelSpec.from_config(args.model)
    _profile_cpu_model.cache_clear()  # each round profiles afresh: the spread between profiles is part of the result
    started = time.perf_counter()
    profiled = local_cpu_perf(spec, args.workers, model=args.model)
    profile_s = time.perf_counter() - started
    options = native_cost_options(profiled)
    as_alone = dataclasses.replace(options, overlap_comm_slowdown=1.0)
    cores = dataclasses.replace(profiled, compute_scale=max(1.0, args.workers / len(os.sched_getaffinity(0))))
    nominal = local_cpu_cluster(args.workers)
    search = dict(global_batch=args.global_batch, fixed=CPU_FIXED)
    found = search_runnable(spec, args.workers, cluster=profiled, top_k=args.top, **search).top
    plans = [(f"profiled #{i + 1}", c.plan) for i, c in enumerate(found)]
    old_best = search_runnable(spec, args.workers, cluster=nominal, **search).best.plan
    if all(old_best != p for _, p in plans):
        plans.append(("nominal best", old_best))
    for m, zero in args.data_parallel:  # the plans whose gradient sync runs beside the backward
        plan = Plan.uniform(spec.num_blocks, global_batch_size=args.global_batch, num_micro_batches=m,
                            dp=args.workers, zero=zero, dtype="fp32")
        if all(plan != p for _, p in plans):
            plans.append((f"dp{args.workers} m{m} zero{zero}", plan))
    rows = []
    for label, plan in plans:
        predicted = cost_plan(plan, spec, profiled, options).step_time_s
        alone = cost_plan(plan, spec, profiled, as_alone).step_time_s
        by_cores = cost_plan(plan, spec, cores, options).step_time_s
        before = cost_plan(plan, spec, nominal, native_cost_options(nominal)).step_time_s
        print(f"{label}: {plan.describe().splitlines()[0]} ...", file=sys.stderr, flush=True)
        measured = max(run_ranks(measure, args.workers, plan.to_dict(), args.model, args.global_batch, args.steps,
                                 args.warmup, timeout=600))
        rows.append({"label": label, "plan": plan.to_dict(), "describe": plan.describe(), "measured_s": measured,
                     "predicted_s": predicted, "error": predicted / measured - 1,
                     "as_alone_predicted_s": alone, "as_alone_error": alone / measured - 1,
                     "cores_predicted_s": by_cores, "cores_error": by_cores / measured - 1,
                     "nominal_predicted_s": before, "nominal_error": before / measured - 1})
        row = rows[-1]
        print(f"  measured {measured:.4f} s, predicted {predicted:.4f} ({row['error']:+.1%}), comm as alone "
              f"{alone:.4f} ({row['as_alone_error']:+.1%}), nominal {before:.4f} ({row['nominal_error']:+.1%})",
              file=sys.stderr, flush=True)
    overlap = profiled.cluster.overlap if profiled.cluster else None
    return {"profile_s": profile_s, "compute_scale": profiled.compute_scale,
            "overlap_interference": overlap.interference if overlap else None,
            "overlap_comm_slowdown": overlap.comm_slowdown if overlap else None,
            "pipeline_action_s": profiled.cluster.pipeline_action_s if profiled.cluster else None, "rows": rows}


def _pair(text: str) -> tuple[int, int]:
    m, zero = (int(x) for x in text.split(","))
    return m, zero


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; the .md table goes beside it")
    parser.add_argument("--model", default="gpt-demo")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=4, help="best plans of the profiled search to run")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per plan (median kept)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="profile, search and measure this many times")
    parser.add_argument("--data-parallel", type=_pair, nargs="*", default=[], metavar="M,ZERO",
                        help="also run one-stage data parallelism in M micro-batches at ZeRO stage ZERO")
    args = parser.parse_args()

    rounds = [run_round(args) for _ in range(args.rounds)]
    rows = [row for r in rounds for row in r["rows"]]

    def mae(key: str) -> float:
        return statistics.mean(abs(row[key]) for row in rows)

    result = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cores": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": args.model, "workers": args.workers, "global_batch": args.global_batch,
        "rounds": rounds,
        "mean_abs_error": mae("error"), "as_alone_mean_abs_error": mae("as_alone_error"),
        "cores_mean_abs_error": mae("cores_error"),
        "nominal_mean_abs_error": mae("nominal_error"),
        "mean_error": statistics.mean(row["error"] for row in rows),
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"# CPU-worker plans: predicted vs measured ({r['date']})", "",
             f"`{r['command']}`", "",
             f"{r['model']} on {r['workers']} gloo workers sharing {r['machine']['cores']} cores "
             f"({r['machine']['cpu']}, torch {r['machine']['torch']}), global batch {r['global_batch']}, "
             f"{len(r['rounds'])} round(s), each profiling the model and gloo afresh. 'predicted': as "
             "`galvatron demo` costs it; 'comm as alone': the same profile with collectives beside compute "
             "as fast as alone (`overlap_comm_slowdown` 1, the cost model before it was measured); 'stretch "
             "w/c': the same profile with compute stretched by workers / cores instead of the measured "
             "sharing (`ClusterProfile.compute_sharing`, the cost model before it was measured); 'nominal': "
             "the model the launcher used before profiling (one GEMM rate, gloo assumed at 2 GB/s and 50 us).", ""]
    for i, rd in enumerate(r["rounds"]):
        lines += [f"Round {i + 1}: profiled in {rd['profile_s']:.1f} s (model on one thread, stretched "
                  f"x{rd['compute_scale']:.2f}; beside compute, communication costs "
                  f"{rd['overlap_interference'] or 0:.2f} s of compute per second and runs "
                  f"{rd.get('overlap_comm_slowdown') or 1:.2f}x slower; pipeline schedule host time per chunk pass "
                  f"{(rd.get('pipeline_action_s') or 0) * 1e3:.2f} ms).", "",
                  "| plan | measured s/step | predicted | error | comm as alone | error | stretch w/c | error | "
                  "nominal | error |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rd["rows"]:
            shape = "; ".join(line.strip() for line in row["describe"].splitlines()[:3])
            lines.append(f"| {row['label']}: {shape} | {row['measured_s']:.4f} | {row['predicted_s']:.4f} | "
                         f"{row['error']:+.1%} | {row['as_alone_predicted_s']:.4f} | {row['as_alone_error']:+.1%} | "
                         f"{row['cores_predicted_s']:.4f} | {row['cores_error']:+.1%} | "
                         f"{row['nominal_predicted_s']:.4f} | {row['nominal_error']:+.1%} |")
        lines.append("")
    lines += [f"Mean absolute error over every row: predicted {r['mean_abs_error']:.1%} (mean "
              f"{r['mean_error']:+.1%}), comm as alone {r['as_alone_mean_abs_error']:.1%}, stretch w/c "
              f"{r['cores_mean_abs_error']:.1%}, "
              f"nominal {r['nominal_mean_abs_error']:.1%}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
