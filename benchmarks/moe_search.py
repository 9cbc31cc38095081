"""Does the search pick expert parallelism where it is faster? ``galvatron search`` on Mixtral 8x7B and the
fine-grained DeepSeek-MoE 16B preset, best plan with every dimension vs the best plan pinned to ep=1, under
the default routing imbalance (random top-k routing), a learned-router imbalance of 1.3 and capacity
factor 1.0 (dropping).

Run: ``python benchmarks/moe_search.py``; writes ``benchmarks/results/moe_search.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from galvatron.strategies.cost import CostOptions
from galvatron.strategies.hardware import load_cluster
from galvatron.strategies.search import SearchOptions, search

from galvatron import ModelSpec

CASES = [("mixtral-8x7b", "8xH100", 2), ("deepseek-moe-16b", "8xH100", 1), ("deepseek-moe-16b", "8xH100", 4)]
ROUTING = {"random top-k (default)": CostOptions(), "imbalance 1.3": CostOptions(moe_imbalance=1.3),
           "capacity factor 1.0": CostOptions(moe_capacity_factor=1.0)}
OUT = Path(__file__).parent / "results" / "moe_search.json"


def _summary(result) -> dict:
    best = result.best
    eps = sorted({g.strategy.ep for g in best.plan.groups()})
    return {"step_time_s": best.step_time_s, "mfu": best.mfu, "peak_memory_gib": best.peak_memory_gib,
            "ep": eps, "plan": best.plan.describe(), "comm_s": best.stages[0].comm_s,
            "search_time_s": result.search_time_s, "plans_costed": result.plans_costed}


def main() -> int:
    rows = []
    for model, cluster, nodes in CASES:
        spec, hw = ModelSpec.from_config(model), load_cluster(cluster, nodes=nodes)
        for routing, cost in ROUTING.items():
            free = search(spec, hw, SearchOptions(global_batch=256), cost)
            dense = search(spec, hw, SearchOptions(global_batch=256, fixed={"ep": 1}), cost)
            row = {"model": model, "cluster": f"{cluster} x{nodes} node(s)", "routing": routing,
                   "command": f"search(ModelSpec.from_config({model!r}), load_cluster({cluster!r}, nodes={nodes}), "
                              f"SearchOptions(global_batch=256[, fixed={{'ep': 1}}]), CostOptions(...))",
                   "best": _summary(free), "best_ep1": _summary(dense),
                   "speedup_over_ep1": dense.best.step_time_s / free.best.step_time_s}
            rows.append(row)
            print(f"{model} on {row['cluster']}, {routing}: best ep={row['best']['ep']} "
                  f"{free.best.step_time_s:.3f} s/step vs ep=1 {dense.best.step_time_s:.3f} s/step "
                  f"(x{row['speedup_over_ep1']:.2f})")
            print("  " + free.best.plan.describe().replace("\n", "\n  "))
    OUT.write_text(json.dumps({"command": "python benchmarks/moe_search.py", "date": time.strftime("%Y-%m-%d"),
                               "cases": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
