"""Megatron-Core backend against the native runtime on one GPU: the same GPT, the same weights,
the same batches, the same one-GPU plan; the losses must agree.

A small Megatron ``GPTModel`` (local layer spec, no Transformer Engine: RMSNorm, SwiGLU, RoPE,
GQA, no biases, no dropout) and the reference ``galvatron.models.GPT`` of the same shape start
from the same weights (copied into Megatron's fused ``linear_qkv`` / ``linear_fc1`` layouts), then
train ``--steps`` AdamW steps, once with ``wrap(GPT, plan)`` and once with
``wrap(MegatronModel, plan, backend="megatron")``, for an fp32 plan (TF32 off: the two must agree
to float32 rounding) and a bf16 plan (within bf16 tolerance). Writes JSON to ``--out``.

    python benchmarks/megatron_backend.py --out benchmarks/results/megatron_backend.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

BF16_RTOL = 2e-2
"""Largest relative loss difference accepted for bf16 (2^-7 = 0.8% per rounding, a few steps)."""
FP32_RTOL = 1e-4

WHEELS = ("megatron-core==0.16.1 (megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl), "
          "packaging>=24.2")


def _imports() -> None:
    """Fail in a second, naming what is missing, before any work."""
    try:
        import torch
    except ImportError as err:
        sys.exit(f"megatron_backend: torch is not installed ({err})")
    if not torch.cuda.is_available():
        sys.exit("megatron_backend: needs a CUDA GPU (Megatron-Core is GPU only)")
    try:
        import megatron.core  # noqa: F401
        from megatron.core.models.gpt import GPTModel  # noqa: F401
    except ImportError as err:
        sys.exit(f"megatron_backend: Megatron-Core does not import ({err}); install the wheels: {WHEELS}")
    try:
        import galvatron.backends.megatron  # noqa: F401
    except ImportError as err:
        sys.exit(f"megatron_backend: galvatron does not import ({err}); pip install -e . first")


def gpt_config(args: argparse.Namespace) -> Any:
    from galvatron.models.gpt import GPTConfig

    return GPTConfig(vocab=args.vocab, seq_len=args.seq, layers=args.layers, hidden=args.hidden, heads=args.heads,
                     kv_heads=args.kv_heads, ffn_hidden=args.ffn, activation="swiglu", norm="rmsnorm", bias=False,
                     position="rope")


def megatron_model(cfg: Any) -> Any:
    """A ``MegatronModel`` of ``cfg``'s shape: Megatron's config and a ``GPTModel`` builder."""
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from galvatron.backends.megatron import MegatronModel

    config = TransformerConfig(
        num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads, num_query_groups=cfg.kv_heads,
        ffn_hidden_size=cfg.ffn_hidden, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=torch.finfo(torch.float32).eps, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False)

    def build(config: Any, pre_process: bool, post_process: bool, vp_stage: int | None) -> Any:
        return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                        vocab_size=cfg.vocab, max_sequence_length=cfg.seq_len, pre_process=pre_process,
                        post_process=post_process, share_embeddings_and_output_weights=False,
                        position_embedding_type="rope", rotary_percent=1.0, vp_stage=vp_stage)

    return MegatronModel(config=config, build=build)


def megatron_state(gpt: Any) -> dict[str, Any]:
    """The reference GPT's weights under Megatron ``GPTModel`` names and layouts: ``linear_qkv``
    holds, per query group, its query heads then its key and its value head; ``linear_fc1`` is
    ``[gate; up]`` (Megatron's SwiGLU takes silu of the first half)."""
    import torch

    cfg = gpt.config
    d, groups = cfg.hidden // cfg.heads, cfg.kv_heads
    out = {"embedding.word_embeddings.weight": gpt.tok_embeddings.weight,
           "decoder.final_layernorm.weight": gpt.norm.weight, "output_layer.weight": gpt.head.weight}
    for i, block in enumerate(gpt.blocks):
        a, m, p = block.attn, block.mlp, f"decoder.layers.{i}."
        q = a.q_proj.weight.view(groups, cfg.heads // groups * d, -1)
        k, v = a.k_proj.weight.view(groups, d, -1), a.v_proj.weight.view(groups, d, -1)
        out |= {p + "input_layernorm.weight": block.attn_norm.weight,
                p + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, cfg.hidden),
                p + "self_attention.linear_proj.weight": a.o_proj.weight,
                p + "pre_mlp_layernorm.weight": block.mlp_norm.weight,
                p + "mlp.linear_fc1.weight": torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                p + "mlp.linear_fc2.weight": m.down_proj.weight}
    return {k: v.detach().clone() for k, v in out.items()}


def load_megatron(module: Any, state: dict[str, Any]) -> None:
    """Copy ``state`` into a Megatron chunk (unwrapping DDP / Float16Module); every weight must land."""
    import torch

    while hasattr(module, "module"):
        module = module.module
    own = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    if set(own) != set(state):
        raise SystemExit(f"megatron_backend: weight names differ: {sorted(set(own) ^ set(state))}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value.to(own[name].dtype))


def batches(args: argparse.Namespace) -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(7)
    return [tuple(torch.randint(0, args.vocab, (2, args.batch, args.seq), generator=g)) for _ in range(args.steps)]


def run_native(args: argparse.Namespace, plan: Any) -> list[float]:
    import torch
    import torch.nn.functional as F

    import galvatron
    from galvatron.models.gpt import GPT

    torch.manual_seed(0)
    model = galvatron.wrap(GPT(gpt_config(args)), plan)
    opt = model.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    losses = []
    for tokens, labels in batches(args):
        loss = model.train_step((tokens, labels), lambda out, y: F.cross_entropy(out.flatten(0, 1).float(),
                                                                                 y.flatten()))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def run_megatron(args: argparse.Namespace, plan: Any) -> list[float]:
    import torch

    import galvatron
    from galvatron.models.gpt import GPT

    torch.manual_seed(0)
    state = megatron_state(GPT(gpt_config(args)))
    runner = galvatron.wrap(megatron_model(gpt_config(args)), plan, backend="megatron")
    load_megatron(runner.chunks[0], state)  # before the optimizer takes its fp32 main copies
    opt = runner.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    losses = []
    for tokens, labels in batches(args):
        loss = runner.train_step((tokens, labels))
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    _imports()
    import megatron.core
    import torch

    from galvatron.plan import Plan

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    plan = Plan.uniform(args.layers, global_batch_size=args.batch, num_micro_batches=args.micro_batches,
                        dtype=args.dtype, dp=1)
    start = time.perf_counter()
    native = run_native(args, plan)
    mcore = run_megatron(args, plan)  # Megatron's parallel state is global: one plan per process
    rel = [abs(a - b) / abs(a) for a, b in zip(native, mcore, strict=True)]
    tolerance = BF16_RTOL if args.dtype == "bf16" else FP32_RTOL
    result = {
        "what": "Megatron-Core backend vs native runtime, same GPT weights and batches, one GPU",
        "plan": plan.to_dict(), "args": vars(args), "device": torch.cuda.get_device_name(),
        "python": platform.python_version(), "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "native_losses": native, "megatron_losses": mcore, "max_relative_difference": max(rel),
        "tolerance": tolerance, "passed": max(rel) <= tolerance, "seconds": time.perf_counter() - start,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("native_losses", "megatron_losses", "max_relative_difference",
                                             "passed")}, indent=2))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
