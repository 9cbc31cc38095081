"""``ModelSpec.from_config``: a transformer described by its hyper-parameters, no weights.

Parameter counts are exact for the architectures described (GPT-3 style: LayerNorm, biases,
learned positions; Llama style: RMSNorm, no biases, RoPE, SwiGLU; Mixtral and DeepSeek-MoE style
routed and shared experts). FLOPs follow Narayanan et al. SC'21 (2 FLOPs per multiply-add,
attention core 4*s*h per token); activation bytes follow Korthikanti et al. 2022 Table 2 with
flash attention (no s x s terms) and without dropout masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from galvatron.errors import ConfigError, ModelSpecError
from galvatron.paths import find_config
from galvatron.spec import LayerKind, LayerSpec, ModelSpec

_KEYS = {
    "name", "layers", "hidden", "heads", "kv_heads", "head_dim", "ffn_hidden", "vocab", "seq_len",
    "activation", "norm", "bias", "position", "tied_embeddings", "causal", "moe",
}
_MOE_KEYS = {"experts", "top_k", "ffn_hidden", "shared_experts", "first_dense", "every"}


def load_model_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A model config as a dict: given directly, from a YAML path, or a preset name."""
    if isinstance(config, Mapping):
        return dict(config)
    path = find_config("models", str(config))
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a model config must be a mapping")
    data = dict(data)
    data.setdefault("name", path.stem)
    return data


def spec_from_config(config: Mapping[str, Any] | str | Path) -> ModelSpec:
    cfg = load_model_config(config)
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise ModelSpecError(f"unknown model config key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    for key in ("layers", "hidden", "heads", "vocab", "seq_len"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise ModelSpecError(f"model config needs a positive integer {key!r}, got {cfg.get(key)!r}")
    arch = _Arch(cfg)
    moe = cfg.get("moe") or None
    if moe is not None:
        unknown = sorted(set(moe) - _MOE_KEYS)
        if unknown:
            raise ModelSpecError(f"unknown moe key {unknown[0]!r} (known: {', '.join(sorted(_MOE_KEYS))})")
    layers = [arch.embedding()]
    for i in range(cfg["layers"]):
        first = moe.get("first_dense", 0) if moe else 0
        if moe is not None and i >= first and (i - first) % moe.get("every", 1) == 0:
            layers.append(arch.moe_block(i, moe))
        else:
            layers.append(arch.dense_block(i))
    layers += [arch.final_norm(), arch.head()]
    return ModelSpec(
        name=str(cfg.get("name", "model")),
        layers=tuple(layers),
        seq_len=cfg["seq_len"],
        vocab=cfg["vocab"],
        hidden=cfg["hidden"],
        tied_embeddings=arch.tied,
        causal=bool(cfg.get("causal", True)),
    )


class _Arch:
    """Per-layer formulas for one architecture."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.h = cfg["hidden"]
        self.heads = cfg["heads"]
        self.kv = cfg.get("kv_heads", self.heads)
        self.hd = cfg.get("head_dim", self.h // self.heads)
        self.seq = cfg["seq_len"]
        self.vocab = cfg["vocab"]
        self.swiglu = _choice(cfg, "activation", ("gelu", "swiglu"), "gelu") == "swiglu"
        self.ffn = cfg.get("ffn_hidden", 4 * self.h)
        default_norm = "rmsnorm" if self.swiglu else "layernorm"
        self.layernorm = _choice(cfg, "norm", ("layernorm", "rmsnorm"), default_norm) == "layernorm"
        self.bias = bool(cfg.get("bias", not self.swiglu))
        default_position = "rope" if self.swiglu else "learned"
        self.learned_pos = _choice(cfg, "position", ("rope", "learned"), default_position) == "learned"
        self.tied = bool(cfg.get("tied_embeddings", False))
        if self.heads % self.kv:
            raise ModelSpecError(f"kv_heads {self.kv} does not divide heads {self.heads}")

    @property
    def norm_params(self) -> int:
        return 2 * self.h if self.layernorm and self.bias else self.h

    def linear(self, n_in: int, n_out: int, bias: bool) -> int:
        return n_in * n_out + (n_out if bias else 0)

    def attention_params(self, bias: bool = True) -> int:
        """Q, K, V, O projections; ``bias=False`` gives the weights alone (2 FLOPs per weight)."""
        q, kv, b = self.heads * self.hd, self.kv * self.hd, bias and self.bias
        return self.linear(self.h, q, b) + 2 * self.linear(self.h, kv, b) + self.linear(q, self.h, b)

    def mlp_params(self, ffn: int, bias: bool = True) -> int:
        b = bias and self.bias
        up = (2 if self.swiglu else 1) * self.linear(self.h, ffn, b)
        return up + self.linear(ffn, self.h, b)

    def attention_activation(self) -> float:
        """Korthikanti Table 2 attention terms, GQA-sized K/V, no dropout mask, flash attention:
        norm input 2h, QKV input 2h, Q/K/V 2(q+2kv), softmax stats, and the attention output 2q, which
        the kernel keeps for its backward and the output projection as its input (one tensor:
        benchmarks/results/saved_activations.md)."""
        q, kv = self.heads * self.hd, self.kv * self.hd
        return 2 * self.h + 2 * self.h + 2 * (q + 2 * kv) + 4 * self.heads + 2 * q

    def mlp_activation(self, ffn: int) -> float:
        """Norm input 2h, up-projection input 2h, activation input 2f (SwiGLU: gate and up 4f),
        down-projection input 2f."""
        return 2 * self.h + 2 * self.h + (4 * ffn if self.swiglu else 2 * ffn) + 2 * ffn

    def attention_flops(self) -> float:
        return 4.0 * self.seq * self.heads * self.hd

    def _shape(self) -> dict[str, Any]:
        return {"hidden": self.h, "heads": self.heads, "kv_heads": self.kv, "head_dim": self.hd,
                "norm": "layernorm" if self.layernorm else "rmsnorm", "rope": not self.learned_pos, "bias": self.bias}

    def embedding(self) -> LayerSpec:
        params = self.vocab * self.h + (self.seq * self.h if self.learned_pos else 0)
        return LayerSpec(kind=LayerKind.EMBEDDING, name="embedding", params=params, flops_per_token=0.0,
                         activation_bytes_per_token=0.0, hidden=self.h)

    def dense_block(self, i: int) -> LayerSpec:
        attn, mlp = self.attention_params(), self.mlp_params(self.ffn)
        return LayerSpec(
            kind=LayerKind.ATTENTION, name=f"layers.{i}", params=attn + mlp + 2 * self.norm_params,
            flops_per_token=2.0 * (self.attention_params(False) + self.mlp_params(self.ffn, False)),
            attention_flops_per_token=self.attention_flops(),
            activation_bytes_per_token=self.attention_activation() + self.mlp_activation(self.ffn),
            ffn_hidden=self.ffn, **self._shape(),
        )

    def moe_block(self, i: int, moe: Mapping[str, Any]) -> LayerSpec:
        experts, top_k = int(moe["experts"]), int(moe.get("top_k", 2))
        shared = int(moe.get("shared_experts", 0))
        ffn = int(moe.get("ffn_hidden", self.ffn))
        if not 1 <= top_k <= experts:
            raise ModelSpecError(f"moe.top_k {top_k} must be between 1 and experts {experts}")
        attn, expert = self.attention_params(), self.mlp_params(ffn)
        router = self.h * experts
        routed = experts * expert
        active = self.attention_params(False) + router + (top_k + shared) * self.mlp_params(ffn, False)
        params = attn + router + routed + shared * expert + 2 * self.norm_params
        return LayerSpec(
            kind=LayerKind.MOE, name=f"layers.{i}", params=params,
            flops_per_token=2.0 * active, attention_flops_per_token=self.attention_flops(),
            activation_bytes_per_token=self.attention_activation() + 2 * self.h + 4 * experts
            + (top_k + shared) * (self.mlp_activation(ffn) - 2 * self.h),
            ffn_hidden=ffn, experts=experts, top_k=top_k, shared_experts=shared, expert_params=routed,
            **self._shape(),
        )

    def final_norm(self) -> LayerSpec:
        return LayerSpec(kind=LayerKind.NORM, name="norm", params=self.norm_params, flops_per_token=0.0,
                         activation_bytes_per_token=2.0 * self.h, hidden=self.h)

    def head(self) -> LayerSpec:
        params = 0 if self.tied else self.vocab * self.h
        # logits kept in fp32 for the loss: 4 bytes per vocabulary entry
        return LayerSpec(kind=LayerKind.HEAD, name="head", params=params, flops_per_token=2.0 * self.vocab * self.h,
                         activation_bytes_per_token=2.0 * self.h + 4.0 * self.vocab, hidden=self.h)


def _choice(cfg: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ModelSpecError(f"model config {key!r} must be one of {', '.join(allowed)}, got {value!r}")
    return value
