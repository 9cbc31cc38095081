"""GEMMs split into row chunks, as Transformer Engine's ring-exchange TP overlap runs them, against the whole GEMM.

Userbuffers' ring exchange (``tp_comm_overlap``) computes a column-parallel layer's forward as ``tp`` GEMMs of
``1/tp`` of the (all-gathered) rows, one per chunk as it arrives, and a row-parallel layer's forward and input
gradient likewise, one per chunk it sends on. Smaller GEMMs fill fewer SMs and pay their launch ``tp`` times; this
script times, on one GPU, ``tp`` back-to-back chunk GEMMs and the whole GEMM for the tensor-parallel shapes of
the published runs in ``benchmarks/fidelity_dgxc.py`` and ``fidelity_fp8.py`` (bf16 ``torch.mm`` and fp8
``torch._scaled_mm``, device time by CUDA events, median of alternating blocks), for the cost model's
``DatasheetPerf.gemm_time`` to be checked against.

    python benchmarks/gemm_chunks.py --out benchmarks/results/gemm_chunks.json     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from sustained_clocks import _time_calls  # CUDA-event time per call

# (label, rows m on the rank, outputs n, inputs k, tp): forward GEMMs of TP-sharded blocks
SHAPES = [
    ("llama3-70b tp4 cp2 qkv", 4096, 2560, 8192, 4), ("llama3-70b tp4 cp2 out", 4096, 8192, 2048, 4),
    ("llama3-70b tp4 cp2 gate+up", 4096, 14336, 8192, 4), ("llama3-70b tp4 cp2 down", 4096, 8192, 7168, 4),
    ("405b tp8 cp2 qkv", 4096, 2304, 16384, 8), ("405b tp8 cp2 out", 4096, 16384, 2048, 8),
    ("405b tp8 cp2 gate+up", 4096, 13312, 16384, 8), ("405b tp8 cp2 down", 4096, 16384, 6656, 8),
    ("nemotron4-15b tp4 mbs4 qkv", 16384, 2048, 6144, 4), ("nemotron4-15b tp4 mbs4 out", 16384, 6144, 1536, 4),
    ("nemotron4-15b tp4 mbs4 fc1", 16384, 6144, 6144, 4), ("nemotron4-15b tp4 mbs4 fc2", 16384, 6144, 6144, 4),
    ("gpt3-175b tp4 qkv", 2048, 9216, 12288, 4), ("gpt3-175b tp4 fc1", 2048, 12288, 12288, 4),
    ("gpt3-175b tp4 fc2", 2048, 12288, 12288, 4), ("nemotron4-340b tp8 fc1", 4096, 9216, 18432, 8),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gemm_chunks: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    one = torch.ones((), device=dev)
    rows = []
    for label, m, n, k, tp in SHAPES:
        for dtype in ("bf16", "fp8"):
            a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            if dtype == "fp8":
                a, b = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            bt = b.t()  # column-major, as _scaled_mm wants its second operand

            def mm(x, y=bt, fp8=dtype == "fp8"):
                return torch._scaled_mm(x, y, one, one, out_dtype=torch.bfloat16) if fp8 else torch.mm(x, y)
            pieces = list(a.chunk(tp, dim=0))
            runs = {"whole": lambda a=a, mm=mm: mm(a),
                    "chunks": lambda pieces=pieces, mm=mm: [mm(p) for p in pieces]}
            for fn in runs.values():
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            times: dict[str, list[float]] = {key: [] for key in runs}
            for _ in range(args.blocks):
                for key, fn in runs.items():
                    times[key].append(_time_calls(fn, args.iters))
            whole, chunks = statistics.median(times["whole"]), statistics.median(times["chunks"])
            row = {"gemm": label, "dtype": dtype, "m": m, "n": n, "k": k, "tp": tp, "whole_s": whole,
                   "chunks_s": chunks, "chunks_over_whole": chunks / whole,
                   "whole_tflops": 2.0 * m * n * k / whole / 1e12}
            rows.append(row)
            print(f"{label:28} {dtype:4} whole {whole * 1e3:7.3f} ms ({row['whole_tflops']:6.0f} TFLOP/s)  "
                  f"{tp} chunks {chunks * 1e3:7.3f} ms  x{row['chunks_over_whole']:.3f}")
    result = {"command": "python benchmarks/gemm_chunks.py --out ...", "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemms": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
