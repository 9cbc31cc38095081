"""Which context-parallel kind does the search pick, and where? Long-sequence training of a GQA model
(Llama 3 8B: 8 KV heads) and an MHA model (Llama 2 7B: 32 KV heads) at 32K, 128K and 1M tokens, on one
node of 8 H100 and on 4 nodes, every dimension of the space enabled. For each case: the best plan and
the best plan with each CP kind pinned (its cost beside the winner's), so the margins are visible. The
choices follow from the cost model only: Ulysses needs the (TP-local) KV heads divisible by its degree
and moves q/k/v/o by all-to-all; ring moves K/V blocks p2p but a causal mask leaves the last rank of a
contiguous split a full block per step; striped halves that; hybrid runs Ulysses inside a node and the
ring across nodes.

Run: ``python benchmarks/cp_regimes.py``; writes ``benchmarks/results/cp_regimes.json`` and ``.md``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from galvatron.strategies.hardware import load_cluster
from galvatron.strategies.search import SearchOptions, search

from galvatron import ModelSpec
from galvatron.errors import MemoryBudgetError
from galvatron.plan import CPKind
from galvatron.spec_config import load_model_config

MODELS = ["llama3-8b", "llama2-7b"]
SEQS = [32768, 131072, 1048576]
NODES = [1, 4]
OUT = Path(__file__).parent / "results"


def _cp(plan) -> str:
    kinds = sorted({(g.strategy.cp, g.strategy.cp_kind.value, g.strategy.cp_ulysses) for g in plan.groups()})
    return ", ".join(f"cp{c} {k}" + (f"(u{u})" if k == "hybrid" else "") if c > 1 else "cp1" for c, k, u in kinds)


def _best(spec: ModelSpec, cluster, fixed: dict) -> dict | None:
    try:
        r = search(spec, cluster, SearchOptions(global_batch=cluster.world_size // 8 or 1, fixed=fixed, max_cp=32))
    except MemoryBudgetError:
        return None
    return {"step_time_s": r.best.step_time_s, "cp": _cp(r.best.plan), "plan": r.best.plan.describe(),
            "comm_s": r.best.stages[0].comm_s, "search_time_s": r.search_time_s}


def main() -> int:
    rows = []
    for model in MODELS:
        for seq in SEQS:
            spec = ModelSpec.from_config({**load_model_config(model), "seq_len": seq})
            for nodes in NODES:
                cluster = load_cluster("8xH100", nodes=nodes)
                row = {"model": model, "kv_heads": spec.blocks[0].kv_heads, "seq_len": seq, "gpus": cluster.world_size,
                       "best": _best(spec, cluster, {}),
                       "by_kind": {k.value: _best(spec, cluster, {"cp_kind": k.value}) for k in CPKind}}
                rows.append(row)
                b = row["best"]
                alt = ", ".join(f"{k} {v['step_time_s']:.2f}" if v else f"{k} none fits"
                                for k, v in row["by_kind"].items())
                print(f"{model} seq {seq} on {cluster.world_size}: best {b['cp'] if b else '-'} "
                      f"{b['step_time_s'] if b else float('nan'):.2f} s; pinned: {alt}", flush=True)
    result = {"command": "python benchmarks/cp_regimes.py", "date": time.strftime("%Y-%m-%d"), "cases": rows}
    (OUT / "cp_regimes.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Context-parallel kind chosen by the search\n", "`python benchmarks/cp_regimes.py`; H100 nodes of 8, "
             "global batch = GPUs / 8 samples; step seconds of the best plan and of the best plan per pinned kind.\n",
             "| model (KV heads) | seq | GPUs | chosen | step s | ulysses | ring | striped | hybrid |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{v['step_time_s']:.2f} ({v['cp']})" if v else "no fit" for v in r["by_kind"].values()]
        b = r["best"]
        chosen = f"{b['cp']} | {b['step_time_s']:.2f}" if b else "nothing fits | -"
        lines.append(f"| {r['model']} ({r['kv_heads']}) | {r['seq_len'] // 1024}K | {r['gpus']} | {chosen} | "
                     + " | ".join(cells) + " |")
    (OUT / "cp_regimes.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
