"""Where the device time of one eager training step of the reference GPT goes, kernel by kernel.

The hand-written side of ``benchmarks/gpu_speed.py`` (bf16 autocast over fp32 parameters, SDPA,
fused AdamW, ``F.cross_entropy(logits.float(), y)``), eager, one GPU: three steps under
``torch.profiler`` after three warm-up steps; every CUDA kernel's time summed by category (GEMM,
attention, loss, optimizer, copies and casts, other element-wise and reductions, memsets), next to
the wall time of a step timed without the profiler (a wall time above the summed kernel time is
host-bound time or gaps); where the GPU idles between kernels, by the CPU op that launched the kernel
after each gap (``gaps``); and the same kernels per ATen op and input shapes (``ops``), and each
linear layer's three GEMMs run back to back in bf16 outside the model (``linears``: kernel time, the
GEMM rate without the model's other kernels in between). What the cost model's terms are checked against.

    python benchmarks/step_breakdown.py --out benchmarks/results/step_breakdown.json [--case gpt-1.4b gpt-2b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_breakdown import kernel_times
from gpu_speed import CASES as SPEED_CASES
from gpu_speed import Case, Side, loss_fn
from torch.profiler import ProfilerActivity, profile

from galvatron.models import GPT, GPTConfig

CASES = {**SPEED_CASES, "gpt3-xl": Case("gpt3-xl", GPTConfig(  # configs/models/gpt3-1.3b.yaml
    vocab=50257, seq_len=2048, layers=24, hidden=2048, heads=16, bias=True, position="learned",
    tied_embeddings=True), 2),
    # Llama 2 7B's blocks (configs/models/llama2-7b.yaml) at one dp2 rank's share of benchmarks/multi_gpu/plans.py
    # (4 x 2048 tokens), 8 of its 32 blocks so one GPU holds the step
    "llama2-7b-8l": Case("llama2-7b-8l", GPTConfig(
        vocab=32000, seq_len=2048, layers=8, hidden=4096, heads=32, ffn_hidden=11008, activation="swiglu",
        norm="rmsnorm", bias=False, position="rope"), 4),
    # Llama 3.2 1B (configs/models/llama3.2-1b.yaml) at the batch of benchmarks/results/wrap_auto
    "llama3.2-1b": Case("llama3.2-1b", GPTConfig(
        vocab=128256, seq_len=2048, layers=16, hidden=2048, heads=32, kv_heads=8, ffn_hidden=8192,
        activation="swiglu", norm="rmsnorm", bias=False, position="rope", tied_embeddings=True), 8),
    # Mixtral 8x7B's blocks (configs/models/mixtral-8x7b.yaml), 2 of its 32, at benchmarks/results/wrap_auto's 2 x 2048
    "mixtral-8x7b-2l": Case("mixtral-8x7b-2l", GPTConfig(
        vocab=32000, seq_len=2048, layers=2, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, activation="swiglu",
        norm="rmsnorm", bias=False, position="rope", experts=8, top_k=2), 2)}

CATEGORIES = (  # first match wins, on the lower-cased kernel name
    ("attention", ("sdpa", "flash", "fmha", "dot_do_o", "convert_dq")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "splitkreduce")),
    ("optimizer", ("multi_tensor", "fused_adam", "adam")),
    ("loss", ("log_softmax", "nll_loss", "softmax")),
    ("layer_norm", ("layer_norm", "rms_norm")),
    ("memset", ("memset",)),
    ("copy/cast", ("copy", "memcpy", "cat")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "gelu", "add", "mul")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profiled_kernels(prof, steps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """From a ``torch.profiler`` run of ``steps`` steps with CPU and CUDA activity and shapes: each
    kernel's durations (ms) by name, every kernel once (GPU-side user annotations are not kernels),
    and per ATen op and input shapes [kernel ms, kernels, calls] per step."""
    ops: dict[str, list[float]] = {}
    kernels: dict[str, list[float]] = {}
    seen: set[tuple[str, int]] = set()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.kernels and e.name.startswith("aten::"):
            entry = ops.setdefault(f"{e.name} {e.input_shapes}"[:160], [0.0, 0.0, 0.0])
            entry[0] += sum(k.duration for k in e.kernels) * 1e-3 / steps
            entry[1] += len(e.kernels) / steps
            entry[2] += 1 / steps
        annotation = getattr(e, "is_user_annotation", False) or e.name == "Command Buffer Full"
        key = (e.name, e.time_range.start)
        if e.device_type == torch.autograd.DeviceType.CUDA and not annotation and key not in seen:
            seen.add(key)
            kernels.setdefault(e.name, []).append(e.time_range.elapsed_us() * 1e-3)
    return kernels, ops


def categories(kernels: dict[str, list[float]], steps: int) -> dict[str, float]:
    """Kernel ms per step by :func:`category`."""
    cats: dict[str, float] = {}
    for name, times in kernels.items():
        cats[category(name)] = cats.get(category(name), 0.0) + sum(times) / steps
    return cats


def linears(tokens: int, hidden: int, vocab: int, iters: int = 10) -> list[dict]:
    """Each linear layer of a block (q/k/v, output, MLP up and down) and the head: forward and both
    backward GEMMs in bf16, back to back, device kernel time per call."""
    out = []
    for d_in, d_out in ((hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden), (hidden, vocab)):
        x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)

        def both(x=x, w=w, g=g) -> None:
            torch.autograd.grad(F.linear(x, w), (x, w), g)

        fwd = kernel_times(lambda x=x, w=w: F.linear(x, w), iters)[0]
        total = kernel_times(both, iters)[0]
        flops = 2.0 * tokens * d_in * d_out
        out.append({"m": tokens, "k": d_in, "n": d_out, "forward_ms": fwd, "backward_ms": total - fwd,
                    "forward_tflops": flops / fwd / 1e9, "backward_tflops": 2 * flops / (total - fwd) / 1e9})
        print(f"linear {tokens}x{d_in} -> {d_out}: forward {out[-1]['forward_tflops']:.0f} TFLOP/s, backward "
              f"{out[-1]['backward_tflops']:.0f}", flush=True)
    return out


def idle_gaps(prof: Any, steps: int, top: int = 15) -> dict:
    """Where the GPU idles between the first and the last kernel of the profiled steps: every gap
    between one kernel's end and the next one's start (5 us or more), per step, attributed to the
    innermost CPU op around the host call that launched the kernel after the gap (the runtime call of
    the same correlation id); the ``top`` ops by idle time, and the largest single gaps."""
    import bisect

    events = prof.profiler.kineto_results.events()
    gpu = torch.autograd.DeviceType.CUDA
    kernels = sorted((e for e in events if e.device_type() == gpu), key=lambda e: e.start_ns())
    runtime = {e.correlation_id(): e.start_ns() for e in events
               if e.device_type() != gpu and e.name().startswith(("cuda", "cu"))}
    ops = sorted((e for e in events if e.device_type() != gpu and not e.name().startswith(("cuda", "cu"))),
                 key=lambda e: e.start_ns())
    starts = [e.start_ns() for e in ops]

    def around(t: int | None) -> str:
        if t is None:
            return "(launch not found)"
        i = bisect.bisect_right(starts, t)
        for e in reversed(ops[max(0, i - 400):i]):  # the latest-starting op still running at t
            if e.end_ns() >= t:
                return e.name()
        return "(no op around the launch)"

    by_op: dict[str, list[float]] = {}
    largest = []
    end = kernels[0].end_ns() if kernels else 0
    for k in kernels[1:]:
        gap = k.start_ns() - end
        if gap >= 5000:
            launch = runtime.get(k.linked_correlation_id()) or runtime.get(k.correlation_id())
            op = around(launch)
            by_op.setdefault(op, []).append(gap / 1e6)
            largest.append((gap / 1e6, op, k.name()[:100]))
        end = max(end, k.end_ns())
    total = sum(sum(v) for v in by_op.values())
    return {"idle_ms_per_step": total / steps,
            "by_op": [{"op": op, "ms_per_step": sum(v) / steps, "gaps_per_step": len(v) / steps}
                      for op, v in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))[:top]],
            "largest": [{"ms": g, "op": op, "next_kernel": name}
                        for g, op, name in sorted(largest, reverse=True)[:top]]}


def breakdown(case_name: str, steps: int = 3, batch: int | None = None, gemms: bool = True,
              lr: float | None = None, warmup: int = 3) -> dict:
    case = CASES[case_name]
    if batch:
        case = dataclasses.replace(case, batch=batch)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = GPT(case.cfg).to(device)
    side = Side("hand-written", model, model, device, autocast=True, loss=loss_fn)
    if lr is not None:  # 0: the weights (and so a MoE's routing, its GEMMs' shapes) stay as they are
        for group in side.opt.param_groups:
            group["lr"] = lr
    tokens = torch.randint(0, case.cfg.vocab, (case.batch, case.cfg.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    for _ in range(warmup):
        side.step(x, y)
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        side.step(x, y)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            side.step(x, y)
        torch.cuda.synchronize()
    kernels, ops = profiled_kernels(prof, steps)
    cats = categories(kernels, steps)
    top = sorted(kernels, key=lambda n: -sum(kernels[n]))[:40]
    result = {"case": case_name, "batch": case.batch, "lr": side.opt.param_groups[0]["lr"], "warmup": warmup,
              "seq": case.cfg.seq_len, "layers": case.cfg.layers,
              "hidden": case.cfg.hidden, "heads": case.cfg.heads, "wall_ms": sorted(walls)[len(walls) // 2] * 1e3,
              "kernel_ms": sum(cats.values()), "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
              "top_kernels": [{"name": n[:120], "category": category(n), "ms_per_step": sum(kernels[n]) / steps,
                               "calls_per_step": len(kernels[n]) / steps} for n in top],
              "ops": [{"op": k, "ms_per_step": v[0], "kernels_per_step": v[1], "calls_per_step": v[2]}
                      for k, v in sorted(ops.items(), key=lambda kv: -kv[1][0])[:80]],
              "gaps": idle_gaps(prof, steps),
              "linears": linears(case.batch * case.cfg.seq_len, case.cfg.hidden, case.cfg.vocab) if gemms else []}
    print(f"{case_name}: wall {result['wall_ms']:.1f} ms/step, kernels {result['kernel_ms']:.1f} ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["categories_ms"].items()), flush=True)
    del side, model
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    parser.add_argument("--case", nargs="+", default=["gpt-1.4b", "gpt-2b"], choices=sorted(CASES))
    parser.add_argument("--batch", type=int, nargs="+", help="samples per step instead of the case's (one run each)")
    parser.add_argument("--no-linears", action="store_true", help="skip the back-to-back linear-layer GEMMs")
    parser.add_argument("--warmup", type=int, nargs="+", default=[3], help="warm-up steps (one run each)")
    parser.add_argument("--lr", type=float, nargs="+", help="optimizer learning rates (one run each; 0 keeps the "
                        "weights, so a MoE routes alike every step)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    results = [breakdown(c, batch=b, gemms=not args.no_linears, lr=lr, warmup=w) for c in args.case
               for b in (args.batch or [None]) for lr in (args.lr or [None]) for w in args.warmup]
    args.out.write_text(json.dumps({"command": "python benchmarks/step_breakdown.py --out ... --case "
                                    + " ".join(args.case) + (" --batch " + " ".join(map(str, args.batch))
                                                             if args.batch else "")
                                    + (" --no-linears" if args.no_linears else "")
                                    + (" --lr " + " ".join(map(str, args.lr)) if args.lr else "")
                                    + " --warmup " + " ".join(map(str, args.warmup)),
                                    "date": time.strftime("%Y-%m-%d"),
                                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "cases": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
