"""Activations an interleaved pipeline holds, measured on the runtime against the cost model's count.

Each rank of a pipeline over gloo (``torch.distributed.pipelining``'s ``ScheduleInterleaved1F1B``
through galvatron's ``PipelineRunner``, on CPU) trains the reference GPT while a saved-tensors hook
(``galvatron.profiler.saved_bytes.SavedBytes``) tracks the bytes autograd keeps for backward: a
storage counts from the first op that saves it until the last saved reference to it is released
(parameters are left out). The hook also charges each new storage to the chunk whose forward saved
it, which gives every chunk's bytes per micro-batch (the loss's, which runs right after the last
chunk's forward, to that chunk). From those the cost model's rule (``strategies.cost.step``'s
``chunk_in_flight`` and ``peak_activations``: each chunk's micro-batches held for as long as the
schedule keeps them) predicts each rank's peak, beside the rule it replaced (the group's in-flight
micro-batches times its chunks' bytes per micro-batch, ``in_flight``). The splits put the extra
blocks on the first chunks, on the last, and leave the first and last chunks to the embedding and
the head alone.

    python benchmarks/pipeline_memory.py      # writes benchmarks/results/pipeline_memory.json and .md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

CASES = [  # (pp, virtual stages, micro-batches, blocks per chunk)
    (2, 2, 8, (2, 1, 1, 1)), (2, 2, 8, (1, 1, 1, 2)), (2, 2, 8, (0, 3, 2, 0)),
    (4, 2, 8, (2, 1, 1, 1, 1, 1, 1, 1)), (4, 2, 8, (1, 1, 1, 1, 1, 1, 1, 2)), (4, 2, 8, (0, 2, 1, 1, 1, 1, 3, 0)),
]
HIDDEN, SEQ, VOCAB, SAMPLES = 64, 128, 256, 2  # samples per micro-batch


def _rank(pp: int, v: int, m: int, split: tuple[int, ...]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from galvatron.profiler.saved_bytes import pipeline_activations

    from galvatron.models.gpt import GPT, GPTConfig
    from galvatron.plan import Plan
    from galvatron.runtime.pipeline import PipelineRunner, split_stages

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT(GPTConfig(layers=sum(split), hidden=HIDDEN, heads=4, kv_heads=4, vocab=VOCAB, seq_len=SEQ,
                          activation="swiglu", norm="rmsnorm"))
    plan = Plan.uniform(sum(split), global_batch_size=m * SAMPLES, num_micro_batches=m, pp=pp,
                        schedule="interleaved-1f1b", virtual_stages=v, layer_split=list(split), dtype="fp32")
    chunks = split_stages(model, "blocks", plan, dist.get_rank())
    runner = PipelineRunner(chunks, plan, dist.group.WORLD, lambda y, t: F.cross_entropy(y.flatten(0, 1), t.flatten()),
                            "cpu")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (m * SAMPLES, SEQ + 1), generator=gen)
    return pipeline_activations(runner, chunks, tokens[:, :-1], tokens[:, 1:], m)


def main() -> int:
    import numpy as np
    from galvatron.strategies.cost.step import chunk_in_flight, in_flight, peak_activations

    from galvatron.plan import Schedule
    from galvatron.testing import run_ranks

    rows = []
    for pp, v, m, split in CASES:
        ranks = run_ranks(_rank, pp, pp, v, m, split, timeout=600)
        for g, r in enumerate(ranks):
            chunks = r["per_chunk"]
            new = peak_activations(chunk_in_flight(Schedule.INTERLEAVED_1F1B, pp, v, m, g), chunks)
            old = in_flight(Schedule.INTERLEAVED_1F1B, pp, v, m, g) * float(np.sum(chunks))
            rows.append({"pp": pp, "v": v, "m": m, "split": list(split), "group": g,
                         "chunks": [split[c] for c in range(g, pp * v, pp)], "per_chunk_bytes": chunks,
                         "measured_peak": r["peak"], "per_chunk_rule": new, "group_rule": old,
                         "per_chunk_error": new / r["peak"] - 1, "group_error": old / r["peak"] - 1,
                         "left_after_step": r["left"]})
            print(f"pp{pp} v{v} m{m} split {split} group {g}: measured {r['peak'] / 2**20:.2f} MiB, per chunk "
                  f"{new / 2**20:.2f} ({rows[-1]['per_chunk_error']:+.1%}), group {old / 2**20:.2f} "
                  f"({rows[-1]['group_error']:+.1%})", file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/pipeline_memory.py", "date": time.strftime("%Y-%m-%d"),
              "model": {"hidden": HIDDEN, "seq": SEQ, "vocab": VOCAB, "samples_per_micro_batch": SAMPLES,
                        "dtype": "fp32", "device": "cpu (gloo)"}, "rows": rows}
    out = Path(__file__).parent / "results" / "pipeline_memory.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r: dict[str, Any]) -> str:
    lines = ["# Activations an interleaved pipeline holds: measured against the cost model", "",
             f"`{r['command']}` ({r['date']}): the reference GPT (hidden {r['model']['hidden']}, sequence "
             f"{r['model']['seq']}, {r['model']['samples_per_micro_batch']} samples per micro-batch, fp32) on gloo "
             "ranks, `ScheduleInterleaved1F1B` through `PipelineRunner`; the bytes autograd holds for backward "
             "(parameters left out) at their peak on each rank, during the second step. The rules take each "
             "chunk's bytes per micro-batch as measured in the same step.", "",
             "| pp x v, micro-batches | split | group | its chunks | measured MiB | per-chunk rule | error | "
             "group rule (before) | error |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['pp']} x {row['v']}, {row['m']} | {row['split']} | {row['group']} | {row['chunks']} | "
                     f"{row['measured_peak'] / 2**20:.2f} | {row['per_chunk_rule'] / 2**20:.2f} | "
                     f"{row['per_chunk_error']:+.1%} | {row['group_rule'] / 2**20:.2f} | {row['group_error']:+.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
