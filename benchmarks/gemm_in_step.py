"""Why a training step's GEMMs run slower than the same GEMMs back to back, on one GPU.

On one H200, the eager Llama 2 7B step of ``step_breakdown.py`` (case ``llama2-7b-8l``: 8 blocks,
4 x 2048 tokens) ran its GEMMs at 690-746 TFLOP/s where the same shapes ran 787-807 back to back;
the hardware database holds back-to-back rates. This script runs that step's GEMMs (Llama 2 7B's
linear layers: q, k, v, o of 4096 x 4096, gate and up of 4096 -> 11008, down 11008 -> 4096, and the
32000-token head; forward ``x W^T``, input gradient ``dY W`` and weight gradient ``dY^T X``, as
autograd calls ``mm``) in bf16 under five conditions, timing every GEMM with CUDA events while
``nvidia-smi`` samples the SM clock and power every 20 ms:

- ``burst``: each distinct GEMM 10 times on the same tensors, right after an idle pause (the boost
  clock; what MAMF-style tables and ``step_breakdown``'s ``linears`` measure);
- ``sustained``: each distinct GEMM looped alone for ``--sustain`` seconds (the power cap's clock);
- ``sequence``: the step's GEMMs in the step's order (forward through the blocks and the head,
  backward back through them), every block with its own weights, saved inputs and gradients,
  nothing in between, looped for ``--seconds``;
- ``sequence+stream``: the same with a memory-bound copy after each GEMM, sized to take about the
  real step's share of non-GEMM kernels (``STREAM_SHARE``);
- ``sequence+flush``: the same with the L2 cache overwritten (a 256 MiB memset) before each GEMM.

Each variant reports every GEMM class's median time and rate over the second half of its loop (the
clock has settled), its median SM clock and power, and the share of samples the power cap throttled.

With ``--dtype fp8`` the same shapes run as Transformer Engine's fp8 GEMMs (``torch._scaled_mm`` of
e4m3 operands); the copies between them keep their bf16 size, as a step's other kernels do not get
faster when its GEMMs do.

    python benchmarks/gemm_in_step.py --out $OUT/gemm_in_step.json      # needs CUDA
    python benchmarks/gemm_in_step.py --dtype fp8 --out $OUT/gemm_in_step_fp8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sustained_clocks import SMI_FIELDS, _power_limit, _window, clock_of, read_smi, stamp

TOKENS, HIDDEN, HEADS, FFN, BLOCKS, VOCAB = 8192, 4096, 32, 11008, 8, 32000
LINEARS = (("q", HIDDEN, HIDDEN, "attn_in"), ("k", HIDDEN, HIDDEN, "attn_in"), ("v", HIDDEN, HIDDEN, "attn_in"),
           ("o", HIDDEN, HIDDEN, "o_in"), ("gate", HIDDEN, FFN, "mlp_in"), ("up", HIDDEN, FFN, "mlp_in"),
           ("down", FFN, HIDDEN, "down_in"))
"""(name, inputs, outputs, saved input it reads) of one block; q, k and v read the same norm output."""
STREAM_SHARE = 0.55
"""Non-GEMM, non-attention kernel time over GEMM time in the eager step (67.6 / 118.2 ms on one H200,
results/step_breakdown_llama2_7b_8l.json): how much copying ``sequence+stream`` adds per GEMM."""


def _block(torch: Any, width: dict[str, int]) -> dict[str, Any]:
    """One block's weights, saved inputs and output gradients (bf16, scaled like a trained model's)."""
    dev, bf16 = "cuda", torch.bfloat16
    t: dict[str, Any] = {name: torch.randn(TOKENS, w, device=dev, dtype=bf16) for name, w in width.items()}
    for name, d_in, d_out, _ in LINEARS:
        t["w_" + name] = torch.randn(d_out, d_in, device=dev, dtype=bf16) * d_in ** -0.5
        t["g_" + name] = torch.randn(TOKENS, d_out, device=dev, dtype=bf16) * 1e-3
    return t


def step_gemms(torch: Any, attention: tuple[str, int] | None = None, fp8: bool = False) -> list[tuple[str, float, Any]]:
    """The step's GEMMs in order: (class, FLOPs, thunk); with ``attention`` = (kernel, sequence
    length), each block's causal attention core too (forward after q, k and v; backward after the
    output projection's gradients), over the same tokens. ``fp8``: every GEMM as Transformer
    Engine runs it, ``torch._scaled_mm`` of e4m3 operands (row-major A, column-major B, per-tensor
    scales, bf16 out), each call on its own operands of its shape (TE's cast-transposes make them)."""
    if fp8:
        return _fp8_gemms(torch, step_gemms(torch))
    widths = {"attn_in": HIDDEN, "o_in": HIDDEN, "mlp_in": HIDDEN, "down_in": FFN}
    blocks = [_block(torch, widths) for _ in range(BLOCKS)]
    head = {"x": torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16),
            "w": torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN ** -0.5,
            "g": torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16) * 1e-4}
    cores = [attention_core(torch, *attention) for _ in blocks] if attention else []

    def mm(m: int, k: int, n: int, a: Any, b: Any) -> tuple[float, Any]:
        return 2.0 * m * k * n, lambda: torch.mm(a, b)

    seq: list[tuple[str, float, Any]] = []
    for i, b in enumerate(blocks):
        for name, d_in, d_out, src in LINEARS:
            seq.append((f"fwd {d_in}->{d_out}", *mm(TOKENS, d_in, d_out, b[src], b["w_" + name].t())))
            if cores and name == "v":
                seq.append(cores[i][0])
    seq.append((f"fwd {HIDDEN}->{VOCAB}", *mm(TOKENS, HIDDEN, VOCAB, head["x"], head["w"].t())))
    seq.append((f"dgrad {HIDDEN}->{VOCAB}", *mm(TOKENS, VOCAB, HIDDEN, head["g"], head["w"])))
    seq.append((f"wgrad {HIDDEN}->{VOCAB}", *mm(VOCAB, TOKENS, HIDDEN, head["g"].t(), head["x"])))
    for i, b in reversed(list(enumerate(blocks))):
        for name, d_in, d_out, src in reversed(LINEARS):
            seq.append((f"dgrad {d_in}->{d_out}", *mm(TOKENS, d_out, d_in, b["g_" + name], b["w_" + name])))
            seq.append((f"wgrad {d_in}->{d_out}", *mm(d_out, TOKENS, d_in, b["g_" + name].t(), b[src])))
            if cores and name == "o":
                seq.append(cores[i][1])
    return seq


def _fp8_gemms(torch: Any, bf16: list[tuple[str, float, Any]]) -> list[tuple[str, float, Any]]:
    """The bf16 sequence's GEMMs (by class and FLOPs) as fp8 ``_scaled_mm`` calls of the same shapes."""
    shapes = {f"fwd {HIDDEN}->{VOCAB}": (TOKENS, HIDDEN, VOCAB), f"dgrad {HIDDEN}->{VOCAB}": (TOKENS, VOCAB, HIDDEN),
              f"wgrad {HIDDEN}->{VOCAB}": (VOCAB, TOKENS, HIDDEN)}
    for _, d_in, d_out, _ in LINEARS:
        shapes.update({f"fwd {d_in}->{d_out}": (TOKENS, d_in, d_out), f"dgrad {d_in}->{d_out}": (TOKENS, d_out, d_in),
                       f"wgrad {d_in}->{d_out}": (d_out, TOKENS, d_in)})
    one = torch.ones((), device="cuda")
    out = []
    for cls, flops, _ in bf16:
        m, k, n = shapes[cls]
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn).t()
        out.append((cls, flops, lambda a=a, b=b: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)))
    del bf16
    torch.cuda.empty_cache()
    return out


def attention_core(torch: Any, kernel: str, seq_len: int) -> tuple[tuple[str, float, Any], tuple[str, float, Any]]:
    """One block's causal attention over the step's tokens (32 heads of 128) on SDPA's ``kernel``
    (``cudnn`` or ``flash2``): the forward item keeps its output for the backward item.
    FLOPs: forward ``4 B H S^2 D / 2`` (causal), backward 2.5 times that."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash2": SDPBackend.FLASH_ATTENTION}[kernel]
    shape = (TOKENS // seq_len, HEADS, seq_len, HIDDEN // HEADS)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 1e-3
    held: list[Any] = []

    def fwd() -> None:
        with sdpa_kernel(backend):
            held.append(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def bwd() -> None:
        torch.autograd.grad(held.pop(), (q, k, v), g)

    flops = 2.0 * shape[0] * HEADS * seq_len * seq_len * (HIDDEN // HEADS)
    return (f"attn fwd s{seq_len}", flops, fwd), (f"attn bwd s{seq_len}", 2.5 * flops, bwd)


def _timed(torch: Any, fn: Any, before: Any = None, after: Any = None) -> tuple[Any, Any]:
    """Run ``fn`` between two recorded events (``before`` and ``after`` outside them)."""
    if before is not None:
        before()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    if after is not None:
        after()
    return start, end


def run_sequence(torch: Any, seq: list, seconds: float, extra: Any = None) -> dict[str, list[float]]:
    """Loop the sequence for ``seconds``, with ``extra(class)`` giving what runs before and after each
    GEMM (or None); per class, each call's kernel time (s) over the second half of the loop."""
    rounds: list[list[tuple[str, Any, Any]]] = []
    sync_every = max(1, 200 // len(seq))  # keep the host ahead, but not unboundedly
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        rounds.append([(cls, *_timed(torch, fn, *(extra(cls) if extra else (None, None)))) for cls, _, fn in seq])
        if len(rounds) % sync_every == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = defaultdict(list)
    for r in rounds[len(rounds) // 2:]:
        for cls, a, b in r:
            times[cls].append(a.elapsed_time(b) / 1e3)
    return dict(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out = Path(args.out)
    smi_path = out.with_name(out.stem + "_smi.csv")
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv", "-lms", "20"],
                           stdout=smi_path.open("w"), stderr=subprocess.DEVNULL)
    seq = step_gemms(torch, fp8=args.dtype == "fp8")
    classes = {cls: fn for cls, _, fn in seq}  # one instance of each class
    flops = {cls: f for cls, f, _ in seq}
    phases: list[dict[str, Any]] = []
    src, dst = (torch.empty(2**30, dtype=torch.uint8, device="cuda") for _ in range(2))
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def copies(cls: str) -> Any:  # copies worth STREAM_SHARE of the GEMM at 800 TFLOP/s, at ~3 TB/s
        n = min(int(STREAM_SHARE * flops[cls] / 800e12 * 3e12 / 2), src.numel())
        return lambda: dst[:n].copy_(src[:n])

    streams = {cls: (None, copies(cls)) for cls in flops}
    flushes = {cls: (flush.zero_, None) for cls in flops}
    no_extra = (None, None)

    def phase(name: str, times: dict[str, list[float]], begin: str) -> None:
        phases.append({"name": name, "start": begin, "end": stamp(),
                       "median_s": {c: statistics.median(v) for c, v in times.items()},
                       "calls": {c: len(v) for c, v in times.items()}})
        total = sum(flops[c] * len(v) for c, v in times.items()) / sum(sum(v) for v in times.values())
        print(f"{name}: GEMMs at {total / 1e12:.0f} TFLOP/s", file=sys.stderr, flush=True)

    def idle() -> None:
        torch.cuda.synchronize()
        time.sleep(args.idle)

    try:
        for fn in classes.values():  # pick and load every kernel once
            fn()
        streams[seq[0][0]][1]()
        idle()
        begin = stamp()
        burst: dict[str, list[float]] = {}
        for cls, fn in classes.items():
            pairs = [_timed(torch, fn) for _ in range(10)]
            torch.cuda.synchronize()
            burst[cls] = [a.elapsed_time(b) / 1e3 for a, b in pairs[2:]]
        phase("burst", burst, begin)
        idle()
        begin = stamp()
        sustained: dict[str, list[float]] = {}
        for cls, fn in classes.items():
            sustained[cls] = run_sequence(torch, [(cls, None, fn)], args.sustain)[cls]
        phase("sustained", sustained, begin)
        for name, extra in (("sequence", None), ("sequence+stream", streams.get), ("sequence+flush", flushes.get)):
            idle()
            begin = stamp()
            phase(name, run_sequence(torch, seq, args.seconds, extra), begin)
        for kernel in args.attention:
            for seq_len in (2048, 8192):
                step = step_gemms(torch, (kernel, seq_len))
                attn = [item for item in step if item[0].startswith("attn")]
                core = [attn[0], attn[-1]]  # the first block's forward and backward
                flops.update({cls: f for cls, f, _ in core})
                for _, _, fn in core:  # pick and load the kernels once
                    fn()
                idle()
                begin = stamp()
                pairs = [[_timed(torch, fn) for _, _, fn in core] for _ in range(10)]
                torch.cuda.synchronize()
                phase(f"attention {kernel} s{seq_len}",
                      {cls: [p[i][0].elapsed_time(p[i][1]) / 1e3 for p in pairs[2:]] for i, (cls, _, _) in
                       enumerate(core)}, begin)
                idle()
                begin = stamp()
                phase(f"step-like {kernel} s{seq_len}",
                      run_sequence(torch, step, args.seconds, lambda c: streams.get(c, no_extra)), begin)
                del step, core
    finally:
        smi.terminate()
        smi.wait()
    return {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "power_limit_w": _power_limit(),
            "stream_share": STREAM_SHARE, "flops": flops, "smi": smi_path.name, "phases": phases}


def report(r: dict[str, Any], smi_path: Path) -> str:
    """A table: each GEMM class's rate (TFLOP/s) per variant, and each variant's clock and power."""
    samples = read_smi(smi_path) if smi_path.exists() else []
    names = [p["name"] for p in r["phases"]]
    lines = [f"# {r.get('dtype', 'bf16')} GEMMs of an eager Llama 2 7B step, alone and in sequence ({r['device']}, "
             f"torch {r['torch']})", "",
             "| GEMM (linear in -> out) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cls, f in r["flops"].items():
        rates = [f / p["median_s"][cls] / 1e12 if cls in p["median_s"] else None for p in r["phases"]]
        lines.append(f"| {cls} | " + " | ".join("-" if x is None else f"{x:.0f}" for x in rates) + " |")
    totals = []
    for p in r["phases"]:
        work = sum(r["flops"][c] * p["calls"][c] for c in p["calls"])
        busy = sum(p["median_s"][c] * p["calls"][c] for c in p["calls"])
        totals.append(work / busy / 1e12)
    lines.append("| all (call-weighted) | " + " | ".join(f"**{x:.0f}**" for x in totals) + " |")
    if samples:
        clocks = []
        for p in r["phases"]:
            window = _window(samples, p["start"], p["end"], 0.5 if p["name"] != "burst" else 0.0)
            clocks.append(clock_of(window) if window else None)
        lines.append("| SM MHz (median) | " + " | ".join(f"{c['sm_mhz']:.0f}" if c else "-" for c in clocks) + " |")
        lines.append("| power W (median) | " + " | ".join(f"{c['power_w']:.0f}" if c else "-" for c in clocks) + " |")
        lines.append("| power-capped samples | " + " | ".join(f"{c['power_capped']:.0%}" if c else "-" for c in clocks)
                     + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path (nvidia-smi samples beside it, *_smi.csv)")
    parser.add_argument("--seconds", type=float, default=6.0, help="each sequence variant's loop")
    parser.add_argument("--sustain", type=float, default=1.5, help="each GEMM's loop alone")
    parser.add_argument("--idle", type=float, default=4.0, help="idle pause before each variant")
    parser.add_argument("--attention", nargs="*", default=[], choices=("cudnn", "flash2"),
                        help="also time attention kernels in bursts and in a step-like loop")
    parser.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16",
                        help="fp8: the same GEMM shapes as torch._scaled_mm of e4m3 operands (no attention)")
    parser.add_argument("--report", action="store_true", help="print the table of an existing --out file")
    args = parser.parse_args()
    if args.dtype == "fp8" and args.attention:
        parser.error("--attention runs with --dtype bf16 only")
    out = Path(args.out)
    if not args.report:
        out.write_text(json.dumps(measure(args), indent=1))
    r = json.loads(out.read_text())
    print(report(r, out.with_name(r["smi"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
