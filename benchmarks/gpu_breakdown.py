"""Where a training step of the 2B reference GPT (d=4096, 8 layers, seq 4096, batch 2) spends its
time on one GPU, by pieces timed alone: attention forward+backward per SDPA backend, the fused AdamW
step over all parameters, the LM loss, and whether ``torch.compile`` keeps a forward that selects
the attention backend in one graph. Guides the runtime's choices (issue 10).

    python benchmarks/gpu_breakdown.py --out benchmarks/results/gpu_breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def one_gpu_benchmark(doc: str, argv: list[str] | None) -> tuple[argparse.Namespace, object] | None:
    """``--out`` and ``--gpu`` of a one-GPU benchmark that compares with the cost model: the parsed
    arguments and a ``DatasheetPerf`` for one GPU of that hardware-database entry, or None (with a
    message) without CUDA."""
    from galvatron.strategies.cost import DatasheetPerf
    from galvatron.strategies.hardware import load_cluster

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    parser.add_argument("--gpu", default="H100-SXM", help="hardware database entry to predict with")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return None
    return args, DatasheetPerf(load_cluster({"gpu": args.gpu, "gpus_per_node": 1, "nodes": 1, "name": "one"}))


def kernel_times(fn, iters: int = 10) -> tuple[float, dict[str, float]]:
    """Device time of the CUDA kernels (memsets and copies included) ``fn`` launches, milliseconds per
    call, and per kernel name: ``iters`` calls back to back under ``torch.profiler`` after one warm-up
    call. Unlike :func:`timed`, no host launch time and no idle gaps between calls are counted."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us() * 1e-3 / iters
    return sum(kernels.values()), kernels


def timed(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention(batch: int, heads: int, seq: int, head_dim: int) -> dict[str, float]:
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def step(backend=backend):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(grad)
        try:
            out[name] = timed(step)
        except RuntimeError as err:
            out[name] = f"unavailable: {str(err).splitlines()[0][:200]}"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            other = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out["cudnn_vs_flash_max_abs_diff"] = float((ref - other).abs().max())
    except RuntimeError:
        pass
    return out


def model_layout(batch: int, heads: int, seq: int, head_dim: int) -> dict[str, object]:
    """Which backends take q/k/v laid out as the reference GPT's attention makes them (projections
    viewed as (B, S, H, D) and transposed; q and k through RoPE, v not), and their times."""
    from galvatron.models.gpt import apply_rope, rope_cache

    hidden = heads * head_dim
    x = torch.randn(batch, seq, hidden, device="cuda", dtype=torch.bfloat16)
    q, k, v = (x.clone().requires_grad_().view(batch, seq, heads, head_dim) for _ in range(3))
    cos, sin = (t.to("cuda")[None, :, None] for t in rope_cache(seq, head_dim))
    out: dict[str, object] = {}
    layouts = {"model": lambda: (apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2),
                                 v.transpose(1, 2)),
               "contiguous": lambda: (apply_rope(q, cos, sin).transpose(1, 2).contiguous(),
                                      apply_rope(k, cos, sin).transpose(1, 2).contiguous(),
                                      v.transpose(1, 2).contiguous())}
    for layout, make in layouts.items():
        qq, kk, vv = make()
        out[f"{layout}_strides"] = [list(t.stride()) for t in (qq, kk, vv)]
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def step(backend=backend, qq=qq, kk=kk, vv=vv):
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                o.sum().backward(retain_graph=True)
            try:
                out[f"{layout}_{name}_ms"] = timed(step)
            except RuntimeError as err:
                out[f"{layout}_{name}_ms"] = f"unavailable: {str(err).splitlines()[0][:300]}"
    return out


def model_kernels(layers: int, hidden: int, heads: int, seq: int, batch: int, vocab: int) -> dict[str, object]:
    """The attention kernels a training step of the reference GPT launches, plain (bf16 autocast)
    and through ``galvatron.wrap`` (bf16 plan): names and CUDA milliseconds from the profiler."""
    import galvatron
    from galvatron.models import GPT, GPTConfig

    cfg = GPTConfig(vocab=vocab, seq_len=seq, layers=layers, hidden=hidden, heads=heads)
    plain = GPT(cfg).cuda()
    wrapped = galvatron.wrap(GPT(cfg).cuda(), plan=galvatron.Plan.uniform(layers, global_batch_size=batch,
                                                                          dtype="bf16"))
    tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
    result: dict[str, object] = {}
    for name, model, autocast in (("plain", plain, True), ("wrapped", wrapped, False)):
        def step(model=model, autocast=autocast) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = model(tokens)
            logits.float().logsumexp(-1).mean().backward()
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            key = e.key.lower()
            if any(w in key for w in ("flash", "fmha", "cudnn", "attention", "sdpa")):
                kernels[e.key[:120]] = round(getattr(e, "device_time_total", 0.0) / 1e3, 3)
        result[name] = kernels
    return result


def optimizer(params: int) -> float:
    p = torch.nn.Parameter(torch.randn(params, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    return timed(opt.step)


def loss(tokens: int, vocab: int) -> float:
    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,), device="cuda")

    def step() -> None:
        F.cross_entropy(logits.float(), target).backward()
    return timed(step)


def compiled_graphs() -> dict[str, int]:
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                return F.scaled_dot_product_attention(q.sin(), k, v, is_causal=True).cos()
    q = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    explained = torch._dynamo.explain(Attn())(q, q, q)
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    layers, hidden, heads, seq, batch, vocab = 8, 4096, 32, 4096, 2, 50304
    params = layers * 12 * hidden * hidden + 2 * vocab * hidden
    result = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "attention_fwd_bwd_ms_per_layer": attention(batch, heads, seq, hidden // heads),
        "model_kernels": model_kernels(2, hidden, heads, seq, batch, vocab),
        "model_layout_attention": model_layout(batch, heads, seq, hidden // heads),
        "fused_adamw_step_ms": optimizer(params),
        "lm_loss_fwd_bwd_ms": loss(batch * seq, vocab),
        "compile_with_sdpa_kernel": compiled_graphs(),
    }
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
