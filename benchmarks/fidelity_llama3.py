"""Llama 3 405B pre-training on 8K and 16K H100s (Grattafiori et al. 2024, The Llama 3 Herd of Models,
Table 4), against the cost model's best plan under the published degrees.

The paper gives, per configuration, the GPUs, TP, CP, PP and DP degrees, the sequence length, 16M tokens
per batch and the achieved BF16 TFLOP/s per GPU (430 / 400 / 380; 43 / 41 / 38% MFU) on Meta's RoCE
cluster (H100 SXM at 700 W, 8 per server on NVLink, one 400 Gb/s NIC per GPU). It does not give the
micro-batch count, the pipeline's virtual stages or schedule, the recomputation, ZeRO's stage or how it
counts FLOPs. So the prediction here is the search's best plan with TP, CP, PP and DP pinned to the
published degrees and the global batch fixed, every other dimension searched: what the cost model says
those degrees can reach. Achieved TFLOP/s are counted as Megatron counts them (attention without the
causal saving); causal counting lowers the 8K rows' figures by about 4% and the 128K row's by about a
third, so the 128K row is listed but not scored.

    python benchmarks/fidelity_llama3.py        # writes benchmarks/results/fidelity_llama3.json and .md
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

SOURCE = ("Grattafiori et al. 2024, The Llama 3 Herd of Models (arXiv 2407.21783), Table 4: scaling "
          "configurations and MFU of Llama 3 405B pre-training; also shown in Balaji, SC'24 'Herding Llamas'")

RUNS = [  # (GPUs, TP, CP, PP, DP, sequence, published TFLOP/s per GPU, scored)
    (8192, 8, 1, 16, 64, 8192, 430, True),
    (16384, 8, 1, 16, 128, 8192, 400, True),
    (16384, 8, 16, 16, 8, 131072, 380, False),
]
TOKENS_PER_BATCH = 16 * 2**20


def cluster(gpus: int) -> dict:
    """Meta's RoCE cluster as the hardware database describes it: 8 H100 SXM per server, one 400 Gb/s
    RoCE NIC per GPU."""
    return {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": gpus // 8, "inter_node": "roce-400g",
            "nics_per_node": 8}


def main() -> int:
    from galvatron.strategies.hardware import load_cluster
    from galvatron.strategies.search import SearchOptions, search

    from galvatron.plan import Recompute
    from galvatron.spec import ModelSpec
    from galvatron.spec_config import load_model_config

    rows = []
    for gpus, tp, cp, pp, dp, seq, published, scored in RUNS:
        spec = ModelSpec.from_config({**load_model_config("llama3-405b"), "seq_len": seq})
        batch = TOKENS_PER_BATCH // seq
        best_by_mode = {}
        for modes in (tuple(Recompute), (Recompute.NONE,), (Recompute.SELECTIVE,)):
            options = SearchOptions(global_batch=batch, recompute=modes, fixed={"tp": tp, "cp": cp, "pp": pp, "dp": dp})
            start = time.perf_counter()
            result = search(spec, load_cluster(cluster(gpus)), options)
            best = result.best
            best_by_mode["+".join(m.value for m in modes)] = {
                "tflops_per_gpu": best.tflops_per_gpu if best else None,
                "step_time_s": best.step_time_s if best else None,
                "peak_memory_gib": best.peak_memory_gib if best else None,
                "plan": best.plan.describe() if best else None, "plan_dict": best.plan.to_dict() if best else None,
                "search_s": time.perf_counter() - start, "plans_costed": result.plans_costed}
        top = best_by_mode["+".join(m.value for m in Recompute)]
        # what-if: NVLink 1000x faster, so TP's collectives (inside a server) cost next to nothing
        hidden = search(spec, load_cluster(cluster(gpus), intra_node_gbps=1000 * 450.0),
                        SearchOptions(global_batch=batch, fixed={"tp": tp, "cp": cp, "pp": pp, "dp": dp})).best
        rows.append({"gpus": gpus, "tp": tp, "cp": cp, "pp": pp, "dp": dp, "seq": seq, "global_batch": batch,
                     "published_tflops": published, "predicted_tflops": top["tflops_per_gpu"],
                     "error": top["tflops_per_gpu"] / published - 1, "scored": scored, "searches": best_by_mode,
                     "tp_hidden_tflops": hidden.tflops_per_gpu})
        print(f"{gpus} GPUs tp{tp} cp{cp} pp{pp} dp{dp} seq {seq}: published {published}, predicted "
              f"{top['tflops_per_gpu']:.0f} ({rows[-1]['error']:+.1%})", file=sys.stderr, flush=True)
    scored = [r for r in rows if r["scored"]]
    result = {"command": "python benchmarks/fidelity_llama3.py", "date": time.strftime("%Y-%m-%d"), "source": SOURCE,
              "rows": rows, "mean_abs_error": statistics.mean(abs(r["error"]) for r in scored),
              "mean_error": statistics.mean(r["error"] for r in scored)}
    out = Path(__file__).parent / "results" / "fidelity_llama3.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _rate(tflops: float | None) -> str:
    return f"{tflops:.0f}" if tflops else "none fits"


def _markdown(r: dict) -> str:
    lines = [f"# Llama 3 405B on 8K and 16K H100s: published against the cost model ({r['date']})", "",
             f"`{r['command']}`. Source: {r['source']}.", "",
             "The search's best plan with TP, CP, PP and DP pinned to the published degrees and 16M tokens per batch; "
             "micro-batches, virtual stages, schedule, ZeRO stage and recomputation searched (the paper does not "
             "give them). TFLOP/s per GPU counted as Megatron counts them.", "",
             "| GPUs | TP | CP | PP | DP | seq | batch | published TFLOP/s | predicted | error | "
             "best with no recomputation | best with selective everywhere | TP collectives free (what-if) | "
             "best plan |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        s = row["searches"]
        none, sel = s["none"]["tflops_per_gpu"], s["selective"]["tflops_per_gpu"]
        top = next(v for k, v in s.items() if "+" in k)
        plan = top["plan_dict"]
        shape = (f"{plan['num_micro_batches']} micro-batches, {plan['pipeline']['schedule']} x "
                 f"{plan['pipeline']['virtual_stages']}, zero {plan['strategy']['zero']}, "
                 f"recompute {plan['strategy']['recompute']}, {top['peak_memory_gib']:.1f} GiB")
        err = f"{row['error']:+.1%}" + ("" if row["scored"] else " (not scored)")
        lines.append(f"| {row['gpus']} | {row['tp']} | {row['cp']} | {row['pp']} | {row['dp']} | {row['seq']} | "
                     f"{row['global_batch']} | {row['published_tflops']} | {row['predicted_tflops']:.0f} | {err} | "
                     f"{_rate(none)} | {_rate(sel)} | {row['tp_hidden_tflops']:.0f} | {shape} |")
    lines += ["", f"Scored rows (8K sequence): mean absolute error {r['mean_abs_error']:.1%}, mean "
              f"{r['mean_error']:+.1%}.", "",
              "Under these degrees the cost model fits a micro-batch of one 8K sequence in 80 GB only with full "
              "recomputation (or ZeRO-3 without any), and then prefers 4 virtual stages to shrink the bubble; "
              "the published runs reached 12-16% more than its best. What they ran instead is not published in "
              "enough detail to cost (the paper describes a tuned pipeline schedule and work on its memory); "
              "the gap may sit in TP's collectives, which the model leaves exposed in the forward (with them "
              "free, the what-if column, the best plans reach 446 and 400), in the memory model (in-flight "
              "activations under pipelining) or in the GEMM rate, which our own H100 runs find 3-6% pessimistic "
              "at 1B shapes.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
