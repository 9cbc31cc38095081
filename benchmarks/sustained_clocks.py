"""SM clocks under the power cap: kernels alone and mixed, sustained and in bursts, on one GPU.

The hardware database's kernel rates come from two kinds of runs: GEMM efficiencies from MAMF
tables (long loops of one GEMM shape) and fused-attention efficiencies from our short timed runs
(``attention_rates.py``: a few calls after an idle GPU). A training step runs for seconds, and a
GPU at its power cap lowers the SM clock until it draws the cap; compute-bound kernels then run at
that clock, memory-bound ones hardly notice. This script measures what that means on one GPU.

``--measure`` (needs CUDA; ``nvidia-smi`` samples clock, power and throttle reasons every 50 ms
beside it) runs, each for ``--seconds`` after an idle pause: a bf16 GEMM (8192^3), FlashAttention-2
and cuDNN attention (forward + backward, batch 2, 32 heads of 128, sequence 8192, causal), a
memory-bound kernel (an fp32 multiply over 1 GiB), and three mixes of them in one loop. Each is also
timed in a short burst after the idle pause (at the boost clock). ``--compare`` (no GPU) reads the
results and checks a power model against them:

    P(f) = P_idle + k_w f^alpha  for workload w;  under the cap, f settles where P(f) = cap.

A workload measured alone gives ``k_w`` from its sustained clock and power. A mix spending time
fractions ``x_w`` on each draws the fraction-weighted power, so its clock is
``f = ((cap - P_idle) / sum_w x_w k_w)^(1/alpha)`` (at most the boost clock): a power mean of the
workloads' own clocks. ``alpha`` = 3 (dynamic power C V^2 f with the voltage rising about linearly
with the clock in the DVFS range); 2 is shown beside it. The model predicts each mix's clock from
the single-workload runs, and the torchtitan step's clock (``titan_reproduce_smi.csv``) from its
measured kernel time per category.

    python benchmarks/sustained_clocks.py --measure --out $OUT/sustained_clocks.json
    python benchmarks/sustained_clocks.py --compare benchmarks/results/sustained_clocks.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SMI_FIELDS = "timestamp,clocks.current.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
SOFTWARE_POWER_CAP = 0x4  # nvmlClocksEventReasonSwPowerCap
ALPHAS = (3.0, 2.0)

SINGLE = ("gemm", "flash2", "cudnn", "memory")
MIXES = {"gemm+memory": {"gemm": 2, "memory": 3}, "gemm+flash2": {"gemm": 3, "flash2": 1},
         "step-like": {"gemm": 4, "flash2": 1, "memory": 4}}
"""Calls of each workload per loop iteration."""


# --------------------------------------------------------------------------------------- measure
def _workloads() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    q, k, v = (torch.randn(2, 8192, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad = torch.randn_like(q)
    x = torch.randn(1 << 28, device="cuda")  # 1 GiB of fp32

    def gemm() -> None:
        torch.mm(a, b, out=c)

    def attention(backend: Any) -> Any:
        def run() -> None:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(grad)
            q.grad = k.grad = v.grad = None
        return run

    def memory() -> None:
        x.mul_(1.0000001)

    flops_attn = 4 * 2 * 32 * 8192**2 * 128 / 2 * 3.5  # causal forward + 2.5x backward
    return {"gemm": (gemm, 2 * 8192**3), "flash2": (attention(SDPBackend.FLASH_ATTENTION), flops_attn),
            "cudnn": (attention(SDPBackend.CUDNN_ATTENTION), flops_attn), "memory": (memory, 0.0),
            "memory_bytes": 2 * x.numel() * 4}


def _time_calls(fn: Any, calls: int) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out = Path(args.out)
    smi_path = out.with_name(out.stem + "_smi.csv")
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv", "-lms", "50"],
                           stdout=smi_path.open("w"), stderr=subprocess.DEVNULL)
    work = _workloads()
    phases: list[dict[str, Any]] = []

    def phase(name: str, **fields: Any) -> dict[str, Any]:
        row = {"name": name, "start": stamp(), **fields}
        phases.append(row)
        return row

    try:
        for fn, _ in (work[w] for w in SINGLE):  # compile/cache every kernel once
            fn()
        torch.cuda.synchronize()
        for name in (*SINGLE, *MIXES):
            calls = MIXES.get(name, {name: 1})
            idle = phase(f"{name}:idle")
            time.sleep(args.idle)
            idle["end"] = stamp()
            burst = {w: _time_calls(work[w][0], 3) for w in calls}  # right after the pause: boost clock
            row = phase(name, burst_s=burst)
            iters, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                for w, n in calls.items():
                    for _ in range(n):
                        work[w][0]()
                iters += 1
                if iters % 4 == 0:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            row["end"] = stamp()
            row["iteration_s"] = (time.perf_counter() - start) / iters
            # each workload's time inside the sustained mix (the clock has settled by now)
            row["sustained_s"] = {w: _time_calls(work[w][0], 3 if w != "memory" else 10) for w in calls}
            row["calls"] = calls
            print(f"{name}: {row['iteration_s'] * 1e3:.2f} ms per iteration", file=sys.stderr, flush=True)
    finally:
        smi.terminate()
        smi.wait()
    flops = {w: work[w][1] for w in SINGLE}
    return {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "power_limit_w": _power_limit(), "flops": flops, "memory_bytes": work["memory_bytes"],
            "seconds": args.seconds, "smi": smi_path.name, "phases": phases}


def _power_limit() -> float | None:
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, check=True).stdout
        return float(text.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def stamp() -> str:
    """Now, in nvidia-smi's timestamp format (local time), so phases and samples share one clock."""
    now = time.time()
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


# --------------------------------------------------------------------------------------- compare
def seconds_of(text: str) -> float:
    """An nvidia-smi timestamp as seconds (any fixed origin: only differences are used)."""
    whole, _, frac = text.partition(".")
    return time.mktime(time.strptime(whole, "%Y/%m/%d %H:%M:%S")) + (float("0." + frac) if frac else 0.0)


def read_smi(path: Path) -> list[dict[str, float]]:
    """nvidia-smi CSV rows as {time (s), sm_mhz, power_w, reasons}, columns found by their header."""
    rows = []
    with path.open() as f:
        records = csv.reader(f, skipinitialspace=True)
        header = next(records, [])
        col = {key: next(i for i, name in enumerate(header) if name.startswith(prefix))
               for key, prefix in (("sm", "clocks.current.sm"), ("power", "power.draw"), ("reasons", "clocks_"))}
        for rec in records:
            try:
                rows.append({"time": seconds_of(rec[0]), "sm_mhz": float(rec[col["sm"]].split()[0]),
                             "power_w": float(rec[col["power"]].split()[0]), "reasons": int(rec[col["reasons"]], 16)})
            except (ValueError, IndexError):
                continue
    return rows


def _window(samples: list[dict[str, float]], start: str, end: str, skip: float) -> list[dict[str, float]]:
    """Samples from ``skip`` seconds after ``start`` to ``end`` (timestamps as ``stamp`` writes them)."""
    lo, hi = seconds_of(start) + skip, seconds_of(end)
    return [s for s in samples if lo <= s["time"] <= hi]


def clock_of(samples: list[dict[str, float]]) -> dict[str, float]:
    """Median clock and power of busy samples, and the share the software power cap throttled."""
    return {"sm_mhz": statistics.median(s["sm_mhz"] for s in samples),
            "power_w": statistics.median(s["power_w"] for s in samples),
            "power_capped": sum(bool(s["reasons"] & SOFTWARE_POWER_CAP) for s in samples) / len(samples),
            "samples": len(samples)}


def mix_clock(fractions: dict[str, float], alone: dict[str, dict[str, float]], idle_w: float, cap: float,
              boost: float, alpha: float) -> float:
    """The clock where the time-weighted power of the workloads meets the cap (at most ``boost``):
    each workload's ``k = (P - P_idle) / f^alpha`` from its own sustained clock and power."""
    k = sum(x * (alone[w]["power_w"] - idle_w) / alone[w]["sm_mhz"] ** alpha for w, x in fractions.items())
    return min(boost, ((cap - idle_w) / k) ** (1 / alpha))


def compare(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    samples = read_smi(path.with_name(data["smi"]))
    cap = data["power_limit_w"]
    boost = max(s["sm_mhz"] for s in samples)
    phases = {p["name"]: p for p in data["phases"]}
    idle = [s for p in data["phases"] if p["name"].endswith(":idle")
            for s in _window(samples, p["start"], p["end"], 2.0)]
    idle_w = statistics.median(s["power_w"] for s in idle)
    measured = {name: clock_of(_window(samples, p["start"], p["end"], 2.0))
                for name, p in phases.items() if not name.endswith(":idle")}
    rates = {}
    for w in SINGLE:
        p = phases[w]
        work = data["flops"][w] or data["memory_bytes"]
        unit = 1e12 if data["flops"][w] else 1e9
        rates[w] = {"burst": work / p["burst_s"][w] / unit, "sustained": work / p["sustained_s"][w] / unit,
                    "unit": "TFLOP/s" if data["flops"][w] else "GB/s"}
    # energy per unit of work (J per FLOP or per byte) above idle, from each workload alone at the cap
    work = {w: data["flops"][w] or data["memory_bytes"] for w in SINGLE}
    energy = {w: (measured[w]["power_w"] - idle_w) * phases[w]["sustained_s"][w] / work[w] for w in SINGLE}
    mixes = {}
    for name, calls in MIXES.items():
        p = phases[name]
        burst_sum = sum(n * p["burst_s"][w] for w, n in calls.items())
        # the energy roofline: a loop lasts at least its energy over the power the cap leaves above idle
        energy_bound = sum(n * work[w] * energy[w] for w, n in calls.items()) / (cap - idle_w)
        spent = {w: n * p["sustained_s"][w] for w, n in calls.items()}
        fractions = {w: t / sum(spent.values()) for w, t in spent.items()}
        mixes[name] = {"fractions": fractions, "measured_mhz": measured[name]["sm_mhz"],
                       "power_w": measured[name]["power_w"], "iteration_s": p["iteration_s"],
                       "burst_sum_s": burst_sum, "energy_bound_s": energy_bound,
                       "energy_roofline_error": max(burst_sum, energy_bound) / p["iteration_s"] - 1,
                       # each workload's rate in the settled mix over its burst rate
                       "rate_vs_burst": {w: p["burst_s"][w] / p["sustained_s"][w] for w in calls},
                       **{f"predicted_mhz_alpha{a:g}": mix_clock(fractions, measured, idle_w, cap, boost, a)
                          for a in ALPHAS}}
    result = {"device": data["device"], "power_limit_w": cap, "idle_w": idle_w, "boost_mhz": boost,
              "alone": {w: measured[w] for w in SINGLE}, "rates": rates, "energy_per_unit_j": energy,
              "mixes": mixes}
    titan = _titan_step(measured, idle_w, cap, boost) if "H100" in data["device"] else None  # where it ran
    if titan:
        result["titan_step"] = titan
    return result


def _titan_step(alone: dict[str, dict[str, float]], idle_w: float, cap: float, boost: float) -> dict[str, Any] | None:
    """The torchtitan 8B step's clock from its measured kernel time per category (GEMMs, attention
    as FlashAttention-2, everything else as memory-bound), against the clock sampled beside it; and
    the clock the same mix would hold under a 500 W cap (the published runs')."""
    step, smi = RESULTS / "titan_reproduce.json", RESULTS / "titan_reproduce_smi.csv"
    if not (step.exists() and smi.exists()):
        return None
    rows = {r["variant"]: r for r in json.loads(step.read_text())["rows"] if "variant" in r}
    samples = [s for s in read_smi(smi) if s["power_w"] > 300]  # the step's busy samples
    out = {"measured_mhz": statistics.median(s["sm_mhz"] for s in samples)}
    for variant, row in rows.items():
        cats = row["categories_ms"]
        gemm, attn = cats.get("gemm", 0.0), cats.get("attention", 0.0)
        rest = sum(cats.values()) - gemm - attn
        fractions = {"gemm": gemm, "flash2": attn, "memory": rest}
        total = sum(fractions.values())
        fractions = {w: t / total for w, t in fractions.items()}
        out[variant] = {"fractions": fractions, **{
            f"predicted_mhz_alpha{a:g}": mix_clock(fractions, alone, idle_w, cap, boost, a) for a in ALPHAS},
            **{f"predicted_500w_mhz_alpha{a:g}": mix_clock(fractions, alone, idle_w, 500.0, boost, a) for a in ALPHAS}}
    return out


def markdown(r: dict[str, Any], command: str) -> str:
    lines = [f"# SM clocks under the power cap ({r['device']}, {r['power_limit_w']:.0f} W)", "",
             f"    {command}", "",
             f"Idle {r['idle_w']:.0f} W; highest clock sampled {r['boost_mhz']:.0f} MHz.", "",
             "| workload alone | sustained MHz | power W | power-capped samples | burst rate | sustained rate |",
             "|---|---:|---:|---:|---:|---:|"]
    for w, c in r["alone"].items():
        rate = r["rates"][w]
        lines.append(f"| {w} | {c['sm_mhz']:.0f} | {c['power_w']:.0f} | {c['power_capped']:.0%} | "
                     f"{rate['burst']:.0f} {rate['unit']} | {rate['sustained']:.0f} {rate['unit']} |")
    lines += ["", "| mix (time fractions) | measured MHz | power W | predicted, alpha 3 | alpha 2 | rate in the mix / "
              "burst |", "|---|---:|---:|---:|---:|---|"]
    for name, m in r["mixes"].items():
        fr = ", ".join(f"{w} {x:.0%}" for w, x in m["fractions"].items())
        ratio = ", ".join(f"{w} {x:.2f}" for w, x in m["rate_vs_burst"].items())
        lines.append(f"| {name} ({fr}) | {m['measured_mhz']:.0f} | {m['power_w']:.0f} | "
                     f"{m['predicted_mhz_alpha3']:.0f} | {m['predicted_mhz_alpha2']:.0f} | {ratio} |")
    e = r["energy_per_unit_j"]
    lines += ["", "Energy roofline: each workload alone at the cap spends "
              + ", ".join(f"{w} {e[w] * (1e12 if w != 'memory' else 1e9):.2f} {'pJ/FLOP' if w != 'memory' else 'nJ/B'}"
                          for w in e)
              + " above idle; a loop lasts the longer of its calls at burst rates and its energy over "
              "(cap - idle).", "", "| mix | measured ms | burst sum | energy bound | roofline error |",
              "|---|---:|---:|---:|---:|"]
    for name, m in r["mixes"].items():
        lines.append(f"| {name} | {m['iteration_s'] * 1e3:.2f} | {m['burst_sum_s'] * 1e3:.2f} | "
                     f"{m['energy_bound_s'] * 1e3:.2f} | {m['energy_roofline_error']:+.1%} |")
    t = r.get("titan_step")
    if t:
        lines += ["", f"torchtitan Llama 3.1 8B step (`titan_reproduce.md`), clock sampled beside it: median "
                  f"{t['measured_mhz']:.0f} MHz.", "",
                  "| variant (kernel time fractions) | predicted MHz, alpha 3 | alpha 2 | 500 W, alpha 3 | alpha 2 |",
                  "|---|---:|---:|---:|---:|"]
        for variant in ("eager", "compiled"):
            if variant in t:
                v = t[variant]
                fr = ", ".join(f"{w} {x:.0%}" for w, x in v["fractions"].items())
                lines.append(f"| {variant} ({fr}) | {v['predicted_mhz_alpha3']:.0f} | "
                             f"{v['predicted_mhz_alpha2']:.0f} | {v['predicted_500w_mhz_alpha3']:.0f} | "
                             f"{v['predicted_500w_mhz_alpha2']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--measure", action="store_true", help="run on this GPU (writes --out and its _smi.csv)")
    mode.add_argument("--compare", metavar="JSON", help="check the power model against a --measure result")
    parser.add_argument("--out", help="--measure: the JSON to write")
    parser.add_argument("--seconds", type=float, default=12.0, help="sustained run per workload")
    parser.add_argument("--idle", type=float, default=4.0, help="idle pause before each workload")
    args = parser.parse_args()
    if args.measure:
        if not args.out:
            parser.error("--measure needs --out")
        result = measure(args)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    result = compare(Path(args.compare))
    out = Path(args.compare)
    out.with_name(out.stem + "_model.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result, "python " + " ".join(sys.argv))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
