"""Where does the search pick expert parallelism? ``galvatron search`` on Mixtral 8x7B and the fine-grained
DeepSeek-MoE 16B preset (64 routed experts, top-6, 2 shared), best plan with every dimension (expert TP of its own,
``etp``, included) vs the best plan pinned to ep=1 and etp=0 (experts replicated, split by the layer's tp), over
cluster sizes (8-64 H100), global batches and sequence lengths, under stack variants:

- ``default``: grouped expert GEMMs, dispatch/combine all-to-all exposed, random top-k routing imbalance;
- ``shared-overlap``: Megatron-Core ``--moe-shared-expert-overlap`` (all-to-all beside the shared experts);
- ``per-expert kernels``: no grouped GEMM (SequentialMLP / Hugging Face eager experts);
- ``imbalance 1.3``: a learned router's busiest rank at 1.3x the mean (Mixtral only).

Run: ``python benchmarks/moe_search.py``; writes ``benchmarks/results/moe_search.json`` and ``.md``.
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
from galvatron.spec_config import load_model_config

VARIANTS = {
    "default": CostOptions(),
    "shared-overlap": CostOptions(moe_shared_expert_overlap=True),
    "per-expert kernels": CostOptions(moe_grouped_gemm=False),
    "imbalance 1.3": CostOptions(moe_imbalance=1.3),
}
# (model, H100 nodes, global batch, sequence length, variants)
CASES = [
    ("mixtral-8x7b", 2, 256, 4096, ("default", "imbalance 1.3")),
    *[("deepseek-moe-16b", nodes, gb, 4096, ("default", "shared-overlap"))
      for nodes in (1, 2, 4, 8) for gb in (256, 1024)],
    *[("deepseek-moe-16b", nodes, 512, 2048, ("default", "shared-overlap")) for nodes in (1, 4)],
    *[("deepseek-moe-16b", nodes, 256, 4096, ("per-expert kernels",)) for nodes in (1, 4)],
]
OUT = Path(__file__).parent / "results" / "moe_search.json"


def _summary(result) -> dict:
    best = result.best
    eps = sorted({g.strategy.ep for g in best.plan.groups()})
    etps = sorted({g.strategy.etp for g in best.plan.groups()})
    return {"step_time_s": best.step_time_s, "mfu": best.mfu, "peak_memory_gib": best.peak_memory_gib,
            "ep": eps, "etp": etps, "plan": best.plan.describe(), "comm_s": best.stages[0].comm_s,
            "search_time_s": result.search_time_s, "plans_costed": result.plans_costed}


def _short(plan: str) -> str:
    """The strategies of a described plan's layer groups, deduplicated, on one line."""
    lines = plan.splitlines()
    head = lines[0].split(", ")[0].removeprefix("plan: ") + ", " + lines[0].split(", ")[1].split(" (")[0]
    groups = list(dict.fromkeys(line.split(": ", 1)[1] for line in lines[1:]))
    return f"{head}; m={lines[0].split(' in ')[1].split(' ')[0]}; " + " / ".join(groups)


def run_case(model: str, nodes: int, gb: int, seq: int, variant: str) -> dict:
    spec = ModelSpec.from_config({**load_model_config(model), "seq_len": seq})
    hw, cost = load_cluster("8xH100", nodes=nodes), VARIANTS[variant]
    free = search(spec, hw, SearchOptions(global_batch=gb), cost)
    dense = search(spec, hw, SearchOptions(global_batch=gb, fixed={"ep": 1, "etp": 0}), cost)
    return {"model": model, "gpus": 8 * nodes, "global_batch": gb, "seq_len": seq, "variant": variant,
            "command": f"search(ModelSpec.from_config({{**load_model_config({model!r}), 'seq_len': {seq}}}), "
                       f"load_cluster('8xH100', nodes={nodes}), "
                       f"SearchOptions(global_batch={gb}[, fixed={{'ep': 1, 'etp': 0}}]), VARIANTS[{variant!r}])",
            "best": _summary(free), "best_ep1": _summary(dense),
            "speedup_over_ep1": dense.best.step_time_s / free.best.step_time_s}


def _markdown(rows: list[dict]) -> str:
    out = ["# Expert parallelism in the search", "",
           "`python benchmarks/moe_search.py`: best plan over every dimension vs best plan pinned to ep=1 "
           "and etp=0 (8xH100 nodes, bf16, default CostOptions unless the variant says otherwise; `etpN` in a plan: "
           "expert TP N other than tp, MoE Parallel Folding).", "",
           "| model | GPUs | global batch x seq | variant | best ep | best s/step | ep=1 s/step | speed-up "
           "| best plan | best ep=1 plan |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['gpus']} | {r['global_batch']} x {r['seq_len']} | {r['variant']} | "
                   f"{','.join(map(str, r['best']['ep']))} | {r['best']['step_time_s']:.3f} | "
                   f"{r['best_ep1']['step_time_s']:.3f} | {r['speedup_over_ep1']:.3f} | "
                   f"{_short(r['best']['plan'])} | {_short(r['best_ep1']['plan'])} |")
    return "\n".join(out) + "\n"


def main() -> int:
    rows = []
    for model, nodes, gb, seq, variants in CASES:
        for variant in variants:
            row = run_case(model, nodes, gb, seq, variant)
            rows.append(row)
            print(f"{model} {row['gpus']} GPUs gb={gb} seq={seq} [{variant}]: best ep={row['best']['ep']} "
                  f"{row['best']['step_time_s']:.3f} s vs ep=1 {row['best_ep1']['step_time_s']:.3f} s "
                  f"(x{row['speedup_over_ep1']:.3f})", flush=True)
    OUT.write_text(json.dumps({"command": "python benchmarks/moe_search.py", "date": time.strftime("%Y-%m-%d"),
                               "cases": rows}, indent=2) + "\n")
    OUT.with_suffix(".md").write_text(_markdown(rows))
    print(f"wrote {OUT} and {OUT.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
