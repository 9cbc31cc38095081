"""Device memory while ``galvatron.wrap`` builds a plan: the model built on the device, on the host,
or on the meta device (then its shards materialised, values left for a checkpoint to load).

Llama-style reference GPT as rank 0 of 8 (a fake process group: collectives move no data, every
allocation is the real one) under two plans: ``tp4`` (dp2 tp4+sp ZeRO-1) and ``zero3`` (dp8 ZeRO-3).
Each case runs in its own process and reports the allocator's peaks from the model's construction to
the end of ``wrap``, and what the rank keeps after it.

    python benchmarks/wrap_peak.py --out FILE.json                      # GPU: every case
    python benchmarks/wrap_peak.py --case llama3-8b cpu tp4             # one case, this process
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PLANS = {"tp4": {"dp": 2, "tp": 4, "sp": True, "zero": 1}, "zero3": {"dp": 8, "zero": 3}}
BUILDS = ("cuda", "cpu", "meta")
GIB = 1 << 30


def one(model_name: str, where: str, plan_name: str) -> dict:
    import torch
    import torch.distributed as dist
    from galvatron.launch.cmd_profile import gpt_config
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import galvatron
    from galvatron.models.gpt import GPT, rope_cache
    from galvatron.plan import Plan
    from galvatron.spec_config import load_model_config

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    cfg = gpt_config({**load_model_config(model_name), "seq_len": 4096})
    cuda = torch.cuda.is_available()  # without a GPU: a smoke test of the script, no peaks
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.device(where):
        model = GPT(cfg)
    built = time.perf_counter() - start
    if where == "meta":  # non-persistent buffers no checkpoint holds
        model.rope_cos, model.rope_sin = rope_cache(cfg.seq_len, cfg.hidden // cfg.heads)
    plan = Plan.uniform(cfg.layers, global_batch_size=8, dtype="bf16", **PLANS[plan_name])
    model = galvatron.wrap(model, plan)
    if cuda:
        torch.cuda.synchronize()
    wrapped = time.perf_counter() - start - built
    out = {"model": model_name, "build": where, "plan": plan_name, "build_s": built, "wrap_s": wrapped,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
           "kept_allocated_gib": torch.cuda.memory_allocated() / GIB if cuda else None}
    dist.destroy_process_group()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=3, metavar=("MODEL", "BUILD", "PLAN"), help="one case in this process")
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--out", type=Path, help="every case: the JSON written here")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(one(*args.case)), flush=True)
        return 0
    rows = []
    for plan in PLANS:
        for where in BUILDS:
            run = subprocess.run([sys.executable, __file__, "--case", args.model, where, plan],
                                 capture_output=True, text=True)
            if run.returncode:
                rows.append({"model": args.model, "build": where, "plan": plan,
                             "error": run.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": " ".join(["python", "benchmarks/wrap_peak.py", *(argv or sys.argv[1:])]), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
