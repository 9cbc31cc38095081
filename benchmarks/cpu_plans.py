"""Predicted against measured step time of CPU-worker plans on this machine, side by side.

What ``galvatron demo`` and ``galvatron launch --search`` do on CPUs: profile the model and gloo here
(``launcher.local_cpu_perf``), search, and run the plan on gloo workers. This script costs the
search's ``--top`` best plans (and the best plan of the nominal CPU model the launcher used before,
``local_cpu_cluster``: one GEMM rate, assumed gloo) with both models, then trains each for
``--steps`` timed steps on ``--workers`` forked gloo ranks (127.0.0.1) and records the median step.

    python benchmarks/cpu_plans.py --out benchmarks/results/cpu_plans.json
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


def main() -> int:
    from galvatron.launch.launcher import (
        CPU_FIXED,
        local_cpu_cluster,
        local_cpu_perf,
        native_cost_options,
        search_runnable,
    )
    from galvatron.strategies.cost import cost_plan

    from galvatron.spec import ModelSpec
    from galvatron.testing import run_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON path; the .md table goes beside it")
    parser.add_argument("--model", default="gpt-demo")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=4, help="best plans of the profiled search to run")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per plan (median kept)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    spec = ModelSpec.from_config(args.model)
    started = time.perf_counter()
    profiled = local_cpu_perf(spec, args.workers, model=args.model)
    profile_s = time.perf_counter() - started
    nominal = local_cpu_cluster(args.workers)
    search = dict(global_batch=args.global_batch, fixed=CPU_FIXED)
    found = search_runnable(spec, args.workers, cluster=profiled, top_k=args.top, **search).top
    plans = [(f"profiled #{i + 1}", c.plan) for i, c in enumerate(found)]
    old_best = search_runnable(spec, args.workers, cluster=nominal, **search).best.plan
    if all(old_best != p for _, p in plans):
        plans.append(("nominal best", old_best))
    rows = []
    for label, plan in plans:
        predicted = cost_plan(plan, spec, profiled, native_cost_options(profiled)).step_time_s
        before = cost_plan(plan, spec, nominal, native_cost_options(nominal)).step_time_s
        print(f"{label}: {plan.describe().splitlines()[0]} ...", file=sys.stderr, flush=True)
        measured = max(run_ranks(measure, args.workers, plan.to_dict(), args.model, args.global_batch, args.steps,
                                 args.warmup, timeout=600))
        rows.append({"label": label, "plan": plan.to_dict(), "describe": plan.describe(), "measured_s": measured,
                     "predicted_s": predicted, "error": predicted / measured - 1, "nominal_predicted_s": before,
                     "nominal_error": before / measured - 1})
        print(f"  measured {measured:.4f} s, predicted {predicted:.4f} ({rows[-1]['error']:+.1%}), nominal "
              f"{before:.4f} ({rows[-1]['nominal_error']:+.1%})", file=sys.stderr, flush=True)
    overlap = profiled.cluster.overlap if profiled.cluster else None
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cores": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": args.model, "workers": args.workers, "global_batch": args.global_batch,
        "profile_s": profile_s, "compute_scale": profiled.compute_scale,
        "overlap_interference": overlap.interference if overlap else None,
        "pipeline_action_s": profiled.cluster.pipeline_action_s if profiled.cluster else None,
        "rows": rows,
        "mean_abs_error": statistics.mean(abs(r["error"]) for r in rows),
        "nominal_mean_abs_error": statistics.mean(abs(r["nominal_error"]) for r in rows),
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
             f"({r['machine']['cpu']}, torch {r['machine']['torch']}), global batch {r['global_batch']}. "
             f"Profiled in {r['profile_s']:.1f} s (model on one thread, stretched x{r['compute_scale']:.1f}; gloo "
             f"among the workers; compute lost per second of communication beside it: "
             f"{r['overlap_interference'] or 0:.2f}; pipeline schedule host time per chunk pass: "
             f"{(r.get('pipeline_action_s') or 0) * 1e3:.2f} ms). 'nominal': the model the launcher used before "
             "(one GEMM rate, gloo assumed at 2 GB/s and 50 us).", "",
             "| plan | measured s/step | predicted | error | nominal predicted | error |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        shape = "; ".join(line.strip() for line in row["describe"].splitlines()[:3])
        lines.append(f"| {row['label']}: {shape} | {row['measured_s']:.4f} | {row['predicted_s']:.4f} | "
                     f"{row['error']:+.1%} | {row['nominal_predicted_s']:.4f} | {row['nominal_error']:+.1%} |")
    lines += ["", f"Mean absolute error: profiled {r['mean_abs_error']:.1%}, "
              f"nominal {r['nominal_mean_abs_error']:.1%}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
