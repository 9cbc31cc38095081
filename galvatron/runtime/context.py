"""Context parallelism: attention over a sequence split across ranks, the batch layout it needs,
an exact loss over sharded tokens, and the wiring into unmodified models.

Kinds (``LayerStrategy.cp_kind``), all taking explicit process groups:

- ``ulysses``: all-to-all sequence <-> heads (DeepSpeed-Ulysses, Jacobs et al. 2023),
  :func:`~galvatron.runtime.context_ulysses.ulysses_attention`.
- ``ring``: K/V rotation over p2p with log-sum-exp merging (Liu et al. 2023),
  :func:`~galvatron.runtime.context_ring.ring_attention`.
- ``striped``: ring with token t on rank t mod P (Brandon et al. 2023),
  :func:`~galvatron.runtime.context_ring.striped_attention`.
- ``hybrid``: Ulysses inside x ring across (USP, Fang & Zhao 2024),
  :func:`~galvatron.runtime.context_ulysses.hybrid_attention`.

Token layouts: ``striped`` puts token t on cp rank t mod P; every other kind gives cp rank r the
contiguous chunk r. Shard inputs, position ids and labels with the same layout
(:func:`shard_batch`) and reduce the loss with :func:`context_parallel_loss`; parameter gradients
are then *summed* over the cp group. With tensor parallelism the functions simply see the
rank's H/tp heads.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from galvatron.errors import PlanError
from galvatron.plan import CPKind
from galvatron.runtime.context_ring import ring_attention, striped_attention
from galvatron.runtime.context_ulysses import hybrid_attention, local_attention, ulysses_attention

__all__ = [
    "HF_ATTENTION_NAME", "ContextAttention", "ContextGroups", "SequenceSplit", "apply_context_parallel",
    "attention_modules", "context_parallel_loss", "hybrid_attention", "hybrid_rank_grid", "new_context_groups",
    "next_token_labels", "ring_attention", "scale_gradient", "sequence_layout", "shard_batch", "shard_positions",
    "shard_sequence", "striped_attention", "ulysses_attention", "unshard_sequence",
]

HF_ATTENTION_NAME = "galvatron_context"
"""Name under which the context-parallel attention is registered in transformers' AttentionInterface."""


# ----------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class ContextGroups:
    """This rank's process groups for one context-parallel layout.

    ``cp`` spans the whole sequence split (loss reduction, ulysses/ring/striped attention); for
    ``hybrid``, ``ulysses`` (inner, consecutive cp ranks) and ``ring`` (outer) split it further."""

    cp: dist.ProcessGroup
    ulysses: dist.ProcessGroup | None = None
    ring: dist.ProcessGroup | None = None


def hybrid_rank_grid(ranks: Sequence[int], ulysses_degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """Ulysses groups (consecutive ranks) and ring groups (stride ``ulysses_degree``) of one cp group."""
    ranks = sorted(ranks)
    if ulysses_degree < 1 or len(ranks) % ulysses_degree:
        raise PlanError("cp_ulysses", f"{ulysses_degree} does not divide cp = {len(ranks)}")
    ulysses = [ranks[i:i + ulysses_degree] for i in range(0, len(ranks), ulysses_degree)]
    ring = [ranks[j::ulysses_degree] for j in range(ulysses_degree)]
    return ulysses, ring


def new_context_groups(cp_ranks: Sequence[Sequence[int]], kind: CPKind | str, ulysses_degree: int = 1,
                       cp_group: dist.ProcessGroup | None = None) -> ContextGroups:
    """Create the groups of every cp group in ``cp_ranks`` (global ranks; every rank calls this
    with the same lists) and return this rank's. ``cp_group``: an existing group for this rank's
    cp ranks (e.g. ``mesh.get_group("cp")``) instead of a new one. Group ranks follow ascending
    global rank, which is the order of the token layout."""
    kind, me = CPKind(kind), dist.get_rank()
    mine: dict[str, dist.ProcessGroup] = {}
    for ranks in cp_ranks:
        ranks = sorted(ranks)
        group = dist.new_group(ranks) if cp_group is None else None
        if me in ranks:
            mine["cp"] = cp_group or group
        if kind is CPKind.HYBRID:
            for name, lists in zip(("ulysses", "ring"), hybrid_rank_grid(ranks, ulysses_degree)):
                for sub in lists:
                    subgroup = dist.new_group(sub)
                    if me in sub:
                        mine[name] = subgroup
    if "cp" not in mine:
        raise PlanError("cp", f"rank {me} is in none of the context-parallel groups {list(cp_ranks)}")
    return ContextGroups(**mine)


# ----------------------------------------------------------------------------- attention core
@dataclass(frozen=True)
class ContextAttention:
    """One kind bound to its groups: the ``attention_fn(q, k, v, causal=True)`` of the reference
    models and the per-module core behind the transformers registration."""

    kind: CPKind
    groups: ContextGroups

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CPKind(self.kind))
        if self.kind is CPKind.HYBRID and (self.groups.ulysses is None or self.groups.ring is None):
            raise PlanError("cp_kind", "hybrid needs ulysses and ring groups (new_context_groups builds them)")

    @property
    def degree(self) -> int:
        """Ranks the sequence is split over."""
        return dist.get_world_size(self.groups.cp)

    @property
    def layout(self) -> str:
        """Token layout of the kind: ``"striped"`` or ``"contiguous"``."""
        return sequence_layout(self.kind)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                 scale: float | None = None) -> torch.Tensor:
        """Attention of local queries (B, H, S/P, D) over the whole sequence; K/V may have fewer heads."""
        groups = self.groups
        if self.kind is CPKind.ULYSSES:
            return ulysses_attention(q, k, v, groups.cp, causal, scale)
        if self.kind is CPKind.RING:
            return ring_attention(q, k, v, groups.cp, causal, scale)
        if self.kind is CPKind.STRIPED:
            return striped_attention(q, k, v, groups.cp, causal, scale)
        return hybrid_attention(q, k, v, groups.ulysses, groups.ring, causal, scale)


# ----------------------------------------------------------------------------- batch layout
def sequence_layout(kind: CPKind | str) -> str:
    """``"striped"`` (token t on rank t mod P) for striped attention, else ``"contiguous"``."""
    return "striped" if CPKind(kind) is CPKind.STRIPED else "contiguous"


def _check_divisible(length: int, degree: int) -> None:
    if length % degree:
        raise ValueError(f"sequence length {length} is not a multiple of the context-parallel degree {degree}")


def shard_sequence(tensor: torch.Tensor, kind: CPKind | str, rank: int, degree: int, dim: int = 1) -> torch.Tensor:
    """The tokens of ``tensor`` (sequence along ``dim``) that cp rank ``rank`` of ``degree`` holds."""
    _check_divisible(tensor.shape[dim], degree)
    if sequence_layout(kind) == "striped":
        return tensor.unflatten(dim, (-1, degree)).select(dim + 1, rank)
    return tensor.chunk(degree, dim=dim)[rank]


def unshard_sequence(shards: Sequence[torch.Tensor], kind: CPKind | str, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: the full sequence from the shards of cp ranks 0..P-1."""
    if sequence_layout(kind) == "striped":
        return torch.stack(list(shards), dim=dim + 1).flatten(dim, dim + 1)
    return torch.cat(list(shards), dim=dim)


def shard_positions(seq_len: int, kind: CPKind | str, rank: int, degree: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (S/P,) of the tokens cp rank ``rank`` holds: its RoPE/position-table rows."""
    return shard_sequence(torch.arange(seq_len, device=device), kind, rank, degree, dim=0)


def next_token_labels(tokens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Causal-LM targets (B, S): token s+1 for position s, ``ignore_index`` for the last position.
    Shift before sharding: under the striped layout the next token lives on another rank."""
    return F.pad(tokens[:, 1:], (0, 1), value=ignore_index)


def shard_batch(tokens: torch.Tensor, kind: CPKind | str, rank: int, degree: int, *,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """This cp rank's ``input_ids``, ``position_ids`` and ``labels`` (each (B, S/P)) of a batch of
    full sequences ``tokens`` (B, S). ``labels`` default to :func:`next_token_labels`, position ids
    to 0..S-1 (give packed-sequence positions explicitly)."""
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    if labels is None:
        labels = next_token_labels(tokens, ignore_index)
    return {name: shard_sequence(t, kind, rank, degree, dim=1)
            for name, t in (("input_ids", tokens), ("position_ids", position_ids), ("labels", labels))}


def context_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None,
                          ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over every labelled token of the cp group, from this rank's shard.

    ``logits`` (..., V) and ``labels`` (...) are this rank's tokens. The value is the exact global
    mean on every rank (token-loss sums and counts all-reduced over ``group``); the gradient is
    that of this rank's share, local sum / global count, so summing parameter gradients over the
    cp group gives the gradient of the global mean. (Under a gradient *average* over dp x cp,
    multiply by the cp degree.)"""
    logits = logits.flatten(0, -2)
    local = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.flatten(),
                            ignore_index=ignore_index, reduction="sum")
    if hasattr(local, "full_tensor"):  # vocabulary-parallel logits under loss_parallel(): a replicated DTensor
        local = local.full_tensor()
    totals = torch.stack([local.detach().double(), (labels != ignore_index).sum().double()])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1)
    return (local + (totals[0] - local.detach().double()).to(local.dtype)) / count.to(local.dtype)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor`` in backward."""
    return _ScaleGradient.apply(x, factor)


@dataclass(frozen=True)
class SequenceSplit:
    """How a wrapped model's tokens are split over its context-parallel ranks: what ``wrap``
    uses to shard batches, add global position ids and reduce the loss."""

    kind: CPKind
    """A kind with the token layout of every context-parallel layer (striped, or contiguous)."""
    degree: int
    rank: int
    """This rank's index in its cp group (the token shard it holds)."""
    group: dist.ProcessGroup
    """The cp group: ranks holding the other token shards of the same samples."""

    def shard(self, batch: Any) -> Any:
        """This rank's tokens of every tensor in ``batch`` (nested tuples / lists / dicts) that
        has the sequence as dim 1: the length of the first tensor with two or more dims."""
        from galvatron.runtime.relayout import map_tensors

        length = _sequence_length(batch)
        if length is None:
            raise ValueError("context parallelism needs (batch, sequence, ...) tensors; the batch holds none")
        return map_tensors(batch, lambda t: shard_sequence(t, self.kind, self.rank, self.degree)
                           if t.dim() >= 2 and t.shape[1] == length else t)

    def add_position_ids(self, signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
        """``kwargs`` with the global ``position_ids`` of this rank's tokens unless the call
        passes them (``signature``: the model's ``forward``, whose first parameter is ``self``)."""
        bound = signature.bind_partial(None, *args, **kwargs).arguments
        if bound.get("position_ids") is not None:
            return kwargs
        if "position_ids" in bound and "position_ids" not in kwargs:
            raise ValueError("position_ids passed positionally as None: pass them by keyword, or leave them out")
        length = _sequence_length((args, kwargs))
        if length is None:
            raise ValueError("context parallelism needs (batch, sequence, ...) inputs; the call has none")
        first = _first_sequence_tensor((args, kwargs))
        positions = shard_positions(length * self.degree, self.kind, self.rank, self.degree, device=first.device)
        return {**kwargs, "position_ids": positions.expand(first.shape[0], -1)}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """:func:`context_parallel_loss` over the cp group with its gradient scaled by the cp
        degree, so the runtime's gradient *average* over the ``dp x cp`` ranks is exact."""
        return scale_gradient(context_parallel_loss(logits, labels, self.group, ignore_index), float(self.degree))


def _first_sequence_tensor(value: Any) -> torch.Tensor | None:
    stack = [value]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            if item.dim() >= 2:
                return item
        elif isinstance(item, (tuple, list)):
            stack = [*item, *stack]
        elif isinstance(item, dict):
            stack = [*item.values(), *stack]
    return None


def _sequence_length(value: Any) -> int | None:
    first = _first_sequence_tensor(value)
    return None if first is None else first.shape[1]


# ----------------------------------------------------------------------------- wiring
def apply_context_parallel(model: nn.Module,
                           attention: ContextAttention | Sequence[ContextAttention | None]) -> int:
    """Make ``model``'s attention layers context-parallel; return how many were wired.

    ``attention``: one core for every attention layer, or one per attention layer in model order
    (None leaves a layer as it is). The reference models get it as their ``attention_fn``; a
    transformers model gets :data:`HF_ATTENTION_NAME` as its ``attn_implementation``, each attention
    module its own core. All wired layers must share the token layout and the cp degree: feed
    the model the batch of :func:`shard_batch` for that layout."""
    modules = attention_modules(model)
    cores = [attention] * len(modules) if isinstance(attention, ContextAttention) else list(attention)
    if len(cores) != len(modules):
        raise PlanError("cp", f"{len(cores)} attention cores for {len(modules)} attention layers")
    wired = [c for c in cores if c is not None]
    if len({(c.layout, c.degree) for c in wired}) > 1:
        raise PlanError("cp_kind", "layers with different token layouts or cp degrees cannot share one sequence "
                                   "shard: use one cp degree, and striped for all layers or for none")
    hf = _is_transformers_model(model)
    for module, core in zip(modules, cores):
        if core is None:
            continue
        if hf:
            module.galvatron_attention = core
        else:
            module.attention_fn = core
    if hf and wired:
        _register_transformers()
        model.set_attn_implementation(HF_ATTENTION_NAME)
    return len(wired)


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Attention layers in model order: the reference models' ``Attention``, or transformers
    attention modules (``...Attention`` classes with a ``layer_idx``)."""
    from galvatron.models.gpt import Attention

    if _is_transformers_model(model):
        found = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    else:
        found = [m for m in model.modules() if isinstance(m, Attention)]
    if not found:
        raise PlanError("cp", f"found no attention layer to make context-parallel in {type(model).__name__}")
    return found


def _register_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(HF_ATTENTION_NAME, _transformers_attention)
    AttentionMaskInterface.register(HF_ATTENTION_NAME, _transformers_mask)


def _transformers_mask(*_: Any, attention_mask: torch.Tensor | None = None, **__: Any) -> None:
    """Mask builder for :data:`HF_ATTENTION_NAME`: the attention functions apply the causal mask of
    their own token layout, so none is built; padding cannot be expressed and is refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("padding masks are not supported under context parallelism: pack sequences instead")


def _transformers_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, S, D) inputs, (B, S, H, D) output."""
    if attention_mask is not None:
        raise ValueError("context-parallel attention got an attention mask: it applies its own causal mask")
    if dropout:
        raise ValueError("attention dropout is not supported under context parallelism")
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{unsupported} is not supported under context parallelism")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    core = getattr(module, "galvatron_attention", local_attention)
    return core(query, key, value, causal=causal, scale=scaling).transpose(1, 2).contiguous(), None
