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

    python benchmarks/gemm_in_step.py --out $OUT/gemm_in_step.json      # needs CUDA
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

TOKENS, HIDDEN, FFN, BLOCKS, VOCAB = 8192, 4096, 11008, 8, 32000
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


def step_gemms(torch: Any) -> list[tuple[str, tuple[int, int, int], Any]]:
    """The step's GEMMs in order: (class, (m, k, n), thunk)."""
    widths = {"attn_in": HIDDEN, "o_in": HIDDEN, "mlp_in": HIDDEN, "down_in": FFN}
    blocks = [_block(torch, widths) for _ in range(BLOCKS)]
    head = {"x": torch.randn(TOKENS, HIDDEN, device="cuda", dtype=torch.bfloat16),
            "w": torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * HIDDEN ** -0.5,
            "g": torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16) * 1e-4}

    def fwd(x: Any, w: Any) -> Any:
        return lambda: torch.mm(x, w.t())

    def dgrad(g: Any, w: Any) -> Any:
        return lambda: torch.mm(g, w)

    def wgrad(g: Any, x: Any) -> Any:
        return lambda: torch.mm(g.t(), x)

    seq: list[tuple[str, tuple[int, int, int], Any]] = []
    for b in blocks:
        for name, d_in, d_out, src in LINEARS:
            seq.append((f"fwd {d_in}->{d_out}", (TOKENS, d_in, d_out), fwd(b[src], b["w_" + name])))
    seq.append((f"fwd {HIDDEN}->{VOCAB}", (TOKENS, HIDDEN, VOCAB), fwd(head["x"], head["w"])))
    seq.append((f"dgrad {HIDDEN}->{VOCAB}", (TOKENS, VOCAB, HIDDEN), dgrad(head["g"], head["w"])))
    seq.append((f"wgrad {HIDDEN}->{VOCAB}", (VOCAB, TOKENS, HIDDEN), wgrad(head["g"], head["x"])))
    for b in reversed(blocks):
        for name, d_in, d_out, src in reversed(LINEARS):
            seq.append((f"dgrad {d_in}->{d_out}", (TOKENS, d_out, d_in), dgrad(b["g_" + name], b["w_" + name])))
            seq.append((f"wgrad {d_in}->{d_out}", (d_out, TOKENS, d_in), wgrad(b["g_" + name], b[src])))
    return seq


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
    seq = step_gemms(torch)
    classes = {cls: (shape, fn) for cls, shape, fn in seq}  # one instance of each class
    flops = {cls: 2.0 * shape[0] * shape[1] * shape[2] for cls, (shape, _) in classes.items()}
    phases: list[dict[str, Any]] = []
    src, dst = (torch.empty(2**30, dtype=torch.uint8, device="cuda") for _ in range(2))
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def copies(cls: str) -> Any:  # copies worth STREAM_SHARE of the GEMM at 800 TFLOP/s, at ~3 TB/s
        n = min(int(STREAM_SHARE * flops[cls] / 800e12 * 3e12 / 2), src.numel())
        return lambda: dst[:n].copy_(src[:n])

    streams = {cls: (None, copies(cls)) for cls in flops}
    flushes = {cls: (flush.zero_, None) for cls in flops}

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
        for _, fn in classes.values():  # pick and load every kernel once
            fn()
        streams[seq[0][0]][1]()
        idle()
        begin = stamp()
        burst: dict[str, list[float]] = {}
        for cls, (_, fn) in classes.items():
            pairs = [_timed(torch, fn) for _ in range(10)]
            torch.cuda.synchronize()
            burst[cls] = [a.elapsed_time(b) / 1e3 for a, b in pairs[2:]]
        phase("burst", burst, begin)
        idle()
        begin = stamp()
        sustained: dict[str, list[float]] = {}
        for cls, (_, fn) in classes.items():
            sustained[cls] = run_sequence(torch, [(cls, None, fn)], args.sustain)[cls]
        phase("sustained", sustained, begin)
        for name, extra in (("sequence", None), ("sequence+stream", streams.get), ("sequence+flush", flushes.get)):
            idle()
            begin = stamp()
            phase(name, run_sequence(torch, seq, args.seconds, extra), begin)
    finally:
        smi.terminate()
        smi.wait()
    return {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "power_limit_w": _power_limit(),
            "stream_share": STREAM_SHARE, "flops": flops, "smi": smi_path.name, "phases": phases}


def report(r: dict[str, Any], smi_path: Path) -> str:
    """A table: each GEMM class's rate (TFLOP/s) per variant, and each variant's clock and power."""
    samples = read_smi(smi_path) if smi_path.exists() else []
    names = [p["name"] for p in r["phases"]]
    lines = [f"# GEMMs of an eager Llama 2 7B step, alone and in sequence ({r['device']}, torch {r['torch']})", "",
             "| GEMM (linear in -> out) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for cls, f in r["flops"].items():
        rates = [f / p["median_s"][cls] / 1e12 for p in r["phases"]]
        lines.append(f"| {cls} | " + " | ".join(f"{x:.0f}" for x in rates) + " |")
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
    parser.add_argument("--report", action="store_true", help="print the table of an existing --out file")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.report:
        out.write_text(json.dumps(measure(args), indent=1))
    r = json.loads(out.read_text())
    print(report(r, out.with_name(r["smi"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
