"""Whether a GEMM's power, and so its clock under the power cap, depends on its data: the same bf16
GEMM looped for a few seconds over random inputs and over zeros, device time per call and the SM
clock and power sampled beside it (``nvidia-smi``).

    python benchmarks/gemm_data_power.py --out $OUT/gemm_data_power.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch


def _sample() -> tuple[float, float]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout.split(",")
    return float(out[0]), float(out[1])


def run(kind: str, n: int, seconds: float) -> dict:
    """Loop ``n``-cubed GEMMs over ``kind`` data (random or zeros) for ``seconds``; the median of the
    last half's samples."""
    make = torch.randn if kind == "random" else torch.zeros
    a, b = (make(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    start, samples, rates = time.perf_counter(), [], []
    while time.perf_counter() - start < seconds:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(20):
            torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        rates.append(2 * n**3 * 20 / (begin.elapsed_time(end) * 1e-3) / 1e12)
        samples.append(_sample())
    half = len(rates) // 2
    return {"data": kind, "n": n, "tflops": statistics.median(rates[half:]),
            "sm_mhz": statistics.median(s[0] for s in samples[half:]),
            "power_w": statistics.median(s[1] for s in samples[half:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    rows = []
    for kind in ("random", "zeros", "random"):
        rows.append(run(kind, args.n, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"command": f"python benchmarks/gemm_data_power.py --out {args.out}", "device":
                   torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
