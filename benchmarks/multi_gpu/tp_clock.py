"""Why a fake-group TP step runs its GEMMs at a higher clock than a DP step (results/multi_gpu/README.md):
rank 0 of 2 on one GPU, ``nvidia-smi`` sampled beside each plan, GEMM TFLOP/s from the kernel profile.
Plans: ``dp2 zero2``; ``tp2+sp`` (embedding and head vocabulary-parallel, so on a fake group, whose
all-reduce sums nothing, half the tokens enter the blocks as zeros and the loss sees half the vocabulary);
``tp2+sp, dp2 ends`` (the same blocks, the embedding and head data parallel: the blocks compute on real
values).

    python benchmarks/multi_gpu/tp_clock.py --layers 16 --out $OUT/tp_clock.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from galvatron.launch.cmd_profile import gpt_config

from galvatron.plan import LayerStrategy, Plan
from galvatron.spec_config import load_model_config


def _gemm_tflops(ops: list[dict]) -> float:
    flops = ms = 0.0
    for o in ops:
        m = re.match(r"aten::mm \[\[(\d+), (\d+)\], \[(\d+), (\d+)\]\]", o["op"])
        if m:
            a, b, _, e = map(int, m.groups())
            flops += 2 * a * b * e * o["calls_per_step"]
            ms += o["ms_per_step"]
    return flops / ms / 1e9 if ms else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plans import _init_fake, measure

    device = _init_fake(2)
    config = {**load_model_config("llama2-7b"), "seq_len": 2048, "layers": args.layers}
    cfg = gpt_config(config)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab, (8, cfg.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    tp = Plan.uniform(args.layers, global_batch_size=8, dtype="bf16", tp=2, sp=True)
    plans = {"dp2 zero2": Plan.uniform(args.layers, global_batch_size=8, dtype="bf16", dp=2, zero=2),
             "tp2+sp": tp,
             "tp2+sp, dp2 ends": dataclasses.replace(tp, embedding=LayerStrategy(dp=2), head=LayerStrategy(dp=2))}
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,utilization.gpu",
                            "--format=csv,noheader,nounits", "-lms", "200"], stdout=subprocess.PIPE, text=True)
    marks, rows = [], []
    start = time.perf_counter()
    for name, plan in plans.items():
        begin = time.perf_counter() - start
        row = measure(cfg, plan, x, y, 2, args.steps, device, profile=True)
        marks.append((name, begin, time.perf_counter() - start))
        rows.append({"plan": name, "measured_s": row["measured_s"], "gemm_tflops": _gemm_tflops(row["ops"]),
                     "categories_ms": row["categories_ms"]})
        print(json.dumps(rows[-1]), flush=True)
    smi.terminate()
    samples = [line.split(",") for line in smi.communicate()[0].splitlines() if line.count(",") == 2]
    # nvidia-smi prints a sample every 200 ms from its start, which is this script's ``start``
    for row, (_, begin, end) in zip(rows, marks, strict=True):
        busy = [(float(c), float(p)) for i, (c, p, u) in enumerate(samples)
                if begin <= 0.2 * i <= end and float(u) >= 90]
        row["sm_mhz"] = statistics.median(c for c, _ in busy) if busy else None
        row["power_w"] = statistics.median(p for _, p in busy) if busy else None
        print(row["plan"], row["sm_mhz"], row["power_w"], round(row["gemm_tflops"]), flush=True)
    command = "python benchmarks/multi_gpu/tp_clock.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps({"command": command, "device": torch.cuda.get_device_name(),
                                          "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
