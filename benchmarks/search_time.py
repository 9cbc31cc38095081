"""Search time on this machine: llama2-7b on 8xA100-80GB and llama3-70b on 1024xH100 (every dimension).

Run: ``python benchmarks/search_time.py``; prints search time, candidates costed and the best plan.
"""

from __future__ import annotations

import sys
import time

from galvatron import ModelSpec
from galvatron.strategies.hardware import load_cluster
from galvatron.strategies.search import SearchOptions, search

CASES = [("llama2-7b", "8xA100-80GB"), ("llama3-70b", "1024xH100")]


def main() -> int:
    for model, cluster in CASES:
        start = time.perf_counter()
        result = search(ModelSpec.from_config(model), load_cluster(cluster), SearchOptions())
        elapsed = time.perf_counter() - start
        best = result.best
        print(f"{model} on {cluster}: {elapsed:.1f} s, {result.plans_costed} candidates costed, "
              f"best {best.step_time_s:.2f} s/step, MFU {best.mfu:.1%}, peak {best.peak_memory_gib:.1f} GiB")
        print(best.plan.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
