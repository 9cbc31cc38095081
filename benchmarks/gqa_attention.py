"""GQA attention on the GPU: which fused kernel ``F.scaled_dot_product_attention`` takes, and what
it keeps for backward, with ``enable_gqa=True`` (K and V with their own fewer heads, as Hugging Face
models call it) and with K and V copied to every query head first (``repeat_interleave``: the
reference GPT, torchtitan's ``repeat_kv``). Against the fake-tensor trace's count of the same forward
(``galvatron.profiler.memory_trace.cuda_kernels``), which the memory tracer and ``ModelSpec.from_module``
rely on.

    python benchmarks/gqa_attention.py --out benchmarks/results/gqa_attention.json   # GPU; --trace: CPU only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHAPE = {"batch": 1, "seq": 8192, "heads": 32, "kv_heads": 8, "head_dim": 128}  # Llama 3 8B's attention
MIB = 1 << 20


def _inputs(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, h, kv, d = (SHAPE[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    q = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kv, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kv, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    return q, k, v


def _forward(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if variant == "enable_gqa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1),
                                          is_causal=True)


def measure(variant: str) -> dict[str, Any]:
    """Kernels of one forward and backward, bytes allocated and kept by the forward (its output
    included), and the median forward + backward time of 20."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _inputs("cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = _forward(variant, q, k, v)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    out.sum().backward()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _forward(variant, q, k, v).sum().backward()
        torch.cuda.synchronize()
    marks = ("attention", "fmha", "flash", "cudnn", "sdpa")
    kernels = sorted({e.name for e in prof.events()
                      if e.device_type.name == "CUDA" and any(m in e.name.lower() for m in marks)})
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _forward(variant, q, k, v).sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"kept_mib": kept / MIB, "kernels": kernels, "fwd_bwd_ms": sorted(times)[len(times) // 2] * 1e3}


def trace(variant: str) -> dict[str, Any]:
    """The same forward on fake CPU tensors under ``cuda_kernels()``: bytes it leaves allocated."""
    from galvatron.profiler.memory_trace import AllocationTracer, cuda_kernels
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    with fake_mode:
        q, k, v = _inputs("cpu")
    with fake_mode, cuda_kernels("cudnn"), AllocationTracer(fake_mode) as tracer:
        out = _forward(variant, q, k, v)
    kept = tracer.live_bytes()  # while the output lives (the log follows releases after the block too)
    del out
    return {"traced_kept_mib": kept / MIB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", action="store_true", help="only the fake-tensor trace (no GPU)")
    parser.add_argument("--out", type=Path, help="write the rows here (JSON)")
    args = parser.parse_args(argv)
    rows = []
    for variant in ("enable_gqa", "repeat_interleave"):
        row: dict[str, Any] = {"variant": variant, **trace(variant)}
        if not args.trace:
            row.update(measure(variant), device=torch.cuda.get_device_name(), torch=torch.__version__)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        command = " ".join(["python", "benchmarks/gqa_attention.py", *(argv if argv is not None else sys.argv[1:])])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "shape": SHAPE, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
