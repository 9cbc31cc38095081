"""Throughput of each context-parallel attention kind against plain flash attention.

Degree 1 (one process, one GPU): every kind runs on a one-rank group, so the time over plain
SDPA flash attention is the machinery's overhead (Ulysses at degree 1 *is* SDPA; ring and
striped run their LSE-merging engine on one block; hybrid is Ulysses 1 x ring 1). With several
GPUs visible, the same attention is also run split over all of them (ranks spawned here, or
under ``torchrun``): each kind at degree = world size on the full sequence, hybrid with
Ulysses degree world/2 x ring 2.

Reported per (sequence, degree, kind): forward and forward+backward milliseconds (median of
``--iters`` after ``--warmup``; the slowest rank's under several GPUs), achieved attention TFLOP/s
and the time relative to flash attention on one GPU. Attention FLOPs (FlashAttention-2, Dao 2023,
§4.1 benchmark convention): forward ``4 * B * S^2 * H * D``, halved when causal; backward 2.5x the
forward.

    python benchmarks/context_parallel.py benchmarks/results/context_parallel.json
    torchrun --nproc-per-node 8 benchmarks/context_parallel.py out.json --seq 131072
    python benchmarks/context_parallel.py /tmp/cp.json --device cpu --seq 64 --heads 4 --kv-heads 2 --head-dim 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from galvatron.runtime.context import ContextAttention, new_context_groups, shard_sequence

KINDS = ("ulysses", "ring", "striped", "hybrid")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536], help="full sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--full", action="store_true", help="non-causal attention (default causal)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--no-multi", action="store_true", help="skip the several-GPU runs")
    return p.parse_args(argv)


def attention_flops(args: argparse.Namespace, seq: int, backward: bool) -> float:
    fwd = 4.0 * args.batch * seq * seq * args.heads * args.head_dim * (1.0 if args.full else 0.5)
    return fwd * (3.5 if backward else 1.0)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain SDPA (flash kernel on GPU) with GQA: the reference every kind is compared with."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def _elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in ms (CUDA events on GPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def _time_ms(fn: Callable[[], object], args: argparse.Namespace, device: torch.device) -> float:
    """Median time of ``fn`` in ms over ``args.iters`` calls after ``args.warmup``; the slowest rank's."""
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = _elapsed_ms(fn, device)
        if i >= args.warmup:
            times.append(elapsed)
    median = torch.tensor(statistics.median(times), dtype=torch.float64, device=device)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return median.item()


def measure(attn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            args: argparse.Namespace) -> dict[str, float]:
    """Forward and forward+backward times of ``attn`` on local shards ``q, k, v``."""
    causal = not args.full
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)

    def forward() -> None:
        with torch.no_grad():
            attn(q, k, v, causal=causal)

    def forward_backward() -> None:
        out = attn(*leaves, causal=causal)
        out.backward(dout)
        for t in leaves:
            t.grad = None

    return {"fwd_ms": _time_ms(forward, args, q.device), "fwd_bwd_ms": _time_ms(forward_backward, args, q.device)}


def _inputs(args: argparse.Namespace, seq: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    shapes = [(args.batch, h, seq, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    return tuple(torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes)


def _record(args: argparse.Namespace, seq: int, degree: int, kind: str, times: dict[str, float],
            flash_ms: float | None) -> dict[str, object]:
    row: dict[str, object] = {"seq": seq, "degree": degree, "kind": kind, **times}
    row["tflops"] = attention_flops(args, seq, backward=True) / (times["fwd_bwd_ms"] * 1e-3) / 1e12
    row["tokens_per_s"] = args.batch * seq / (times["fwd_bwd_ms"] * 1e-3)
    if flash_ms is not None:
        row["vs_flash_1gpu"] = times["fwd_bwd_ms"] / flash_ms
    return row


def run_cases(args: argparse.Namespace, device: torch.device) -> list[dict[str, object]]:
    """Every sequence length x kind on the current process group (degree = its size)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = [list(range(world))]
    cores = {kind: ContextAttention(kind, new_context_groups(ranks, kind)) for kind in ("ulysses", "ring", "striped")}
    if world == 1 or world % 2 == 0:
        cores["hybrid"] = ContextAttention("hybrid", new_context_groups(ranks, "hybrid", max(world // 2, 1)))
    rows = []
    for seq in args.seq:
        full = _inputs(args, seq, device)
        flash_ms = None
        if world == 1:
            times = measure(flash, *full, args)
            flash_ms = times["fwd_bwd_ms"]
            rows.append(_record(args, seq, 1, "flash", times, flash_ms))
        for kind, core in cores.items():
            local = [shard_sequence(t, kind, rank, world, dim=2).contiguous() for t in full]
            rows.append(_record(args, seq, world, kind, measure(core, *local, args), flash_ms))
        del full
    return rows


def _init(rank: int, world: int, store_dir: str | None, device_type: str) -> torch.device:
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if store_dir is None:  # torchrun
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
    else:
        store = dist.FileStore(os.path.join(store_dir, "store"), world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(minutes=5))
    return device


def _worker(rank: int, world: int, store_dir: str | None, args: argparse.Namespace, out: str | None) -> None:
    device = _init(rank, world, store_dir, args.device)
    rows = run_cases(args, device)
    if rank == 0 and out is not None:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _spawned(world: int, args: argparse.Namespace) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(world, tmp, args, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: pass --device cpu for a smoke run")
    info = {"torch": torch.__version__, "config": {k: v for k, v in vars(args).items() if k != "out"},
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    if "LOCAL_RANK" in os.environ:  # under torchrun: one degree, the world's
        rank = int(os.environ["RANK"])
        device = _init(int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), None, args.device)
        rows = run_cases(args, device)
        if rank == 0:
            _write(args.out, {**info, "results": rows})
        dist.destroy_process_group()
        return
    rows = _spawned(1, args)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 1
    if gpus > 1 and not args.no_multi:
        rows += _spawned(gpus, args)
    _write(args.out, {**info, "results": rows})


def _write(path: str, payload: dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    for row in payload["results"]:
        extra = f"  x{row['vs_flash_1gpu']:.2f} of flash" if "vs_flash_1gpu" in row else ""
        print(f"S={row['seq']:>7} P={row['degree']} {row['kind']:>8}: fwd {row['fwd_ms']:8.2f} ms  "
              f"fwd+bwd {row['fwd_bwd_ms']:8.2f} ms  {row['tflops']:6.1f} TFLOP/s{extra}")


if __name__ == "__main__":
    main()
