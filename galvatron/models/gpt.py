"""A small, parallelism-free GPT-style decoder (and its MoE variant): the project's test fixture.

GELU or SwiGLU MLP, grouped-query attention, RoPE or learned positions, optional MoE blocks with
top-k routing and shared experts. Plain PyTorch: the runtime parallelises it like any user model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of the reference model. Defaults give a tiny model for tests."""

    vocab: int = 128
    """Vocabulary size."""
    seq_len: int = 32
    """Longest sequence (learned position table size, RoPE cache size)."""
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int | None = None
    """Key/value heads (GQA); None: as many as ``heads``."""
    ffn_hidden: int | None = None
    """MLP width; None: 4 x hidden."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    bias: bool = False
    position: Literal["rope", "learned"] = "rope"
    tied_embeddings: bool = False
    experts: int = 0
    """Routed experts per MoE block; 0: a dense model."""
    top_k: int = 2
    expert_ffn_hidden: int | None = None
    shared_experts: int = 0
    moe_every: int = 1
    """Every ``moe_every``-th block is a MoE block (when ``experts > 0``)."""

    def __post_init__(self) -> None:
        self.kv_heads = self.kv_heads or self.heads
        self.ffn_hidden = self.ffn_hidden or 4 * self.hidden
        self.expert_ffn_hidden = self.expert_ffn_hidden or self.ffn_hidden
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, heads a multiple of kv_heads")

    def to_model_config(self) -> dict:
        """The same shape as a ``ModelSpec.from_config`` dict."""
        cfg = {
            "layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
            "ffn_hidden": self.ffn_hidden, "vocab": self.vocab, "seq_len": self.seq_len,
            "activation": self.activation, "norm": self.norm, "bias": self.bias, "position": self.position,
            "tied_embeddings": self.tied_embeddings,
        }
        if self.experts:
            cfg["moe"] = {"experts": self.experts, "top_k": self.top_k, "ffn_hidden": self.expert_ffn_hidden,
                          "shared_experts": self.shared_experts, "every": self.moe_every}
        return cfg


def _norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.hidden, bias=cfg.bias) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.hidden)


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim) for rotary embeddings (Su et al. 2021)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, S, H, D), as the projections lay it out, by the tables already gathered for its
    positions (B or 1, S, 1, D), in ``x``'s dtype (the fp32 tables are cast to it, as Hugging Face's
    Llama does: under autocast a bf16 ``x`` times fp32 tables would run the rotation in fp32). On this
    contiguous layout every op of the rotation is a vectorized kernel; on the (B, H, S, D) view SDPA
    takes they ran at about 40% of the memory rate (benchmarks/results/step_breakdown.json)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention core on (B, H, S, D) tensors; K/V may have fewer heads (GQA)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class Attention(nn.Module):
    """Multi-head attention with GQA. ``attention_fn`` is the core the runtime may replace
    (context parallelism); everything else is ordinary linear layers."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.hidden // cfg.heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.heads * self.head_dim, cfg.hidden, bias=cfg.bias)
        self.attention_fn = sdpa_attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        # head counts from the weights, so a tensor-parallel shard of this module still works
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, ffn_hidden: int) -> None:
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.up_proj = nn.Linear(cfg.hidden, ffn_hidden, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.hidden, ffn_hidden, bias=cfg.bias) if self.swiglu else None
        self.down_proj = nn.Linear(ffn_hidden, cfg.hidden, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class MoE(nn.Module):
    """Top-k routed experts plus always-on shared experts (Mixtral; DeepSeek-MoE when shared > 0).

    Dropless: every token reaches its ``top_k`` experts. The Switch-Transformer load-balancing
    loss of the last forward is kept in ``aux_loss``.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.experts, cfg.top_k
        self.router = nn.Linear(cfg.hidden, cfg.experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg, cfg.expert_ffn_hidden) for _ in range(cfg.experts))
        self.shared = nn.ModuleList(MLP(cfg, cfg.expert_ffn_hidden) for _ in range(cfg.shared_experts))
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and their renormalised weights for tokens ``x`` (N, hidden)."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        load = torch.zeros_like(probs).scatter_(1, index, 1.0).mean(0)
        self.aux_loss = self.num_experts * (load * probs.mean(0)).sum()
        return index, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        index, weights = self.route(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (index == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        for expert in self.shared:
            out = out + expert(tokens)
        return out.view(shape)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a dense MLP or a MoE layer."""

    def __init__(self, cfg: GPTConfig, moe: bool) -> None:
        super().__init__()
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = _norm(cfg)
        self.mlp: nn.Module = MoE(cfg) if moe else MLP(cfg, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """``GPT(cfg)(tokens, position_ids=None) -> logits``: tokens (B, S) int64, logits (B, S, vocab)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos_embeddings = nn.Embedding(cfg.seq_len, cfg.hidden) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(
            Block(cfg, moe=cfg.experts > 0 and i % cfg.moe_every == 0) for i in range(cfg.layers)
        )
        self.norm = _norm(cfg)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tied_embeddings:
            self.head.weight = self.tok_embeddings.weight
        head_dim = cfg.hidden // cfg.heads
        cos, sin = rope_cache(cfg.seq_len, head_dim) if cfg.position == "rope" else (torch.empty(0), torch.empty(0))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    def init_buffers(self) -> None:
        """Recompute the rotary tables on their device: they are non-persistent (no checkpoint holds
        them), so a model built on the meta device needs them after ``galvatron.wrap`` materialises it."""
        if self.config.position == "rope":
            cos, sin = rope_cache(self.config.seq_len, self.config.hidden // self.config.heads)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        x = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(position_ids)
        rope = None
        if self.rope_cos.numel():
            rope = (self.rope_cos[position_ids].unsqueeze(2), self.rope_sin[position_ids].unsqueeze(2))
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x))

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing losses of the last forward (None for a dense model)."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None
