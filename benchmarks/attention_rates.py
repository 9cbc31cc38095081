"""Fused attention kernels on one GPU: measured device time over a grid of shapes, and the cost model's
attention term against it.

Two steps. ``measure`` (needs CUDA) runs ``F.scaled_dot_product_attention`` in bf16 with q/k/v laid
out as attention modules hand them over ((B, S, H, D) memory viewed as (B, H, S, D)), forward and
forward + backward, under each fused backend PyTorch has on the GPU (``cudnn``: cuDNN's fused
attention, PyTorch's default on Hopper from torch 2.10 with cuDNN >= 9.15; ``flash``: the
FlashAttention-2 kernels PyTorch bundles, its default on Ampere and, until then, on Hopper), and
records the summed time of the CUDA kernels each call launched (``torch.profiler``; host dispatch
excluded, every kernel the call needs included: layout copies, ``repeat_interleave`` for GQA,
zero-fills of gradient accumulators). ``compare`` (no GPU) costs the same shapes with
``DatasheetPerf.attention_time`` for the hardware-database GPU and prints the errors.

FLOPs as the cost model counts them (FlashAttention-2 convention): forward ``4 B S^2 H D`` (half of
it under a causal mask), backward 2.5x.

    python benchmarks/attention_rates.py measure --out benchmarks/results/attention_kernels.json
    python benchmarks/attention_rates.py compare benchmarks/results/attention_kernels.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

SEQS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
# (batch, heads, kv heads): 16, 64 and 256 (batch x heads), one GQA group of 4
HEADS = ((1, 16, 16), (2, 32, 32), (8, 32, 32), (2, 32, 8))
HEAD_DIMS = (64, 128)
NON_CAUSAL = ((2, 32, 32, 2048), (2, 32, 32, 8192))  # ring-attention blocks: (batch, heads, kv, seq)


KERNELS = {"cudnn": "cudnn", "flash": "flash2"}
"""Hardware-database kernel name of each SDPA backend."""


def grid() -> list[dict]:
    """The shapes ``measure`` times: causal over every length, head count and head dim, plus
    non-causal blocks."""
    shapes = [{"batch": b, "heads": h, "kv_heads": kv, "seq": s, "head_dim": d, "causal": True}
              for d in HEAD_DIMS for b, h, kv in HEADS for s in SEQS]
    shapes += [{"batch": b, "heads": h, "kv_heads": kv, "seq": s, "head_dim": d, "causal": False}
               for d in HEAD_DIMS for b, h, kv, s in NON_CAUSAL]
    return shapes


def flops(shape: dict) -> float:
    """Forward FLOPs the cost model counts for ``shape``."""
    f = 4.0 * shape["batch"] * shape["seq"] ** 2 * shape["heads"] * shape["head_dim"]
    return f / 2 if shape["causal"] else f


def _kernel_seconds(fn, iters: int) -> tuple[float, list[str]]:
    """Summed device time of the kernels ``fn`` launches, seconds per call, and the three longest kernels."""
    from gpu_breakdown import kernel_times

    ms, kernels = kernel_times(fn, iters)
    return ms * 1e-3, [n[:90] for n in sorted(kernels, key=kernels.get, reverse=True)[:3]]


def _sdpa(q, k, v, backend, causal: bool):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def measure(out: Path) -> int:
    import torch
    from torch.nn.attention import SDPBackend

    if not torch.cuda.is_available():
        print("measure needs a CUDA GPU", file=sys.stderr)
        return 2
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    rows = []
    start = time.perf_counter()
    for shape in grid():
        b, s, h, kv, d = (shape[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
        # (B, S, H, D) memory viewed as (B, H, S, D), as attention modules hand q/k/v over and get grads back
        q, k, v, grad = (torch.randn(b, s, n, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                         for n in (h, kv, kv, h))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        # ~0.1 s of kernels per profile (at ~400 TFLOP/s), 3 to 20 calls
        iters = max(3, min(20, int(0.1 / (3.5 * flops(shape) / 400e12))))
        for name, backend in backends.items():
            row = {**shape, "backend": name}
            forward = functools.partial(_sdpa, q, k, v, backend, shape["causal"])

            def both(forward=forward, q=q, k=k, v=v, grad=grad) -> None:
                torch.autograd.grad(forward(), (q, k, v), grad)  # no accumulation into .grad (an extra add)

            try:
                fwd, fwd_names = _kernel_seconds(forward, iters)
                total, names = _kernel_seconds(both, iters)
            except RuntimeError as e:  # a backend that does not take the shape
                row["error"] = str(e).splitlines()[0][:200]
                rows.append(row)
                print(f"{name} {shape}: {row['error']}", flush=True)
                continue
            row.update(forward_s=fwd, backward_s=total - fwd, forward_tflops=flops(shape) / fwd / 1e12,
                       backward_tflops=2.5 * flops(shape) / (total - fwd) / 1e12, forward_kernels=fwd_names,
                       kernels=names)
            rows.append(row)
            print(f"{name:5s} b{b} h{h} kv{kv} d{d} s{s} causal={shape['causal']}: forward "
                  f"{row['forward_tflops']:.0f} TFLOP/s ({fwd * 1e6:.0f} us), backward {row['backward_tflops']:.0f}"
                  f" ({(total - fwd) * 1e6:.0f} us)", flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    result = {"command": f"python benchmarks/attention_rates.py measure --out {out}",
              "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "seconds": time.perf_counter() - start, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def compare(measured: Path, gpu: str) -> int:
    from galvatron.strategies.cost import AttentionShape, DatasheetPerf
    from galvatron.strategies.hardware import load_cluster

    data = json.loads(measured.read_text())
    cluster = load_cluster({"gpu": gpu, "gpus_per_node": 1, "nodes": 1, "name": "one"})
    # these are short bursts: the entry's burst rates, without its in-step fraction
    perf = DatasheetPerf(dataclasses.replace(cluster, gpu=dataclasses.replace(cluster.gpu, attention_in_step=1.0)))
    errors: dict[str, list[float]] = {}
    print(f"{data['device']}, torch {data['torch']}; predicted with {gpu} (burst rates)\n")
    print("| backend | b x h (kv) | d | seq | causal | fwd TFLOP/s | bwd TFLOP/s | predicted fwd | bwd | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        if "error" in r:
            continue
        f = flops(r)
        shape = AttentionShape(r["batch"] * r["heads"], r["seq"], r["head_dim"], r["causal"])
        kernel = KERNELS[r["backend"]]
        pf, pb = perf.attention_time(f, False, shape, kernel), perf.attention_time(2.5 * f, True, shape, kernel)
        err = (pf + pb) / (r["forward_s"] + r["backward_s"]) - 1
        errors.setdefault(r["backend"], []).append(err)
        print(f"| {r['backend']} | {r['batch']}x{r['heads']} ({r['kv_heads']}) | {r['head_dim']} | {r['seq']} | "
              f"{r['causal']} | {r['forward_tflops']:.0f} | {r['backward_tflops']:.0f} | {f / pf / 1e12:.0f} | "
              f"{2.5 * f / pb / 1e12:.0f} | {err:+.1%} |")
    for backend, errs in errors.items():
        print(f"\n{backend}: predicted / measured - 1 (fwd + bwd) median {statistics.median(errs):+.1%}, "
              f"mean abs {statistics.mean(abs(e) for e in errs):.1%}, max abs {max(abs(e) for e in errs):.1%} "
              f"over {len(errs)} shapes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    m = sub.add_parser("measure", help="time the grid on this machine's GPU (CUDA)")
    m.add_argument("--out", type=Path, required=True, help="JSON path")
    c = sub.add_parser("compare", help="cost the measured shapes with the hardware database (no GPU)")
    c.add_argument("measured", type=Path, help="JSON written by measure")
    c.add_argument("--gpu", default="H100-SXM", help="hardware database entry to predict with")
    args = parser.parse_args(argv)
    return measure(args.out) if args.step == "measure" else compare(args.measured, args.gpu)


if __name__ == "__main__":
    sys.exit(main())
