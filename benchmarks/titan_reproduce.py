"""torchtitan's published Llama 3.1 8B FSDP step, reproduced on one GPU and set beside the cost model.

torchtitan's Dec 2024 H100 benchmark (``benchmarks/llama3_h100_202412_torchtitan.md`` Table 1: 8 GPUs,
local batch 2 x 8192, per-op selective AC; 5,762 tok/s/GPU eager, 6,667 with ``torch.compile``) ran on
H100s with 96 GB of HBM2e at 2.4 TB/s under a 500 W power limit. The cost model prices that machine's
memory but not its power cap (+22% / +42% optimistic, ``fidelity_megatron.py``). This script runs the
same step as rank 0 of 8 FSDP ranks sees it (``reserved_memory.titan_trainer``: a fake process group,
so collectives move nothing; every kernel of the rank runs) on the GPU at hand, and compares the
measured tokens per second with the cost model's for that GPU, the plan's FSDP collectives priced
as overlapped as usual. On a 700 W H100 SXM this separates the model's error from the power cap.

    python benchmarks/titan_reproduce.py --measure --out benchmarks/results/titan_reproduce.json   # GPU
    python benchmarks/titan_reproduce.py --compare benchmarks/results/titan_reproduce.json        # no GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOCAL_BATCH, SEQ, WORLD = 2, 8192, 8
VARIANTS = {"eager": False, "compiled": True}


def run_variant(variant: str, steps: int = 6, warmup: int = 3) -> dict:
    """Median step seconds and peaks of one variant, in this process."""
    import torch
    from reserved_memory import GIB, titan_trainer
    from step_breakdown import categories, profiled_kernels
    from torch.profiler import ProfilerActivity, profile

    step = titan_trainer(WORLD, LOCAL_BATCH, compile_blocks=VARIANTS[variant])
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    kernels, ops = profiled_kernels(prof, 1)
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:50]
    return {"categories_ms": categories(kernels, 1),
            "ops": [{"op": k, "ms": v[0], "kernels": v[1], "calls": v[2]} for k, v in top],
            "kernels": [{"kernel": k[:120], "ms": sum(v), "count": len(v)}
                        for k, v in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:40]],
            "variant": variant, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "step_s": median, "step_times_s": times, "tokens_per_s_per_gpu": LOCAL_BATCH * SEQ / median,
            "allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def measure(out: Path) -> int:
    rows = []
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True)
        if proc.returncode:
            print(f"{variant}: rc={proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps({"command": f"python benchmarks/titan_reproduce.py --measure --out {out}",
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    return 0 if len(rows) == len(VARIANTS) else 1


def predictions(path: Path) -> list[dict]:
    """Each measured variant with the cost model's tokens per second per GPU on the database's GPU and
    its step by term (``titan_eager.predicted_terms``)."""
    from fidelity_megatron import titan_options
    from galvatron.strategies.cost import cost_plan
    from galvatron.strategies.hardware import gpu_for_device, load_cluster
    from titan_eager import measured_terms, predicted_terms

    from galvatron.plan import Plan
    from galvatron.spec import ModelSpec

    spec = ModelSpec.from_config("llama3-8b")  # seq_len 8192, torchtitan's
    plan = Plan.uniform(spec.num_blocks, global_batch_size=LOCAL_BATCH * WORLD, num_micro_batches=1, dp=WORLD,
                        zero=3, recompute="selective")
    out = []
    for row in json.loads(path.read_text())["rows"]:
        gpu = gpu_for_device(row["device"])
        cluster = load_cluster({"gpu": gpu, "gpus_per_node": 8, "nodes": 1, "name": f"8x{gpu}"})
        options = titan_options("fused" if row["variant"] == "compiled" else "eager", "flash2")
        tps = cost_plan(plan, spec, cluster, options).tokens_per_s / WORLD
        out.append({**row, "predicted_tokens_per_s_per_gpu": tps,
                    "predicted_ms": predicted_terms(plan, spec, cluster, options),
                    "measured_ms": measured_terms(row["categories_ms"])})
    return out


def compare(path: Path) -> int:
    """Print :func:`predictions` beside the measurements."""
    for r in predictions(path):
        measured, predicted = r["tokens_per_s_per_gpu"], r["predicted_tokens_per_s_per_gpu"]
        print(f"{r['variant']:8s} on {r['device']}: measured {measured:,.0f} tok/s/GPU, predicted {predicted:,.0f} "
              f"({predicted / measured - 1:+.1%}); memory {r['allocated_gib']:.1f} GiB allocated, "
              f"{r['reserved_gib']:.1f} reserved")
        m, p = r["measured_ms"], r["predicted_ms"]
        print("   ms per step: " + ", ".join(f"{k} {m[k]:.0f} measured / {p[k]:.0f} predicted" for k in p)
              + f" (wall {r['step_s'] * 1e3:.0f})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="run every variant in its own process (GPU)")
    parser.add_argument("--out", type=Path, help="the JSON --measure writes")
    parser.add_argument("--variant", choices=list(VARIANTS), help="one variant in this process (prints JSON)")
    parser.add_argument("--compare", type=Path, help="a JSON from --measure: the cost model beside it")
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant)))
        return 0
    if args.measure:
        if not args.out:
            parser.error("--measure needs --out")
        return measure(args.out)
    if args.compare:
        return compare(args.compare)
    parser.error("give --measure, --variant or --compare")
    return 2


if __name__ == "__main__":
    sys.exit(main())
