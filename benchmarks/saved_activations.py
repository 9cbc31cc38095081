"""What autograd keeps for backward per block of the reference GPT, against the cost model.

Runs one forward of ``galvatron.models.GPT`` (Llama-like: RMSNorm, RoPE, SwiGLU, separate q/k/v
projections) under bf16 autocast, as the native runtime runs a one-rank plan, and records every
tensor a block saves (``torch.autograd.graph.saved_tensors_hooks``), by storage, with its shape and
dtype; a tensor with a sequence or token dimension is an activation, the rest are autocast's 16-bit
weight copies (the cost model counts those with the parameters): pick a sequence and batch whose
product is no weight dimension. Prints the bytes per token of the second block beside
``strategies.cost.layer._activation`` for the native stack (``CostOptions`` from the native
backend's capabilities).

    python benchmarks/saved_activations.py [--device cuda] [--hidden 1024] [--seq 384] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch


def saved_per_block(device: str, hidden: int, heads: int, ffn: int, seq: int, batch: int,
                    fsdp: bool = False, norm: str = "rmsnorm") -> list[dict[str, Any]]:
    """Per block, every saved tensor (shape, dtype, bytes), counted once per storage. ``fsdp``: each
    block an FSDP2 unit with 16-bit parameters, as the native runtime runs ZeRO-2/3 (on a one-rank
    mesh: the sharding does not change what autograd keeps)."""
    from galvatron.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=2, hidden=hidden, heads=heads, ffn_hidden=ffn, vocab=256, seq_len=seq,
                          activation="swiglu", norm=norm)).to(device)  # type: ignore[arg-type]
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    if fsdp:
        _fully_shard(model, blocks, device)
    current: dict[str, Any] = {"i": None}
    store: list[dict[int, tuple]] = [{} for _ in blocks]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__("i", i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__("i", None))
    token_dims = {seq, batch * seq}

    def pack(t: torch.Tensor) -> torch.Tensor:
        i = current["i"]
        if i is not None and token_dims & set(t.shape):
            storage = t.untyped_storage()
            store[i][storage.data_ptr()] = (tuple(t.shape), str(t.dtype).replace("torch.", ""), storage.nbytes())
        return t

    x = torch.randint(0, 256, (batch, seq), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=torch.bfloat16):
        model(x)
    return [{"tensors": sorted(d.values()), "bytes": sum(v[2] for v in d.values())} for d in store]


def _fully_shard(model: torch.nn.Module, blocks: list[torch.nn.Module], device: str) -> None:
    """The native runtime's ZeRO-2 wrapping (``runtime.data.apply_fsdp``, bf16 compute) of each block,
    the rest under an FSDP2 root, on a one-rank process group bound to 127.0.0.1."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from galvatron.plan import DType
    from galvatron.runtime.data import apply_fsdp, apply_fsdp_root

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.split(":")[0], (1,))
    apply_fsdp(blocks, mesh, reshard_after_forward=False, offload=False, dtype=DType.BF16)
    apply_fsdp([model.tok_embeddings], mesh, reshard_after_forward=False, offload=False, dtype=DType.BF16)
    apply_fsdp_root(model, mesh)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--seq", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--fsdp", action="store_true",
                        help="wrap each block in FSDP2 with bf16 parameters, as the native runtime runs ZeRO-2/3")
    parser.add_argument("--norm", choices=["rmsnorm", "layernorm"], default="rmsnorm")
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args()
    from galvatron.strategies.cost import CostOptions
    from galvatron.strategies.cost.layer import LayerContext, _activation
    from galvatron.strategies.cost.model import as_perf
    from galvatron.strategies.hardware import load_cluster

    from galvatron.backends import capabilities
    from galvatron.plan import DType, LayerStrategy, Recompute
    from galvatron.spec import ModelSpec

    blocks = saved_per_block(args.device, args.hidden, args.heads, args.ffn, args.seq, args.batch, args.fsdp, args.norm)
    spec = ModelSpec.from_config({"name": "probe", "layers": 2, "hidden": args.hidden, "heads": args.heads,
                                  "ffn_hidden": args.ffn, "vocab": 256, "seq_len": args.seq, "activation": "swiglu",
                                  "norm": args.norm})
    options = CostOptions(**capabilities("native").cost_options(args.device != "cpu"))
    ctx = LayerContext(perf=as_perf(load_cluster("8xH100")), options=options, dtype=DType.BF16, seq_len=args.seq,
                       causal=True, micro_batch=args.batch, stage_devices=1, micro_batches=1)
    tokens = args.batch * args.seq
    # FSDP2 on one rank stands for ZeRO-2 over replicas: the model is asked for dp2 ZeRO-2 (per token)
    strategy = LayerStrategy(dp=2, zero=2) if args.fsdp else LayerStrategy()
    model_per_token = _activation(ctx, spec.blocks[1], strategy, Recompute.NONE)
    measured = blocks[1]["bytes"] / tokens
    result = {"command": "python " + " ".join(sys.argv), "device": args.device, "torch": torch.__version__,
              "hidden": args.hidden, "fsdp": args.fsdp, "norm": args.norm, "measured_bytes_per_token": measured,
              "model_bytes_per_token": model_per_token,
              "saved": blocks[1]["tensors"]}
    print(f"block 1: {measured:.0f} bytes/token kept ({measured / args.hidden:.1f} h), model {model_per_token:.0f} "
          f"({model_per_token / args.hidden:.1f} h): {measured / model_per_token - 1:+.1%}")
    for shape, dtype, nbytes in blocks[1]["tensors"]:
        print(f"  {shape!s:24} {dtype:9} {nbytes / tokens / args.hidden:6.2f} h")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
