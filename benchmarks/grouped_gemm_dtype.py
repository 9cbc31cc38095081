"""Grouped GEMMs (``torch.nn.functional.grouped_mm``, else ``torch._grouped_mm``) at a MoE block's
shapes, fp32 against bf16 operands, forward and backward, with the dense ``torch.mm`` of the same
FLOPs beside them. Hugging Face's ``grouped_mm`` experts cast their input to the weights' dtype and
call the grouped GEMM outside autocast, so over fp32 parameters the experts' GEMMs run in fp32.

    python benchmarks/grouped_gemm_dtype.py --out benchmarks/results/grouped_gemm_dtype.json   # GPU

Default shape: Mixtral 8x7B (hidden 4096, expert width 14336, 8 experts, top-2) at 4096 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _grouped(x: Any, w: Any, offs: Any) -> Any:
    import torch

    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn(x, w, offs=offs) if fn is not None else torch._grouped_mm(x, w, offs=offs)


def _time(fn: Any, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def measure(tokens: int, hidden: int, width: int, experts: int, top_k: int, repeats: int) -> list[dict[str, Any]]:
    import torch

    rows = tokens * top_k
    offs = torch.arange(1, experts + 1, device="cuda", dtype=torch.int32) * (rows // experts)
    flops = 2 * rows * hidden * width  # one projection (hidden -> width), forward
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(experts, hidden, width, device="cuda", dtype=dtype, requires_grad=True)
        grad = torch.randn(rows, width, device="cuda", dtype=dtype)
        fwd = _time(lambda x=x, w=w: _grouped(x, w, offs), repeats)
        both = _time(lambda x=x, w=w, grad=grad: _grouped(x, w, offs).backward(grad), repeats)
        a = torch.randn(rows, hidden, device="cuda", dtype=dtype)
        b = torch.randn(hidden, width, device="cuda", dtype=dtype)
        dense = _time(lambda a=a, b=b: torch.mm(a, b), repeats)
        out.append({"dtype": str(dtype).removeprefix("torch."), "grouped_fwd_s": fwd, "grouped_fwd_bwd_s": both,
                    "grouped_fwd_tflops": flops / fwd / 1e12, "grouped_fwd_bwd_tflops": 3 * flops / both / 1e12,
                    "dense_mm_s": dense, "dense_mm_tflops": flops / dense / 1e12,
                    "allow_tf32": torch.backends.cuda.matmul.allow_tf32})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--width", type=int, default=14336, help="expert FFN width")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    rows = measure(args.tokens, args.hidden, args.width, args.experts, args.top_k, args.repeats)
    command = " ".join(["python", "benchmarks/grouped_gemm_dtype.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"command": command, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {"tokens": args.tokens, "hidden": args.hidden, "width": args.width, "experts": args.experts,
                        "top_k": args.top_k}, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
