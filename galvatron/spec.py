"""The model description the cost model, the search and the runtime all read.

A :class:`ModelSpec` is the model as an ordered list of layers: the embedding, the repeated
blocks (the unit a plan assigns strategies to), the final norm and the head. It comes from a
config (``from_config``, for simulation with no weights anywhere) or from a live module
(``from_module``, measured on the meta device: no memory, no weights touched).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galvatron.errors import ModelSpecError


class LayerKind(enum.StrEnum):
    """What a layer is. ``attention``, ``mlp`` and ``moe`` are blocks a plan assigns strategies to."""

    EMBEDDING = "embedding"
    ATTENTION = "attention"  # attention block with a dense MLP (a transformer layer)
    MLP = "mlp"  # a block with no attention
    MOE = "moe"  # attention block whose MLP is a mixture of experts
    NORM = "norm"
    HEAD = "head"


BLOCK_KINDS = (LayerKind.ATTENTION, LayerKind.MLP, LayerKind.MOE)


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One layer: its size, its per-token cost and the shapes the cost model and runtime need."""

    kind: LayerKind
    name: str
    """Module path (``from_module``) or a generated name (``from_config``)."""
    params: int
    """Parameters held by the layer (a MoE layer: all experts)."""
    flops_per_token: float
    """Forward matmul FLOPs per token (MoE: the experts a token is routed to), attention excluded."""
    attention_flops_per_token: float = 0.0
    """Forward FLOPs of the attention core (QK^T and AV) per token at the spec's sequence length,
    counted without the causal saving (as Megatron counts them)."""
    activation_bytes_per_token: float = 0.0
    """Bytes kept for backward per token with 16-bit activations, no recomputation, no
    parallelism, flash attention (no s x s scores kept)."""
    hidden: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    ffn_hidden: int = 0
    experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    expert_params: int = 0
    """Parameters in the routed experts (sharded by expert parallelism)."""
    norm: str = "layernorm"
    """The block's normalisation, ``layernorm`` or ``rmsnorm``: one fused kernel or, in eager PyTorch,
    a chain of elementwise ops (the cost model's ``CostOptions.elementwise``)."""
    rope: bool = False
    """Rotary position embedding applied to q and k inside the block."""
    bias: bool = False
    """The block's linear layers carry biases (eager backward reduces each output gradient over the
    tokens for them)."""
    fused_qkv: bool = False
    """q, k and v come from one linear layer (GPT-2's ``c_attn``, ``qkv_proj``, ``query_key_value``)
    rather than three: one GEMM, and under autocast one cast copy of the attention's input."""
    fused_gate_up: bool = False
    """A gated MLP's gate and up projections are one linear layer (``gate_up_proj``)."""
    norm_composite: bool = False
    """The block's RMSNorm runs as separate elementwise ops in fp32 (Hugging Face's ``LlamaRMSNorm``:
    cast, ``pow``, ``mean``, ``rsqrt``, multiplies, cast back) rather than ``F.rms_norm``'s fused kernel
    (``nn.RMSNorm``); ``from_module`` sees which the forward calls."""
    activations_measured: bool = False
    """``activation_bytes_per_token`` was counted on the module's own ops (``from_module``), so it holds
    what an eager block keeps beyond Korthikanti's count (SiLU's output, GQA's K and V copied to
    every query head); the cost model adds those only to counted specs."""
    experts_outside_autocast: bool = False
    """The routed experts' GEMMs bypass autocast and run in the parameters' dtype: a grouped GEMM
    (``torch._grouped_mm``, not on autocast's list) on inputs cast to the weights' dtype, as Hugging
    Face's ``grouped_mm`` experts call it. Over fp32 parameters they then run in fp32 (48 TFLOP/s on
    one H100 against 759 in bf16: benchmarks/results/grouped_gemm_dtype.json) and their weights are
    never cast, unless the stack hands them 16-bit copies (``CostOptions.cast_fused_experts``, as
    ``galvatron.wrap`` does); ``from_module`` reads the implementation from the experts' config."""
    experts_sliced: bool = False
    """The routed experts' weights are 3-D tensors that the block's eager loop indexes one expert at a
    time (Hugging Face's ``eager`` experts): autograd turns each slice's gradient into a zero-filled
    full-size tensor (``select_backward``: the slice copied into zeros) and adds those up, so each
    backward writes the whole tensor once per expert and adds it ``experts - 1`` times, in the
    weights' dtype (on one H100, Mixtral's shape over fp32 weights: 118 of a 229 ms step,
    benchmarks/results/wrap_auto/mixtral2l_hf_eager_b2_kernels.json)."""

    @property
    def is_block(self) -> bool:
        return self.kind in BLOCK_KINDS


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model as an ordered list of layers, plus the global shapes."""

    name: str
    layers: tuple[LayerSpec, ...]
    seq_len: int
    vocab: int
    hidden: int
    tied_embeddings: bool = False
    causal: bool = True
    block_path: str = ""
    """Where the blocks live in the module (``from_module``), e.g. ``model.layers``."""
    notes: tuple[str, ...] = field(default=(), compare=False)
    """What ``from_module`` could not recognise, in words."""

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ModelSpecError(f"model {self.name!r} has no repeated blocks")

    @property
    def blocks(self) -> tuple[LayerSpec, ...]:
        """The layers a plan assigns strategies to, in order."""
        return tuple(layer for layer in self.layers if layer.is_block)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def params(self) -> int:
        """Total parameters (tied weights counted once)."""
        return sum(layer.params for layer in self.layers)

    @property
    def active_params(self) -> int:
        """Parameters a token passes through (MoE: routed experts counted ``top_k`` times)."""
        total = 0
        for layer in self.layers:
            if layer.experts:
                per_expert = layer.expert_params // layer.experts
                total += layer.params - layer.expert_params + per_expert * layer.top_k
            else:
                total += layer.params
        return total

    def layers_of(self, kind: LayerKind) -> tuple[LayerSpec, ...]:
        return tuple(layer for layer in self.layers if layer.kind is kind)

    def flops_per_token(self, training: bool = True) -> float:
        """Model FLOPs per token (forward, or forward + backward = 3x when ``training``)."""
        fwd = sum(layer.flops_per_token + layer.attention_flops_per_token for layer in self.layers)
        return 3 * fwd if training else fwd

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.kind.value] = counts.get(layer.kind.value, 0) + 1
        kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
        return f"{self.name}: {self.params / 1e9:.3f}B params, {self.num_blocks} blocks ({kinds}), seq {self.seq_len}"

    # ------------------------------------------------------------ builders
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | Path) -> ModelSpec:
        """From a dict, a YAML file or a preset name in ``configs/models`` (e.g. ``llama2-7b``).

        Keys: ``layers, hidden, heads, kv_heads, head_dim, ffn_hidden, vocab, seq_len,
        activation (gelu|swiglu), norm (rmsnorm|layernorm), bias, position (rope|learned),
        tied_embeddings, causal, moe {experts, top_k, ffn_hidden, shared_experts, first_dense, every}``.
        """
        from galvatron.spec_config import spec_from_config

        return spec_from_config(config)

    @classmethod
    def from_module(cls, module: Any, example_batch: Any, *, name: str | None = None) -> ModelSpec:
        """Describe a live ``nn.Module`` by running ``module(example_batch)`` on the meta device.

        Finds the repeated blocks, counts parameters exactly, measures forward FLOPs and the bytes
        saved for backward per block. The module itself is not touched.
        """
        from galvatron.spec_module import spec_from_module

        return spec_from_module(module, example_batch, name=name)
