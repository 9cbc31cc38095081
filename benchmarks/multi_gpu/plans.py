"""The searched plan against a grid of uniform plans on the GPUs of one host, all measured (issue #11).

Run under torchrun on N GPUs: every plan (the search's pick for this model, batch and machine, and a
grid of uniform plans: pure DP with ZeRO 1/2/3, TP + SP over all GPUs, a pipeline over all GPUs, and
DP x TP where N >= 4) trains the reference GPT built from a model preset through ``galvatron.wrap``
(bf16 autocast, fused AdamW) for ``--warmup`` + ``--steps`` steps. Reported per plan: the measured
step time (median over steps of the slowest rank) and peak memory (largest ``max_memory_allocated``
over ranks), the cost model's prediction for the same plan (``cost_plan`` on this machine's hardware
entry with the native runtime's ``CostOptions``), and the searched plan's rank among the measured
ones. Plans the cost model predicts over 92% of device memory are not run (an out-of-memory rank
would leave the others waiting in a collective).

    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu/plans.py --model llama2-7b \\
        --global-batch 8 --seq 2048 --out benchmarks/results/multi_gpu/plans_llama2-7b_2gpu.json
    torchrun --standalone --nproc-per-node 2 benchmarks/multi_gpu/plans.py --smoke --out /tmp/plans.json  # CPU
    python benchmarks/multi_gpu/plans.py --replay benchmarks/results/multi_gpu/plans_llama2-7b_2gpu.json

``--replay`` (no GPU) costs the measured plans again with today's cost model and rewrites the file's
predictions and its table (the measurements stay); the command that measured them is kept.

``--fake-world N`` (one GPU, no torchrun) runs the plans without a pipeline as rank 0 of N on a fake
process group: collectives move no data between GPUs (gathers and scatters write the local values,
all-reduces keep them), every allocation and kernel of the rank is the real one. Its peak memory is
what rank 0 of N GPUs holds; its step time is the computation alone, so the predictions beside it cost
no communication either (``NoCommPerf``). Tensor-parallel plans' GEMMs run at a higher clock there
than data-parallel ones (``results/multi_gpu/README.md``: not explained).

    python benchmarks/multi_gpu/plans.py --fake-world 8 --model llama2-7b --global-batch 8 --out plans_fake8.json

``--local-vocab`` draws the tokens from rank 0's share of the vocabulary, so a vocabulary-parallel
embedding on a fake group gives every token a row (otherwise 1 - 1/N of them enter the blocks as zeros,
which changes the GEMMs' power draw); ``--meta`` builds the model on the meta device (a few blocks of a
model too large for one GPU whole, e.g. Llama 3 405B's).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from galvatron.launch.cmd_profile import gpt_config
from galvatron.strategies.cost import CostOptions, DatasheetPerf, cost_plan

from galvatron.backends import capabilities
from galvatron.errors import GalvatronError
from galvatron.models import GPT, GPTConfig
from galvatron.plan import Plan
from galvatron.runtime.apply import init_distributed, local_cluster, search_plan
from galvatron.spec import ModelSpec
from galvatron.spec_config import load_model_config


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@dataclasses.dataclass(frozen=True)
class NoCommPerf(DatasheetPerf):
    """The hardware entry's costs with free collectives and p2p: what a fake process group measures."""

    def collective_time(self, op: str, nbytes: float, group: Any) -> float:
        return 0.0

    def p2p_time(self, nbytes: float, inter_node: bool) -> float:
        return 0.0


def _init_fake(world: int, values: bool = True) -> torch.device:
    """Rank 0 of ``world`` on a fake process group over this process's GPU (one node of ``world``);
    ``values``: its gathers and scatters write the local data (:func:`_fake_values`)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    torch.cuda.set_device(0)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    if values:
        _fake_values()
    return torch.device("cuda", 0)


class _Done:
    """A finished collective's work handle."""

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _fake_values() -> None:
    """Make the fake group's all-gathers and reduce-scatters write real values: a gather repeats the
    local input, a scatter keeps the local input's first chunk, each written by one copy where NCCL
    would write its output. On torch 2.11 a fake group's reduce-scatter writes nothing (its all-gather
    does repeat the input: checked on CUDA), so sequence-parallel blocks would add stale memory into
    the residual stream, and GEMMs run faster on some data than on others under the power cap
    (benchmarks/results/gemm_data_power.json: zeros 892 against random 774 TFLOP/s on an H100).
    All-reduces keep the local values."""
    import torch.distributed._functional_collectives as funcol

    from galvatron.runtime import optim, relayout

    def size(group: Any) -> int:
        if isinstance(group, tuple):  # (DeviceMesh, mesh dim), as DTensor passes it
            return group[0].size(group[1])
        if isinstance(group, str):
            group = dist.distributed_c10d._resolve_process_group(group)
        return dist.get_world_size(group)

    def gather(self: torch.Tensor, gather_dim: int, group: Any, tag: str = "") -> torch.Tensor:
        n = size(group)
        out = torch.cat([self.contiguous()] * n, dim=0)
        return out if gather_dim == 0 else torch.cat(torch.chunk(out, n, dim=0), dim=gather_dim)

    def scatter(self: torch.Tensor, reduceOp: str, scatter_dim: int, group: Any, tag: str = "") -> torch.Tensor:
        n = size(group)
        x = self if scatter_dim == 0 else torch.cat(torch.chunk(self, n, dim=scatter_dim), dim=0)
        return x.narrow(0, 0, x.shape[0] // n).clone()

    def gather_into(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any = None,
                    async_op: bool = False) -> Any:  # torch.distributed's signature, keywords included
        n = output_tensor.numel() // input_tensor.numel()  # one cat, as the functional gather's (no broadcast)
        src, out = input_tensor.reshape(-1), output_tensor.view(-1)
        if out.data_ptr() <= src.data_ptr() < out.data_ptr() + out.numel() * out.element_size():
            src = src.clone()  # FSDP2 gathers in place: its input is its own chunk of the output
        torch.cat([src] * n, out=out)
        return _Done() if async_op else None

    def scatter_into(output: torch.Tensor, input: torch.Tensor, op: Any = None, group: Any = None,
                     async_op: bool = False) -> Any:
        output.copy_(input.reshape(-1)[: output.numel()].view_as(output))
        return _Done() if async_op else None

    for name in ("all_gather_single", "all_gather_tensor"):
        if hasattr(funcol, name):
            setattr(funcol, name, gather)
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(funcol, name):
            setattr(funcol, name, scatter)
    dist.all_gather_into_tensor = gather_into
    dist.reduce_scatter_tensor = scatter_into
    relayout._all_gather_single = optim._all_gather_single = gather_into
    relayout._reduce_scatter_single = scatter_into


def grid(layers: int, world: int, batch: int, dtype: str) -> dict[str, Plan]:
    """Uniform plans over ``world`` devices: DP x ZeRO 1/2/3, DP x ZeRO-1 with one sample per rank per
    micro-batch (gradient accumulation), TP + SP, a 1F1B pipeline, DP x TP."""
    def uniform(**kw: Any) -> Plan:
        return Plan.uniform(layers, global_batch_size=batch, dtype=dtype, **kw)

    plans = {f"dp{world} zero{z}": uniform(dp=world, zero=z) for z in (1, 2, 3)}
    if batch // world > 1:
        plans[f"dp{world} zero1 x{batch // world}"] = uniform(dp=world, zero=1, num_micro_batches=batch // world)
    plans[f"tp{world}+sp"] = uniform(tp=world, sp=True)
    plans[f"pp{world} 1f1b"] = uniform(pp=world, num_micro_batches=min(batch, 2 * world))
    if world >= 4:
        plans[f"dp{world // 2} tp2+sp zero1"] = uniform(dp=world // 2, tp=2, sp=True, zero=1)
    return plans


def measure(cfg: GPTConfig, plan: Plan, tokens: torch.Tensor, targets: torch.Tensor, warmup: int,
            steps: int, device: torch.device, profile: bool = False, meta: bool = False) -> dict[str, Any]:
    """Slowest rank's median step seconds, the largest peak memory over ranks, and the most any rank
    had allocated before the plan's model was built (what earlier plans left behind); ``profile``:
    this rank's kernels of two more steps by category and the costliest kernels and ATen ops;
    ``meta``: the model is built on the meta device and its local shards drawn after ``wrap``
    (:func:`_init_local`), so a model larger than one GPU's memory whole can run as one rank."""
    import galvatron

    before = _max_over_ranks(torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0, device)
    torch.manual_seed(0)
    with torch.device("meta" if meta else device):
        model = GPT(cfg)
    wrapped = galvatron.wrap(model, plan=plan)
    if meta:
        _init_local(wrapped)
    opt = wrapped.optimizer(torch.optim.AdamW, lr=1e-5, fused=device.type == "cuda")
    x, y = wrapped.shard_batch((tokens, targets))
    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        loss = wrapped.train_step((x, y), lm_loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    per_step = torch.tensor(times[warmup:], dtype=torch.float64, device=device)
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    peak = _max_over_ranks(torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0, device)
    kernels = _profile(wrapped, opt, (x, y), 2) if profile and device.type == "cuda" else {}
    if profile and device.type == "cuda":
        kernels["phases_s"] = _phases(wrapped, opt, (x, y), steps, device)
    del wrapped, model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"measured_s": statistics.median(per_step.tolist()), "peak_memory_gib": peak,
            "allocated_before_gib": before, "loss_first_last": [losses[0], losses[-1]], **kernels}


def _init_local(wrapped: Any) -> None:
    """Draw a meta-built model's local shards as the reference GPT initialises them: matrices N(0, 0.02),
    norm weights 1, biases 0 (the GEMMs' speed under the power cap depends on the data: uninitialised memory
    would not do)."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if local.ndim == 1:
                local.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                local.normal_(0.0, 0.02)


def _profile(wrapped: Any, opt: Any, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> dict[str, Any]:
    """Kernel milliseconds per step of ``steps`` training steps under ``torch.profiler``: by category
    (``step_breakdown.category``), the 30 costliest kernels and the 40 costliest ATen ops; and the 25
    host operations with the most self CPU time (Python-side work shows as gaps between them)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from step_breakdown import categories, category, profiled_kernels
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            wrapped.train_step(batch, lm_loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    kernels, ops = profiled_kernels(prof, steps)
    cats = categories(kernels, steps)
    top = sorted(kernels, key=lambda n: -sum(kernels[n]))[:30]
    return {"kernel_ms": sum(cats.values()), "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:120], "category": category(n), "ms_per_step": sum(kernels[n]) / steps,
                             "calls_per_step": len(kernels[n]) / steps} for n in top],
            "ops": [{"op": k, "ms_per_step": v[0], "kernels_per_step": v[1], "calls_per_step": v[2]}
                    for k, v in sorted(ops.items(), key=lambda kv: -kv[1][0])[:40]],
            "host_ops": [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total * 1e-3 / steps,
                          "calls_per_step": e.count / steps}
                         for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]]}


def _phases(wrapped: Any, opt: Any, batch: tuple[torch.Tensor, torch.Tensor], steps: int,
            device: torch.device) -> dict[str, float]:
    """Median wall seconds of each phase of a step, the device synchronised around each: where a phase
    lasts longer than its kernels (``ops``), the host held the device back."""
    times: dict[str, list[float]] = {"train_step": [], "optimizer_step": [], "zero_grad": []}
    for _ in range(steps):
        for name, run in (("train_step", lambda: wrapped.train_step(batch, lm_loss)), ("optimizer_step", opt.step),
                          ("zero_grad", lambda: opt.zero_grad(set_to_none=True))):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def replay(path: Path) -> int:
    """Re-cost a result file's plans (the ``plan_dict`` of each row; files from before that field: the
    grid's plan of that name, the searched plan as the grid plan it equals) and rewrite it."""
    from galvatron.strategies.hardware import gpu_for_device, load_cluster

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    data = json.loads(path.read_text())
    args = argparse.Namespace(**_arguments(data["command"]))
    env = data["env"]
    gpu = gpu_for_device(env["device"])
    cluster = load_cluster({"gpu": gpu, "gpus_per_node": env["world"], "nodes": 1, "name": "replay"})
    perf = NoCommPerf(cluster) if args.fake_world else cluster
    config = {**load_model_config(args.model), "seq_len": args.seq}
    if getattr(args, "layers", None):
        config["layers"] = args.layers
    spec = ModelSpec.from_config(config)
    plans = grid(spec.num_blocks, env["world"], args.global_batch, "bf16")
    native = CostOptions(**capabilities("native").cost_options())
    for row in data["rows"]:
        if "plan_dict" in row:
            plan = Plan.from_dict(row["plan_dict"])
        else:
            plan = plans.get(row["plan"]) or next(p for p in plans.values() if p.describe() == row["describe"])
        predicted = cost_plan(plan, spec, perf, native)
        row.update(predicted_s=predicted.step_time_s, predicted_peak_gib=predicted.peak_memory_gib)
        if "measured_s" in row:
            row["time_error"] = row["predicted_s"] / row["measured_s"] - 1
            if row.get("peak_memory_gib"):
                row["memory_error"] = row["predicted_peak_gib"] / row["peak_memory_gib"] - 1
    args.out = str(path)
    _write(args, data["rows"], env["world"], data["summary"]["search_s"], torch.device("cuda"), env=env,
           command=data["command"])
    return 0


def _arguments(command: str) -> dict[str, Any]:
    """The measuring run's options, from its command line."""
    parser = _parser()
    known, _ = parser.parse_known_args(command.split("plans.py", 1)[1].split())
    return vars(known)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON path (rank 0 writes it and a .md beside it)")
    parser.add_argument("--replay", metavar="JSON", help="re-cost a measured file's plans (no GPU)")
    parser.add_argument("--model", default="llama2-7b", help="model preset or YAML (reference GPT architecture)")
    parser.add_argument("--layers", type=int, help="blocks of the model (default: the preset's), to fit smaller GPUs")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo): checks the script")
    parser.add_argument("--profile", action="store_true",
                        help="also record rank 0's kernels of two more steps per plan (by category, costliest) "
                             "and time each phase of a step (train step, optimizer step, zero_grad) apart")
    parser.add_argument("--plans", nargs="+", metavar="NAME",
                        help="run only these plans of the grid (names as in the table; 'searched' for the search's)")
    parser.add_argument("--fake-stale", action="store_true",
                        help="with --fake-world: leave the fake collectives' outputs unwritten (before 2026-11-24 "
                             "the only behaviour; tensor-parallel GEMMs then run on stale memory)")
    parser.add_argument("--local-vocab", action="store_true",
                        help="draw tokens from the first 1/N of the vocabulary: under --fake-world a "
                             "vocabulary-parallel embedding then gives every token a row on rank 0 (a fake "
                             "all-reduce leaves the other tokens' rows zero) and the vocabulary-parallel loss has "
                             "every target on rank 0")
    parser.add_argument("--meta", action="store_true",
                        help="build each plan's model on the meta device and draw its local shards after wrap "
                             "(models whose whole does not fit one GPU, e.g. a few of Llama 3 405B's blocks)")
    parser.add_argument("--fake-world", type=int, metavar="N",
                        help="one GPU as rank 0 of N on a fake process group: real memory, computation-only time")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.replay:
        return replay(Path(args.replay))
    if not args.out:
        parser.error("--out is required")
    device = _init_fake(args.fake_world, not args.fake_stale) if args.fake_world else init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.smoke:
        torch.set_num_threads(1)
        config = {"name": "gpt-smoke", "layers": 4, "hidden": 64, "heads": 4, "vocab": 128, "seq_len": 32}
    else:
        config = {**load_model_config(args.model), "seq_len": args.seq}
        if args.layers:
            config["layers"] = args.layers
    cfg = gpt_config(config)
    # the reference GPT's block list, which the runtime checks the search's plans against
    spec = dataclasses.replace(ModelSpec.from_config(config), block_path="blocks")
    dtype = "bf16" if device.type == "cuda" else "fp32"
    gen = torch.Generator().manual_seed(0)
    high = cfg.vocab // world if args.local_vocab else cfg.vocab  # rank 0's shard of a vocabulary-parallel embedding
    tokens = torch.randint(0, high, (args.global_batch, cfg.seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    cluster = local_cluster(world)
    perf = NoCommPerf(cluster) if args.fake_world else cluster
    native = CostOptions(**capabilities("native").cost_options())
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("meta"):
        probe = GPT(cfg)  # the search's structural checks only; no memory
    searched, failure = None, None
    if rank == 0:
        try:
            searched = search_plan(spec, world, x, model=probe)
        except (GalvatronError, RuntimeError, ValueError) as err:  # report it, still measure the grid
            failure = f"{type(err).__name__}: {err}"
            print(f"search failed: {failure}", flush=True)
    search_s = time.perf_counter() - start
    holder = [searched.to_dict() if searched is not None else None]
    dist.broadcast_object_list(holder, src=0)
    plans = grid(spec.num_blocks, world, args.global_batch, dtype)
    if args.plans:
        unknown = sorted(set(args.plans) - set(plans) - {"searched"})
        if unknown:
            parser.error(f"--plans: no plan named {', '.join(unknown)} (the grid: {', '.join(plans)}, searched)")
        plans = {name: plan for name, plan in plans.items() if name in args.plans}
    if holder[0] is not None and (not args.plans or "searched" in args.plans):
        plans = {"searched": Plan.from_dict(holder[0]), **plans}
    if args.fake_world:  # a fake group's p2p delivers nothing a pipeline could run on
        plans = {name: plan for name, plan in plans.items() if plan.pp == 1}
    rows = []
    for name, plan in plans.items():
        predicted = cost_plan(plan, spec, perf, native)
        row: dict[str, Any] = {"plan": name, "describe": plan.describe(), "plan_dict": plan.to_dict(),
                               "predicted_s": predicted.step_time_s, "predicted_peak_gib": predicted.peak_memory_gib}
        if predicted.peak_memory_gib > 0.92 * predicted.memory_limit_gib:
            row["skipped"] = f"predicted {predicted.peak_memory_gib:.1f} GiB of {predicted.memory_limit_gib:.1f}"
        else:
            row.update(measure(cfg, plan, x, y, args.warmup, args.steps, device, args.profile, args.meta))
            row["time_error"] = row["predicted_s"] / row["measured_s"] - 1
            if row["peak_memory_gib"]:
                row["memory_error"] = row["predicted_peak_gib"] / row["peak_memory_gib"] - 1
        rows.append(row)
        if rank == 0:
            bulky = ("describe", "plan_dict", "top_kernels", "ops", "host_ops")
            print(json.dumps({k: v for k, v in row.items() if k not in bulky}), flush=True)
    if rank == 0:
        _write(args, rows, world, search_s, device)
    dist.barrier()
    return 0


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], world: int, search_s: float,
           device: torch.device, env: dict[str, Any] | None = None, command: str | None = None) -> None:
    measured = sorted((r for r in rows if "measured_s" in r), key=lambda r: r["measured_s"])
    searched = next((r for r in rows if r["plan"] == "searched"), {"describe": "(not measured)"})
    same = [r for r in rows if r["plan"] != "searched" and r["describe"] == searched["describe"]]
    fastest = measured[0] if measured else None
    summary = {
        "searched_rank": next((i + 1 for i, r in enumerate(measured) if r is searched), None),
        "searched_vs_fastest": (searched["measured_s"] / fastest["measured_s"] - 1
                                if fastest and "measured_s" in searched else None),
        "searched_equals": [r["plan"] for r in same],
        "median_abs_time_error": statistics.median(abs(r["time_error"]) for r in measured) if measured else None,
        "median_abs_memory_error": (statistics.median(abs(r["memory_error"]) for r in measured
                                                      if "memory_error" in r) if device.type == "cuda" else None),
        "search_s": search_s,
    }
    env = env or {"torch": torch.__version__, "world": world,
                  "fake_process_group": bool(getattr(args, "fake_world", 0)), "device": torch.cuda.get_device_name() if
                  device.type == "cuda" else "cpu", "nccl": ".".join(map(str, torch.cuda.nccl.version()))
                  if device.type == "cuda" else None}
    if command is None and getattr(args, "fake_world", None):
        command = "python benchmarks/multi_gpu/plans.py " + " ".join(sys.argv[1:])
    command = command or "torchrun --standalone --nproc-per-node {} benchmarks/multi_gpu/plans.py {}".format(
        world, " ".join(sys.argv[1:]))
    record = {"command": command, "env": env, "summary": summary, "rows": rows}
    if getattr(args, "replay", None):
        record["predictions"] = f"replayed {time.strftime('%Y-%m-%d')}: python benchmarks/multi_gpu/plans.py --replay"
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"Command: `{command}`", "", f"Environment: {json.dumps(env)}", "",
             *([f"Predictions {record['predictions']} (the measurements are the command's).", ""]
               if "predictions" in record else []),
             "| plan | measured s/step | predicted (err) | peak GiB measured | predicted (err) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "measured_s" not in r:
            lines.append(f"| {r['plan']} | skipped: {r['skipped']} | {r['predicted_s']:.3f} | - | "
                         f"{r['predicted_peak_gib']:.1f} |")
            continue
        mem = f"{r['predicted_peak_gib']:.1f} ({r['memory_error']:+.1%})" if "memory_error" in r else "-"
        lines.append(f"| {r['plan']} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} ({r['time_error']:+.1%}) | "
                     f"{r['peak_memory_gib']:.1f} | {mem} |")
    lines += ["", f"Searched plan: {searched['describe'].splitlines()[-1].strip()}; rank "
              f"{summary['searched_rank']} of {len(measured)} measured"
              + (f", {summary['searched_vs_fastest']:+.1%} vs the fastest" if summary["searched_vs_fastest"]
                 is not None else "") + (f" (same plan as {', '.join(summary['searched_equals'])})"
                                         if summary["searched_equals"] else "") + ".",
              f"Median |predicted - measured|: step time {summary['median_abs_time_error']:.1%}"
              + (f", peak memory {summary['median_abs_memory_error']:.1%}" if summary["median_abs_memory_error"]
                 is not None else "") + f". Search took {search_s:.1f} s."]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
