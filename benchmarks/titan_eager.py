"""The ``eager`` stack of the cost model against a torchtitan-style Llama step on one GPU.

torchtitan (2024) writes Llama with its own composite ``RMSNorm`` (``x.float()``, ``pow``, ``mean``,
``rsqrt``, ``type_as``, ``* weight``), complex rotary embeddings (``view_as_complex(x.float()) *
freqs_cis``), ``repeat_kv`` copies for GQA, SwiGLU, SDPA, and trains it under FSDP2 with bf16
parameters for compute (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``) and
``F.cross_entropy(logits.float(), y)``. This builds that model (Llama 3.2 1B's shape with an untied
head), wraps every block and the whole model with ``fully_shard`` on a one-rank process group, and
times training steps (wall and device kernel time by category, as ``step_breakdown`` does) next to
``cost_plan`` with ``CostOptions(elementwise="eager", wgrad_fp32_accumulation=False)`` for the same plan.

    python benchmarks/titan_eager.py --out benchmarks/results/titan_eager.json
    python benchmarks/titan_eager.py --compare benchmarks/results/titan_eager.json    # no GPU: the model's terms
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from step_breakdown import categories, profiled_kernels
from torch.profiler import ProfilerActivity, profile


@dataclasses.dataclass(frozen=True)
class Shape:
    """A torchtitan Llama's shape (torchtitan ``ModelArgs``: ``ffn`` already rounded to ``multiple_of``)."""

    dim: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 8192
    vocab: int = 128256
    seq: int = 2048
    rope_theta: float = 500000.0


LLAMA_1B = Shape()  # Llama 3.2 1B's shape, untied head
LLAMA3_8B = Shape(dim=4096, layers=32, ffn=14336, seq=8192)  # Llama 3.1 8B (torchtitan llama3_8b.toml)
BATCH = 2


def model_spec(shape: Shape) -> object:
    """The cost model's ``ModelSpec`` of a torchtitan Llama of this shape."""
    from galvatron.spec import ModelSpec

    return ModelSpec.from_config({"name": "titan-llama", "layers": shape.layers, "hidden": shape.dim,
                                  "heads": shape.heads, "kv_heads": shape.kv_heads, "ffn_hidden": shape.ffn,
                                  "vocab": shape.vocab, "seq_len": shape.seq, "activation": "swiglu",
                                  "norm": "rmsnorm", "bias": False, "position": "rope"})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        return (x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * freqs).flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self, shape: Shape = LLAMA_1B) -> None:
        super().__init__()
        d, hd, self.heads, self.kv_heads = shape.dim, shape.dim // shape.heads, shape.heads, shape.kv_heads
        self.wq, self.wk = nn.Linear(d, shape.heads * hd, bias=False), nn.Linear(d, shape.kv_heads * hd, bias=False)
        self.wv, self.wo = nn.Linear(d, shape.kv_heads * hd, bias=False), nn.Linear(shape.heads * hd, d, bias=False)
        self.w1, self.w2 = nn.Linear(d, shape.ffn, bias=False), nn.Linear(shape.ffn, d, bias=False)
        self.w3 = nn.Linear(d, shape.ffn, bias=False)
        self.attention_norm, self.ffn_norm = RMSNorm(d), RMSNorm(d)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.attention_norm(x)
        q = rope(self.wq(h).view(b, s, self.heads, -1), freqs)
        k = rope(self.wk(h).view(b, s, self.kv_heads, -1), freqs)
        v = self.wv(h).view(b, s, self.kv_heads, -1)
        rep = self.heads // self.kv_heads  # repeat_kv
        k = k[:, :, :, None].expand(b, s, self.kv_heads, rep, k.shape[-1]).reshape(b, s, self.heads, -1)
        v = v[:, :, :, None].expand(b, s, self.kv_heads, rep, v.shape[-1]).reshape(b, s, self.heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(out.transpose(1, 2).reshape(b, s, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self, shape: Shape = LLAMA_1B) -> None:
        super().__init__()
        self.shape = shape
        self.tok_embeddings = nn.Embedding(shape.vocab, shape.dim)
        self.layers = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.norm, self.output = RMSNorm(shape.dim), nn.Linear(shape.dim, shape.vocab, bias=False)
        self.register_buffer("freqs", self.rope_table(), persistent=False)

    def rope_table(self) -> torch.Tensor:
        """The complex rotary table ``(1, seq, 1, head_dim / 2)`` (torchtitan ``precompute_freqs_cis``)."""
        s = self.shape
        hd = s.dim // s.heads
        angles = torch.outer(torch.arange(s.seq).float(), 1.0 / s.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        return torch.polar(torch.ones_like(angles), angles)[None, :, None, :]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.freqs)
        return self.output(self.norm(x))


def predicted_terms(plan: object, spec: object, cluster: object, options: object) -> dict[str, float]:
    """The cost model's step (ms) in total and by term: GEMMs, attention and the rest, each term's
    share found by costing the step without it."""
    from galvatron.strategies.cost import DatasheetPerf, cost_plan

    @dataclasses.dataclass(frozen=True)
    class Without(DatasheetPerf):
        term: str = ""

        def gemm_time(self, *a, **k):
            return 0.0 if self.term == "gemm" else super().gemm_time(*a, **k)

        def attention_time(self, *a, **k):
            return 0.0 if self.term == "attention" else super().attention_time(*a, **k)

    def ms(term: str = "") -> float:
        return cost_plan(plan, spec, Without(cluster, term=term), options).step_time_s * 1e3

    total = ms()
    gemm, attention = total - ms("gemm"), total - ms("attention")
    return {"total": total, "gemm": gemm, "attention": attention, "rest": total - gemm - attention}


def measured_terms(categories_ms: dict[str, float]) -> dict[str, float]:
    """A profiled step's kernel ms by the same terms as :func:`predicted_terms`."""
    gemm, attention = categories_ms.get("gemm", 0.0), categories_ms.get("attention", 0.0)
    total = sum(categories_ms.values())
    return {"total": total, "gemm": gemm, "attention": attention, "rest": total - gemm - attention}


def compare(measured: Path) -> int:
    """The eager stack's prediction for the measured step, in total and by term."""
    from galvatron.strategies.cost import CostOptions
    from galvatron.strategies.hardware import load_cluster

    from galvatron.plan import Plan

    data = json.loads(measured.read_text())
    plan = Plan.uniform(LLAMA_1B.layers, global_batch_size=BATCH, num_micro_batches=1)
    options = CostOptions(elementwise="eager", wgrad_fp32_accumulation=False)
    cluster = load_cluster({"gpu": "H100-SXM", "gpus_per_node": 1, "nodes": 1, "name": "one"})
    p, m = predicted_terms(plan, model_spec(LLAMA_1B), cluster, options), measured_terms(data["categories_ms"])
    print(f"measured: wall {data['wall_ms']:.1f} ms, kernels {m['total']:.1f} (GEMMs {m['gemm']:.1f}, "
          f"attention {m['attention']:.1f}, the rest {m['rest']:.1f})")
    print(f"predicted: {p['total']:.1f} ms (GEMMs {p['gemm']:.1f}, attention {p['attention']:.1f}, the rest "
          f"{p['rest']:.1f}); {p['total'] / data['wall_ms'] - 1:+.1%} of the wall time")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON path (measure, needs CUDA)")
    parser.add_argument("--compare", type=Path, help="a JSON written by --out: print the model's terms beside it")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    if not args.out:
        parser.error("--out or --compare is required")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    model = Llama().cuda()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, LLAMA_1B.vocab, (BATCH, LLAMA_1B.seq + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    kernels, ops = profiled_kernels(prof, 1)
    cats = categories(kernels, 1)
    result = {"command": f"python benchmarks/titan_eager.py --out {args.out}", "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": {**dataclasses.asdict(LLAMA_1B), "batch": BATCH},
              "wall_ms": sorted(walls)[len(walls) // 2] * 1e3, "kernel_ms": sum(cats.values()),
              "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
              "ops": [{"op": k, "ms": v[0], "calls": v[2]}
                      for k, v in sorted(ops.items(), key=lambda kv: -kv[1][0])[:60]]}
    print(json.dumps({k: v for k, v in result.items() if k != "ops"}, indent=1), flush=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
