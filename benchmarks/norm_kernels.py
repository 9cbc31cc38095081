"""Which kernels a norm launches on this GPU and how long they take (the eager cost model's norm terms).

``strategies.cost.eager`` counts Llama's RMSNorm as composite ops (cast, pow, mean, rsqrt, mul, cast,
weight mul: 7 kernels forward) and ``layer_norm`` as one kernel each way. This times, with
``torch.profiler`` (device kernels only), ``F.rms_norm``, the composite RMSNorm torchtitan writes out,
and ``F.layer_norm``, in bf16 and fp32, forward and forward + backward, next to a device-to-device
copy (the achievable HBM rate), and lists the kernels.

    python benchmarks/norm_kernels.py --out benchmarks/results/norm_kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

from attention_rates import _kernel_seconds

TOKENS, HIDDEN = 16384, 4096


def _composite_rms(x, w, eps: float = 1e-6):
    """torchtitan's RMSNorm (models/norms.py, 2024): the norm in fp32, cast back, times the weight."""
    import torch

    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    src = torch.randn(TOKENS * HIDDEN * 8, device="cuda")
    dst = torch.empty_like(src)
    copy_s, _ = _kernel_seconds(lambda: dst.copy_(src), 10)
    copy_gbps = 2 * src.numel() * 4 / copy_s / 1e9
    print(f"device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(HIDDEN, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn_like(x)
        cases = {"F.rms_norm": functools.partial(F.rms_norm, x, (HIDDEN,), w, 1e-6),
                 "composite rms_norm": functools.partial(_composite_rms, x, w),
                 "F.layer_norm": functools.partial(F.layer_norm, x, (HIDDEN,), w, None, 1e-5)}
        for name, fn in cases.items():
            def both(fn=fn, x=x, w=w, g=g) -> None:
                torch.autograd.grad(fn(), (x, w), g)

            fwd, _ = _kernel_seconds(fn, 20)
            total, _ = _kernel_seconds(both, 20)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                both()
                torch.cuda.synchronize()
            launched = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            io = TOKENS * HIDDEN * x.element_size()
            rows.append({"op": name, "dtype": str(dtype).removeprefix("torch."), "forward_s": fwd,
                         "backward_s": total - fwd, "kernels_launched": len(launched), "kernels": launched,
                         "forward_gbps_2io": 2 * io / fwd / 1e9, "backward_gbps_3io": 3 * io / (total - fwd) / 1e9})
            r = rows[-1]
            print(f"{name} {r['dtype']}: forward {fwd * 1e6:.0f} us ({r['forward_gbps_2io']:.0f} GB/s for 2 passes),"
                  f" backward {(total - fwd) * 1e6:.0f} us, {len(launched)} kernels fwd+bwd", flush=True)
    args.out.write_text(json.dumps({"command": f"python benchmarks/norm_kernels.py --out {args.out}",
                                    "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                    "torch": torch.__version__, "copy_gbps": copy_gbps, "tokens": TOKENS,
                                    "hidden": HIDDEN, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
