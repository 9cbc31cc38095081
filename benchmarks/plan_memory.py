"""A searched plan's device memory measured, against its fake-tensor trace: does ``search
--trace-memory`` pass over the right plans?

Each plan (a plan YAML, as ``galvatron search --out`` writes) trains the reference GPT of ``--model``
as rank 0 of the plan's world on a fake process group (collectives move no data, every allocation is
the real one), built on the meta device and materialised by ``galvatron.wrap``, with at most
``--micro-batches`` micro-batches per step as ``memory_trace.trace_plan`` traces it (the plan's
micro-batch size kept); 3 steps of fused AdamW. Reports the allocator's peaks, or that it ran out of
memory; ``--trace`` (no GPU needed) adds the trace's prediction of the same run. ``--allocator
expandable`` runs it as ``galvatron launch`` starts workers (``expandable_segments:True``); ``--cap-gib``
lets the allocator hold at most that much (``torch.cuda.set_per_process_memory_fraction``), which
tests the trace's least memory: above it the step runs, releasing cached memory as it must, below it
runs out.

    python benchmarks/plan_memory.py --model llama3-8b PLAN.yaml [PLAN.yaml ...] --out FILE.json   # GPU
    python benchmarks/plan_memory.py --model llama3-8b PLAN.yaml --allocator expandable --cap-gib 72  # GPU
    python benchmarks/plan_memory.py --model llama3-8b PLAN.yaml --trace                             # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30
STEPS = 3
ALLOC_CONF = {"default": "expandable_segments:False", "expandable": "expandable_segments:True"}


def measure(model_name: str, plan_path: str, micro_batches: int, cap_gib: float | None = None) -> dict[str, Any]:
    """The plan's steps on this GPU as rank 0 (run in a fresh process: the peaks are the process's),
    the allocator holding at most ``cap_gib`` if given."""
    import torch
    import torch.distributed as dist
    from galvatron.launch.cmd_profile import gpt_config
    from galvatron.profiler.memory_trace import fewer_micro_batches, lm_training_step
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import galvatron
    from galvatron.models import GPT
    from galvatron.plan import Plan
    from galvatron.spec_config import load_model_config

    plan = fewer_micro_batches(Plan.load(plan_path), micro_batches)
    cfg = gpt_config(load_model_config(model_name))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=plan.world_size)
    out: dict[str, Any] = {"plan": plan_path, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "micro_batches": plan.num_micro_batches, "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF"),
                           "cap_gib": cap_gib}
    if cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    start = time.perf_counter()
    try:
        with torch.device("meta"):
            model = GPT(cfg)
        wrapped = galvatron.wrap(model, plan=plan)
        with torch.no_grad():
            for p in wrapped.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).normal_(0.0, 0.02)
        offload = any(g.strategy.offload for s in plan.stages for g in s.groups)
        rows = plan.global_batch_size // plan.stages[0].groups[0].strategy.dp
        tokens = torch.randint(0, cfg.vocab, (rows, cfg.seq_len + 1), device="cuda")
        step = lm_training_step(wrapped, tokens, fused=not offload)  # fused as traced
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        out["out_of_memory"] = False
    except torch.OutOfMemoryError as err:
        out["out_of_memory"] = True
        out["error"] = str(err).splitlines()[0]
    out.update(seconds=time.perf_counter() - start, peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
               peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
               device_memory_gib=torch.cuda.get_device_properties(0).total_memory / GIB)
    dist.destroy_process_group()
    return out


def trace(model_name: str, plan_path: str, micro_batches: int) -> dict[str, Any]:
    from galvatron.launch.cmd_profile import gpt_config
    from galvatron.profiler.memory_trace import trace_plan

    from galvatron.models import GPT
    from galvatron.plan import Plan
    from galvatron.spec_config import load_model_config

    plan = Plan.load(plan_path)
    cfg = gpt_config(load_model_config(model_name))
    t = trace_plan(lambda: GPT(cfg), plan, world=plan.world_size, seq_len=cfg.seq_len, vocab=cfg.vocab,
                   steps=STEPS, micro_batches=micro_batches)
    return {"plan": plan_path, "traced_allocated_gib": t.allocated_peak / GIB,
            "traced_reserved_gib": t.reserved_peak["default"] / GIB,
            "traced_reserved_expandable_gib": t.reserved_peak["expandable_segments"] / GIB,
            "least_memory_gib": t.least_memory["default"] / GIB,
            "least_memory_expandable_gib": t.least_memory["expandable_segments"] / GIB, "trace_seconds": t.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plans", nargs="+", help="plan YAML files")
    parser.add_argument("--model", required=True, help="model preset or YAML (the reference GPT)")
    parser.add_argument("--micro-batches", type=int, default=4, help="at most this many per step (as traced)")
    parser.add_argument("--trace", action="store_true", help="no GPU: the trace's prediction of each run")
    parser.add_argument("--allocator", choices=sorted(ALLOC_CONF), default="default",
                        help="the caching allocator's mode for the measured runs (expandable: as galvatron launch)")
    parser.add_argument("--cap-gib", type=float, help="the most device memory the allocator may hold (GiB)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single measurement, this process
    parser.add_argument("--out", type=Path, help="write the rows here (JSON)")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.model, args.plans[0], args.micro_batches, args.cap_gib)), flush=True)
        return 0
    rows = []
    for path in args.plans:
        if args.trace:
            row = trace(args.model, path, args.micro_batches)
        else:
            cap = ["--cap-gib", str(args.cap_gib)] if args.cap_gib is not None else []
            env = {**os.environ, "PYTORCH_ALLOC_CONF": ALLOC_CONF[args.allocator]}
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
            run = subprocess.run([sys.executable, __file__, "--one", "--model", args.model, "--micro-batches",
                                  str(args.micro_batches), *cap, path], capture_output=True, text=True, env=env)
            lines = run.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if run.returncode == 0 and lines else {
                "plan": path, "error": run.stderr.strip().splitlines()[-1:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        command = " ".join(["python", "benchmarks/plan_memory.py", *(argv if argv is not None else sys.argv[1:])])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "model": args.model, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
