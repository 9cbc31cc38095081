"""Search time on this machine: llama2-7b on 8xA100-80GB, llama3-70b and gpt3-175b (tied embeddings)
on 1024xH100, every dimension of the space enabled (``SearchOptions()``: pp, tp, sp, every cp kind,
ep, ZeRO 0-3, offload, every recompute level, 1F1B / interleaved / zero-bubble, any micro-batch
count).

Run: ``python benchmarks/search_time.py [--repeat 3]``; prints the median search time of each case, the
candidates costed and the best plan, and writes ``benchmarks/results/search_time.json`` (with the load
average of the machine while it ran: the timings are wall-clock).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from galvatron.strategies.hardware import load_cluster
from galvatron.strategies.search import SearchOptions, search

from galvatron import ModelSpec

CASES = [("llama2-7b", "8xA100-80GB", 1.0), ("llama3-70b", "1024xH100", 30.0),
         ("gpt3-175b", "1024xH100", 30.0)]  # tied embeddings: pipelines pair their first and last stages
OUT = Path(__file__).parent / "results" / "search_time.json"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the median is reported)")
    args = parser.parse_args()
    cases = []
    for model, cluster, target in CASES:
        spec, hw = ModelSpec.from_config(model), load_cluster(cluster)
        times, load = [], []
        for _ in range(args.repeat):
            load.append(os.getloadavg()[0])
            start = time.perf_counter()
            result = search(spec, hw, SearchOptions())
            times.append(time.perf_counter() - start)
        best = result.best
        median = statistics.median(times)
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"{model} on {cluster}: median {median:.2f} s of {args.repeat} (runs {runs}; "
              f"target < {target:g} s), {result.plans_costed} candidates costed, best {best.step_time_s:.3f} s/step, "
              f"MFU {best.mfu:.1%}, peak {best.peak_memory_gib:.1f} GiB, load average {statistics.mean(load):.2f}")
        print(best.plan.describe())
        cases.append({"model": model, "cluster": cluster, "options": "SearchOptions() (every dimension)",
                      "search_time_s": median, "runs_s": times, "target_s": target, "meets_target": median < target,
                      "plans_costed": result.plans_costed, "best_step_time_s": best.step_time_s, "best_mfu": best.mfu,
                      "best_peak_memory_gib": best.peak_memory_gib, "best_plan": best.plan.describe(),
                      "load_average_1min": load})
    OUT.write_text(json.dumps({
        "command": f"python benchmarks/search_time.py --repeat {args.repeat}", "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "machine": "2-core machine shared with other agents (load average per run below)", "cases": cases,
    }, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
