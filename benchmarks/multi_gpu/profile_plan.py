"""Where one plan's step goes on the GPUs of one host: wall time against kernel time by category.

Run under torchrun: each named plan of ``plans.py``'s grid trains the reference GPT of a model preset
through ``galvatron.wrap`` (bf16 autocast, fused AdamW) for ``--warmup`` steps, then ``--steps``
steps timed (median wall, synchronised) and the same number under ``torch.profiler``. Rank 0 records
its kernels' time per step by category (``step_breakdown.CATEGORIES``, NCCL kernels apart: they run
on their own streams, beside compute), the wall time, and the cost model's terms for the plan. A wall
time well above the compute kernels plus the exposed communication is host time or idle gaps.

    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu/profile_plan.py --model llama2-7b \\
        --global-batch 8 --seq 2048 --plans "tp2+sp" "dp2 zero2" --out $OUT/profile_plans_2gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from galvatron.launch.cmd_profile import gpt_config
from plans import grid, lm_loss
from step_breakdown import category, profiled_kernels

from galvatron.models import GPT
from galvatron.runtime.apply import init_distributed, local_cluster
from galvatron.spec import ModelSpec
from galvatron.spec_config import load_model_config


def one_plan(name: str, plan: Any, cfg: Any, x: torch.Tensor, y: torch.Tensor, warmup: int, steps: int) -> dict:
    import galvatron

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(cfg)
    wrapped = galvatron.wrap(model, plan=plan)
    opt = wrapped.optimizer(torch.optim.AdamW, lr=1e-5, fused=True)
    xs, ys = wrapped.shard_batch((x, y))

    def step() -> None:
        wrapped.train_step((xs, ys), lm_loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    walls = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels, _ = profiled_kernels(prof, steps)
    cats: dict[str, float] = {}
    for kernel, times in kernels.items():
        cat = "nccl" if "nccl" in kernel.lower() else category(kernel)
        cats[cat] = cats.get(cat, 0.0) + sum(times) / steps
    top = sorted(kernels, key=lambda k: -sum(kernels[k]))[:25]
    return {"plan": name, "wall_ms": statistics.median(walls) * 1e3,
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "compute_kernel_ms": sum(v for k, v in cats.items() if k != "nccl"),
            "top_kernels": [{"name": k[:120], "ms_per_step": sum(kernels[k]) / steps,
                             "calls_per_step": len(kernels[k]) / steps} for k in top]}


def main() -> int:
    from galvatron.strategies.cost import CostOptions, cost_plan

    from galvatron.backends import capabilities

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--plans", nargs="+", default=["tp2+sp", "dp2 zero2"], help="names from plans.py's grid")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    config = {**load_model_config(args.model), "seq_len": args.seq}
    cfg, spec = gpt_config(config), ModelSpec.from_config(config)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab, (args.global_batch, cfg.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    plans = grid(spec.num_blocks, world, args.global_batch, "bf16")
    native = CostOptions(**capabilities("native").cost_options())
    rows = []
    for name in args.plans:
        row = one_plan(name, plans[name], cfg, x, y, args.warmup, args.steps)
        gc.collect()  # the plan's model and optimizer went with one_plan's frame
        torch.cuda.empty_cache()
        cost = cost_plan(plans[name], spec, local_cluster(world), native)
        stage = cost.stages[0]
        row["predicted"] = {"step_ms": cost.step_time_s * 1e3, "compute_ms": stage.compute_s * 1e3,
                            "comm_ms": {k: v * 1e3 for k, v in stage.comm_s.items() if v}}
        rows.append(row)
        if rank == 0:
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
    if rank == 0:
        command = "torchrun --standalone --nproc-per-node {} benchmarks/multi_gpu/profile_plan.py {}".format(
            world, " ".join(sys.argv[1:]))
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "world": world}
        Path(args.out).write_text(json.dumps({"command": command, "env": env, "rows": rows}, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
