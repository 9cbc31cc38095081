"""Allocated and reserved memory of real training steps, with the caching allocator's event trace.

The cost model predicts allocated bytes; a GPU runs out of memory on *reserved* bytes (the segments the
PyTorch caching allocator holds), and torchtitan publishes ``max_reserved``. This script measures both
for two kinds of run, each case in its own process (the allocator's mode is fixed at CUDA start-up),
under the default allocator and under ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``:

* ``titan8b-w8`` / ``titan8b-w128``: torchtitan's published Llama 3.1 8B FSDP runs (Dec 2024,
  ``benchmarks/llama3_h100_202412_torchtitan.md`` Tables 1 and 3: local batch 2, seq 8192, per-op
  selective activation checkpointing, FSDP2 bf16/fp32 mixed precision, foreach AdamW, gradient
  clipping, ``F.cross_entropy(pred.float())``) as rank 0 of 8 or 128 ranks sees them: one process
  on a fake process group (collectives move no data; every allocation is the real one, on the real
  streams). FlashAttention-2 is forced, the SDPA kernel of that date (torchtitan's AC policy saves its
  output).
* ``native-*``: Llama 3.2 1B through ``galvatron.wrap`` on one GPU (the configurations of
  ``profile_fidelity_llama.json``).
* ``plan-*``: Llama 3.2 1B through ``galvatron.wrap`` under 8-rank plans (ZeRO 1-3, TP with and without
  SP, recomputation) as rank 0 of 8 sees them (a fake process group).

Each case writes peaks (``max_memory_allocated``/``max_memory_reserved`` over the whole run, and over
the steps after the first), reserved bytes per stream from ``torch.cuda.memory_snapshot()`` and the
allocator's whole event trace (``torch.cuda.memory._record_memory_history``: alloc / free / segment
events with address, size, stream), so the allocator simulator (``strategies.cost.allocator``) can
be checked against the real allocator event by event.

    python benchmarks/reserved_memory.py --measure titan --out-dir DIR    # GPU (>= 96 GB for titan8b-w8)
    python benchmarks/reserved_memory.py --measure native --out-dir DIR   # GPU
    python benchmarks/reserved_memory.py --case titan8b-w8 --out FILE     # one case in this process
    python benchmarks/reserved_memory.py --replay DIR    # no GPU: each trace through the simulator

``--replay`` writes ``DIR/replay.json`` and ``replay.md``: per case the measured peaks, the reserved peak
of the trace replayed through ``strategies.cost.allocator`` (the simulator's error), and the least
memory the trace runs in (``allocator.memory_needs``) under either allocator mode.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

GIB = 2**30
TITAN_CASES = {"titan8b-w8": 8, "titan8b-w128": 128}
NATIVE_CASES = {f"native-mb{mb}-{mode}": (mb, mode)
                for mb, mode in ((1, "none"), (2, "none"), (2, "selective"), (4, "full"), (8, "full"))}
# 8-rank plans through galvatron.wrap, as rank 0 sees them (a fake process group): the plan's keyword
# arguments; Llama 3.2 1B with 2 samples of 2048 tokens per data-parallel rank unless "model", "seq" and
# "samples" say otherwise
PLAN_CASES: dict[str, dict[str, Any]] = {
    "plan-dp8-zero3": {"dp": 8, "zero": 3},
    "plan-dp8-zero2-full": {"dp": 8, "zero": 2, "recompute": "full"},
    "plan-dp4-tp2sp-zero1": {"dp": 4, "tp": 2, "sp": True, "zero": 1},
    "plan-dp2-tp4sp-zero3-selective": {"dp": 2, "tp": 4, "sp": True, "zero": 3, "recompute": "selective"},
    "plan-tp8sp": {"tp": 8, "sp": True},
    "plan-dp4-tp2-zero2": {"dp": 4, "tp": 2, "zero": 2},
    "plan8b-dp2-tp4sp-zero1-selective": {"model": "llama3-8b", "seq": 4096, "samples": 1, "dp": 2, "tp": 4,
                                         "sp": True, "zero": 1, "recompute": "selective"},
    "plan8b-dp8-zero3-full": {"model": "llama3-8b", "seq": 4096, "samples": 1, "dp": 8, "zero": 3,
                              "recompute": "full"},
    # the same two built on the meta device: wrap materialises only this rank's shards
    "plan8b-dp2-tp4sp-zero1-selective-meta": {"model": "llama3-8b", "seq": 4096, "samples": 1, "dp": 2, "tp": 4,
                                              "sp": True, "zero": 1, "recompute": "selective", "build": "meta"},
    "plan8b-dp8-zero3-full-meta": {"model": "llama3-8b", "seq": 4096, "samples": 1, "dp": 8, "zero": 3,
                                   "recompute": "full", "build": "meta"},
}
PLAN_WORLD, PLAN_SAMPLES, PLAN_MODEL, PLAN_SEQ = 8, 2, "llama3.2-1b", 2048


def plan_case(case: str) -> tuple[str, int, int, str, str, dict[str, Any]]:
    """A ``PLAN_CASES`` entry as (model, seq, samples per data-parallel rank, recompute, where the model
    is built (``native_trainer``'s ``build``), plan kwargs)."""
    kw = dict(PLAN_CASES[case])
    return (kw.pop("model", PLAN_MODEL), kw.pop("seq", PLAN_SEQ), kw.pop("samples", PLAN_SAMPLES),
            kw.pop("recompute", "none"), kw.pop("build", "device"), kw)
TRACE_ACTIONS = ("alloc", "free_completed", "segment_alloc", "segment_free", "segment_map", "segment_unmap")


# ------------------------------------------------------------------------------- torchtitan 8B
def titan_ac_context() -> Any:
    """torchtitan's per-op selective AC (``apply_ac``, op mode, Dec 2024): save the outputs of SDPA and
    of every other ``mm`` (the 1st, 3rd, ... of a block, counted separately in forward and recompute)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = {torch.ops.aten.mm.default, torch.ops.aten._scaled_dot_product_efficient_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,  # a CPU (fake) run's
            torch.ops._c10d_functional.reduce_scatter_tensor.default}
    meta: dict[str, int] = defaultdict(int)

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        key = f"{'recompute' if ctx.is_recompute else 'forward'}_mm_count"
        if func == torch.ops.aten.mm.default:
            meta[key] += 1
        keep = func in save and not (func == torch.ops.aten.mm.default and meta[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def titan_trainer(world: int, batch: int = 2, compile_blocks: bool = False, fake_mode: Any = None) -> Any:
    """torchtitan's Llama 3.1 8B training step as rank 0 of ``world`` FSDP ranks sees it (``compile_blocks``:
    each block under ``torch.compile(fullgraph=True)`` after AC, as torchtitan's ``apply_compile``).
    With ``fake_mode`` (a ``FakeTensorMode``) it is built on fake CPU tensors, to trace without a GPU;
    the step then runs inside that mode."""
    import torch.distributed as dist
    from titan_eager import LLAMA3_8B, Llama
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    device = "cpu" if fake_mode is not None else "cuda"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh(device, (world,))
    with fake_mode or torch.device("meta"):
        model = Llama(LLAMA3_8B)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i, layer in enumerate(model.layers):  # torchtitan parallelize_llama: apply_ac, then apply_fsdp
        model.layers[i] = checkpoint_wrapper(layer, context_fn=titan_ac_context, preserve_rng_state=False)
        if compile_blocks:
            model.layers[i] = torch.compile(model.layers[i], fullgraph=True)
        fully_shard(model.layers[i], mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    if fake_mode is not None:
        with fake_mode:
            return _titan_step(model, batch, device)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(1.0) if "norm" in name else local.normal_(0.0, 0.02)
        model.freqs.copy_(model.rope_table())
    return _titan_step(model, batch, device)


def _titan_step(model: torch.nn.Module, batch: int, device: str) -> Any:
    from titan_eager import LLAMA3_8B
    from torch.nn.attention import SDPBackend, sdpa_kernel

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    tokens = torch.randint(0, LLAMA3_8B.vocab, (batch, LLAMA3_8B.seq + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            pred = model(x)
            loss = F.cross_entropy(pred.flatten(0, 1).float(), y.flatten(0, 1))
            del pred  # torchtitan train.py: "need to free to before bwd to avoid peaking memory"
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0, foreach=True)
        opt.step()
        opt.zero_grad()

    return step


# ------------------------------------------------------------------------------ galvatron.wrap
def native_trainer(micro_batch: int, mode: str, seq: int = 2048, fake_mode: Any = None, tracer: Any = None,
                   world: int = 1, model_name: str = "llama3.2-1b", build: str = "device",
                   **plan: Any) -> tuple[Any, list[torch.Tensor]]:
    """``model_name`` (Llama 3.2 1B) through ``galvatron.wrap`` under ``Plan.uniform(..., recompute=mode, **plan)`` as
    rank 0 of ``world`` (a fake process group when ``world > 1``), trained as ``profile_fidelity.py``
    trains it, ``micro_batch`` samples per step on this rank; with ``fake_mode`` on fake CPU tensors.
    The step, and the tensors that exist before it (parameters, buffers, the batch). A ``tracer``
    (``AllocationTracer``) logs the model's construction, which a GPU run makes at full size before
    ``wrap`` shards it; ``build="meta"``: the model is built on the meta device and ``wrap``
    materialises this rank's shards only (a GPU run then fills them with random values; a fake run
    counts them from the first step on, as ``memory_trace.trace_plan(build_on="meta")`` does)."""
    import torch.distributed as dist
    from galvatron.launch.cmd_profile import gpt_config
    from galvatron.profiler.memory_trace import lm_training_step
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import galvatron
    from galvatron.models.gpt import GPT
    from galvatron.plan import Plan
    from galvatron.spec_config import load_model_config

    if world > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    cfg = gpt_config({**load_model_config(model_name), "seq_len": seq})
    device = "cpu" if fake_mode is not None else "cuda"
    torch.manual_seed(0)
    meta_on_device = build == "meta" and fake_mode is None
    with fake_mode or torch.device("meta" if meta_on_device else device), \
            tracer if tracer is not None and build == "device" else nullcontext():
        model = GPT(cfg)
    with fake_mode or nullcontext(), tracer or nullcontext():
        tokens = torch.randint(0, cfg.vocab, (micro_batch, seq + 1), device=device)
    if fake_mode is not None:
        model.to = lambda *args, **kwargs: model  # already where it runs (and fake tensors cannot swap)
    dp = plan.get("dp", 1)
    layout = Plan.uniform(cfg.layers, global_batch_size=micro_batch * dp, dtype="bf16", recompute=mode, **plan)
    wrapped = galvatron.wrap(model, plan=layout)
    if meta_on_device:  # uninitialised shards: values a step can train on
        with torch.no_grad():
            for p in wrapped.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).normal_(0.0, 0.02)
    return lm_training_step(wrapped, tokens), [*wrapped.parameters(), *wrapped.buffers(), tokens]


def case_trainer(case: str, fake_mode: Any = None, tracer: Any = None) -> tuple[Any, list[torch.Tensor]]:
    """Any case's step and the tensors that exist before it (real CUDA ones, or fake CPU ones); a
    ``tracer`` logs how a ``galvatron.wrap`` case's model is built (torchtitan's is built sharded)."""
    if case in TITAN_CASES:
        step = titan_trainer(TITAN_CASES[case], fake_mode=fake_mode)
        model = next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
        return step, [*(p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()),
                      *model.buffers()]
    if case in NATIVE_CASES:
        return native_trainer(*NATIVE_CASES[case], fake_mode=fake_mode, tracer=tracer)
    model, seq, samples, recompute, build, plan = plan_case(case)
    return native_trainer(samples, recompute, seq, fake_mode=fake_mode, tracer=tracer, world=PLAN_WORLD,
                          model_name=model, build=build, **plan)


# ---------------------------------------------------------------------------------- one case
def run_case(case: str, out: Path, steps: int = 3) -> dict[str, Any]:
    """Train ``steps`` steps of ``case`` recording the allocator's trace; write the JSON (and trace)."""
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, context=None, stacks="python")
    step, tensors = case_trainer(case)
    del tensors
    step()
    torch.cuda.synchronize()
    after_first = {"allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                   "reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps - 1):
        step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    by_stream: dict[str, float] = defaultdict(float)
    for seg in snap["segments"]:
        by_stream[str(seg["stream"])] += seg["total_size"] / GIB
    trace = [[e["action"], e["addr"], e["size"], e["stream"]] for e in snap["device_traces"][0]
             if e["action"] in TRACE_ACTIONS]
    trace_path = out.with_suffix(".trace.json.gz")
    with gzip.open(trace_path, "wt") as f:
        json.dump(trace, f)
    result = {"case": case, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "steps": steps,
              "first_step": after_first,
              "steady_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
              "steady_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
              "reserved_by_stream_gib": dict(by_stream), "trace": trace_path.name, "trace_events": len(trace)}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def measure(kind: str, out_dir: Path) -> int:
    """Every case of ``kind`` under both allocator modes, each in a fresh process."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = {"titan": TITAN_CASES, "native": NATIVE_CASES, "plans": PLAN_CASES}[kind]
    failed = 0
    for mode, conf in (("default", None), ("expandable", "expandable_segments:True")):
        for case in cases:
            env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
            if conf:
                env["PYTORCH_CUDA_ALLOC_CONF"] = conf
            out = out_dir / f"{case}.{mode}.json"
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--case", case, "--out", str(out)], env=env,
                                  capture_output=True, text=True)
            print(f"{case} [{mode}] rc={proc.returncode} {time.perf_counter() - start:.0f}s", flush=True)
            if proc.returncode:
                failed += 1
                print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
    return 1 if failed else 0


def replay_dir(directory: Path) -> int:
    """Replay every case's trace through the allocator simulator; write ``replay.json`` and ``.md``."""
    from galvatron.strategies.cost.allocator import events_from_snapshot, memory_needs

    rows = []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("replay"):
            continue
        case = json.loads(path.read_text())
        with gzip.open(directory / case["trace"], "rt") as f:
            trace = [dict(zip(("action", "addr", "size", "stream"), e, strict=True)) for e in json.load(f)]
        events = events_from_snapshot(trace)
        expandable = "expandable_segments:True" in case["alloc_conf"]
        sim, least = memory_needs(events, expandable_segments=expandable)
        measured = max(case["first_step"]["reserved_gib"], case["steady_reserved_gib"])
        rows.append({"case": case["case"], "allocator": "expandable" if expandable else "default",
                     "allocated_gib": case["steady_allocated_gib"], "reserved_gib": measured,
                     "simulated_reserved_gib": sim.reserved_peak / GIB,
                     "min_capacity_gib": least / GIB})
    errors = [abs(r["simulated_reserved_gib"] / r["reserved_gib"] - 1) for r in rows]
    result = {"command": f"python benchmarks/reserved_memory.py --replay {directory}",
              "date": time.strftime("%Y-%m-%d"), "simulator_mean_abs_error": sum(errors) / len(errors),
              "simulator_max_abs_error": max(errors), "rows": rows}
    (directory / "replay.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Reserved memory: measured, and replayed through the allocator simulator", "",
             f"`{result['command']}` ({result['date']}). Measured on one H200 (see README.md). Simulated: the "
             "recorded trace through `strategies.cost.allocator.replay`; least memory: "
             "`allocator.memory_needs` (the smallest device the trace runs in).", "",
             "| case | allocator | allocated GiB | reserved GiB | simulated reserved (err) "
             "| least memory GiB (over allocated) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        sim = r["simulated_reserved_gib"]
        lines.append(f"| {r['case']} | {r['allocator']} | {r['allocated_gib']:.2f} | {r['reserved_gib']:.2f} | "
                     f"{sim:.2f} ({sim / r['reserved_gib'] - 1:+.2%}) | "
                     f"{r['min_capacity_gib']:.2f} ({r['min_capacity_gib'] / r['allocated_gib'] - 1:+.1%}) |")
    lines += ["", f"Simulator: mean absolute error {result['simulator_mean_abs_error']:.2%}, max "
              f"{result['simulator_max_abs_error']:.2%}."]
    (directory / "replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", choices=["titan", "native", "plans"], help="run every case of a kind (GPU)")
    parser.add_argument("--out-dir", type=Path, help="where --measure writes one JSON and trace per case")
    parser.add_argument("--case", choices=[*TITAN_CASES, *NATIVE_CASES, *PLAN_CASES],
                        help="one case in this process (GPU)")
    parser.add_argument("--out", type=Path, help="the JSON --case writes (the trace goes beside it)")
    parser.add_argument("--replay", type=Path, metavar="DIR", help="replay the traces of DIR (no GPU)")
    args = parser.parse_args(argv)
    if args.replay:
        return replay_dir(args.replay)
    if (args.measure or args.case) and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.measure:
        if not args.out_dir:
            parser.error("--measure needs --out-dir")
        return measure(args.measure, args.out_dir)
    if args.case:
        if not args.out:
            parser.error("--case needs --out")
        run_case(args.case, args.out)
        return 0
    parser.error("give --measure, --case or --replay")
    return 2


if __name__ == "__main__":
    sys.exit(main())
