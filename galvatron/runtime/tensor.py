"""Tensor parallelism with DTensor (Megatron-LM, Shoeybi et al. 2019), Megatron sequence
parallelism for norms (Korthikanti et al. 2022), vocabulary-parallel embedding and head.

A block's TP plan maps its projection layers (``nn.Linear``, or transformers' transposed
``Conv1D``) to ``colwise``, ``rowwise`` or ``packed_colwise`` (a fused projection holding equal
parts side by side, ``[q | k | v]`` or ``[gate | up]``: each rank gets its slice of every part).
It comes, in order of precedence, from the user (``wrap(..., tp_plan={...})``, names relative to
a block, ``*`` wildcards allowed), from a Hugging Face model's ``config.base_model_tp_plan``
(entries of those three styles on projection layers; others, e.g. fused expert weights, stay
replicated), or from the layer names (attention ``q/k/v`` and MLP ``up/gate`` column-parallel,
``o`` / ``down`` row-parallel, ``c_attn`` / ``qkv_proj`` / ``gate_up_proj`` packed).
Modules the plan does not cover (norms, routers) compute replicated.

Each direct child of a block sits on the residual stream. A child whose parameters are all
covered by the plan (attention, MLP) receives its input whole once, at its entry, so its
column-parallel projections share one backward reduction (reduce-scatter with SP). Any other
child with parameters runs replicated on plain tensors (gathered from the token shards under
SP). SDPA and everything between the projections see local tensors.

Under SP a rank holds a contiguous chunk of the flattened ``[batch x seq]`` tokens, shaped
``[batch, seq / tp, ...]`` (``relayout.own_tokens``): batch-first, those chunks gather and
reduce-scatter as whole contiguous buffers, where sequence chunks would need a copy around every
collective.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from galvatron.errors import PlanError
from galvatron.runtime.relayout import (
    EnterTensorParallel,
    GatherFromSequenceParallel,
    LeaveTensorParallel,
    ScatterToSequenceParallel,
    SumGradients,
    map_hidden,
    map_output,
)

COLWISE = frozenset({
    "q_proj", "k_proj", "v_proj", "query", "key", "value", "wq", "wk", "wv",
    "up_proj", "gate_proj", "w1", "w3", "fc1", "fc_in", "c_fc", "dense_h_to_4h",
})
ROWWISE = frozenset({"o_proj", "out_proj", "wo", "dense", "c_proj", "down_proj", "w2", "fc2", "fc_out",
                     "dense_4h_to_h"})
PACKED = frozenset({"c_attn", "qkv_proj", "Wqkv", "gate_up_proj"})
STYLES = ("colwise", "rowwise", "packed_colwise")
PACKED_MIN_TORCH = (2, 13)
"""Oldest torch whose ``_StridedShard`` shards a fused projection on a 1-D mesh (2.11 cannot)."""
_SPLIT_SIZE_ATTRS = ("split_size",)
"""Attributes by which a parent splits a packed projection's output (GPT-2): scaled by 1/tp."""


def is_projection(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (a linear layer storing its weight transposed)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a projection."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def _parts(name: str) -> int:
    return 2 if "gate_up" in name.rsplit(".", 1)[-1] else 3


def derive_block_plan(block: nn.Module) -> dict[str, str]:
    """``colwise``/``rowwise``/``packed_colwise`` for the block's projections, by their names."""
    plan = {}
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not is_projection(module):
            continue
        for style, names in (("colwise", COLWISE), ("rowwise", ROWWISE), ("packed_colwise", PACKED)):
            if leaf in names:
                plan[name] = style
    return plan


def hf_block_plan(model: nn.Module, block_path: str) -> dict[str, str] | None:
    """The block-relative part of a Hugging Face ``base_model_tp_plan`` (None without one)."""
    raw = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not raw:
        return None
    plan = {}
    for key, style in raw.items():
        prefix, sep, rest = key.partition("*.")
        if sep and block_path.endswith(prefix.rstrip(".")) and style in STYLES:
            plan[rest] = style
    return plan


def resolve_block_plan(block: nn.Module, plans: list[Mapping[str, str] | None], path: str) -> dict[str, str]:
    """The first non-empty plan of ``plans`` expanded over ``block``'s projections and checked:
    every module with column-parallel layers also has row-parallel ones, and the reverse."""
    layers = {name for name, m in block.named_modules() if is_projection(m)}
    chosen = next((p for p in plans if p), None)
    plan: dict[str, str] = {}
    for pattern, style in (chosen or {}).items():
        if style not in STYLES:
            raise PlanError(f"{path}.tp", f"tp_plan style {style!r} for {pattern!r} is not one of {STYLES}")
        plan.update({name: style for name in layers if fnmatch.fnmatchcase(name, pattern)})
    if not plan:
        raise PlanError(f"{path}.tp", f"cannot derive a tensor-parallel plan for {type(block).__name__} "
                        "(no q/k/v/o or up/gate/down projections); pass wrap(..., tp_plan={...})")
    parents: dict[str, set[str]] = {}
    for name, style in plan.items():
        if "." not in name:
            raise PlanError(f"{path}.tp", f"tp_plan entry {name!r} must be inside a submodule of the block")
        parents.setdefault(name.rsplit(".", 1)[0], set()).add("rowwise" if style == "rowwise" else "colwise")
    packed = [name for name, style in plan.items() if style == "packed_colwise"]
    if packed and torch_version() < PACKED_MIN_TORCH:
        raise PlanError(f"{path}.tp", f"tensor parallelism of the fused projection {packed[0]} needs torch >= "
                        f"{'.'.join(map(str, PACKED_MIN_TORCH))} (this is {torch.__version__}); use tp 1 here")
    for parent, kinds in parents.items():
        if len(kinds) == 1:
            raise PlanError(f"{path}.tp", f"{type(block).__name__}.{parent} has only {kinds.pop()} layers in its "
                            "tensor-parallel plan; a module needs both column- and row-parallel layers")
    return plan


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def check_divisible(block: nn.Module, plan: Mapping[str, str], tp: int, path: str) -> None:
    """Raise unless every planned projection splits evenly over ``tp`` ranks."""
    for name, style in plan.items():
        fan_in, fan_out = _features(block.get_submodule(name))
        size = fan_in if style == "rowwise" else fan_out
        parts = _parts(name) if style == "packed_colwise" else 1
        if size % (tp * parts):
            raise PlanError(f"{path}.tp", f"{tp} does not divide the {size // parts} features of {name} ({style})")


class ShardedProjection(ParallelStyle):
    """A column- or row-parallel projection, for ``parallelize_module``.

    The parameters become DTensors over the TP mesh: column-parallel weight and bias split on the
    output features (``parts`` > 1: each part of the weight split, ``_StridedShard``, and the bias
    replicated), row-parallel weight split on the input features and bias replicated. The projection
    then computes on plain local tensors (``DTensor.to_local()`` of its parameters), as Megatron's
    layers do, so DTensor's per-op dispatch stays out of the activations' path. Column-parallel: the
    input is whole, the output this rank's slice of the features; inside a module whose projections
    the plan all covers (``entered``) the module's entry made the input so
    (:class:`~galvatron.runtime.relayout.EnterTensorParallel`), otherwise the projection enters
    itself. Row-parallel: the input is the local slice, the output summed over the group
    (:class:`~galvatron.runtime.relayout.LeaveTensorParallel`: all-reduced, or with
    ``sequence_parallel`` reduce-scattered into this rank's token shard), then the bias added.
    ``functional``: its forward collectives are functional ones (a selectively recomputed block's, so
    that recomputation keeps their outputs: :mod:`galvatron.runtime.relayout`).
    """

    def __init__(self, style: str, parts: int = 1, sequence_parallel: bool = False, entered: bool = False,
                 functional: bool = False) -> None:
        super().__init__()
        self.style, self.parts, self.sequence_parallel, self.entered = style, parts, sequence_parallel, entered
        self.functional = functional

    def _placements(self, module: nn.Module) -> tuple[Placement, Placement]:
        out_dim, in_dim = (0, 1) if isinstance(module, nn.Linear) else (1, 0)
        if self.style == "rowwise":
            return Shard(in_dim), Replicate()
        if self.parts > 1:  # a strided bias does not compose with FSDP's sharding of the same dim
            return _StridedShard(out_dim, split_factor=self.parts), Replicate()
        return Shard(out_dim), Shard(0)

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        weight, bias = self._placements(module)
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = weight if pname == "weight" else bias
            module.register_parameter(pname, nn.Parameter(distribute_tensor(param, device_mesh, [placement]),
                                                          requires_grad=param.requires_grad))
        group, rank, tp = device_mesh.get_group(), device_mesh.get_local_rank(), device_mesh.size()
        linear = isinstance(module, nn.Linear)
        rowwise, parts, sp, entered = self.style == "rowwise", self.parts, self.sequence_parallel, self.entered
        functional = self.functional

        def local_bias() -> torch.Tensor | None:
            b = module.bias.to_local() if module.bias is not None else None
            if b is None or not ((rowwise and sp) or parts > 1):
                return b
            b = SumGradients.apply(b, group)  # each rank adds it to other tokens, or uses its own slices
            if parts > 1:
                width = b.numel() // (parts * tp)
                b = b.view(parts, -1).narrow(1, rank * width, width).reshape(-1)
            return b

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not rowwise and not entered:
                x = _enter(x, group, False)
            w, b = module.weight.to_local(), local_bias()
            if linear:
                out = F.linear(x, w, None if rowwise else b)
            else:  # transformers' Conv1D: weight (in, out)
                out = (x.reshape(-1, x.shape[-1]) @ w).view(*x.shape[:-1], w.shape[1])
                if b is not None and not rowwise:
                    out = out + b
            if rowwise:
                out = LeaveTensorParallel.apply(out, group, sp, functional)
                if b is not None:
                    out = out + b
            return out

        module.forward = forward
        return module


def apply_tensor_parallel(block: nn.Module, plan: Mapping[str, str], tp_mesh: Any, sp: bool,
                          functional: bool = False) -> None:
    """Shard ``block`` over the 1-D ``tp_mesh`` by ``plan``; with ``sp`` its input and output
    are token shards (:func:`galvatron.runtime.relayout.own_tokens`, shaped as sequence chunks) and
    its norms run on them. ``functional``: forward collectives as functional ones (for selective
    recomputation, which then keeps their outputs)."""
    tp = tp_mesh.size()
    for child_name, child in block.named_children():
        names = {n: s for n, s in plan.items() if n.split(".", 1)[0] == child_name}
        covered = _covered(child_name, child, plan)
        styles = {n.split(".", 1)[1]: ShardedProjection(s, _parts(n) if s == "packed_colwise" else 1, sp and covered,
                                                        covered, functional)
                  for n, s in names.items()}
        if styles:
            parallelize_module(child, tp_mesh, styles)
        for name, style in names.items():
            if style == "packed_colwise":
                _scale_split_sizes(block, name, tp)
        if covered:
            child.register_forward_pre_hook(_entry(tp_mesh.get_group(), sp, functional), with_kwargs=True)
        elif sp and _is_norm(child):
            _sequence_parallel_norm(child, tp_mesh.get_group())
        elif sp and any(True for _ in child.parameters()):
            group = tp_mesh.get_group()
            child.register_forward_pre_hook(
                lambda m, a, k, g=group: map_hidden(a, k, lambda x: GatherFromSequenceParallel.apply(x, g, functional)),
                with_kwargs=True)
            child.register_forward_hook(
                lambda m, a, out, g=group: map_output(out, lambda x: ScatterToSequenceParallel.apply(x, g)))


def _covered(child_name: str, child: nn.Module, plan: Mapping[str, str]) -> bool:
    """Whether the plan holds every parameterised module of the block's child ``child_name``."""
    return any(n.split(".", 1)[0] == child_name for n in plan) and all(
        f"{child_name}.{n}" in plan or not any(True for _ in m.parameters(recurse=False))
        for n, m in child.named_modules() if n)


def apply_input_casts(block: nn.Module) -> list[Any]:
    """Under autocast, cast the input of each of ``block``'s children whose parameters are all
    projections that the names of :func:`derive_block_plan` place (attention, MLP) to 16 bits once,
    at the child's entry (:func:`autocast_input`), as tensor parallelism's entry does: its linears
    compute on the same values and share that copy, where autocast casts the input once per linear and
    each keeps its copy. A child whose hidden states cannot be found is left alone. Returns the hooks'
    handles (the profiler removes them after measuring)."""
    plan = derive_block_plan(block)
    return [child.register_forward_pre_hook(_cast_entry, with_kwargs=True)
            for child_name, child in block.named_children()
            if _covered(child_name, child, plan) and any(
                n.split(".", 1)[0] == child_name and style != "rowwise" for n, style in plan.items())]


def _cast_entry(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    try:
        return map_hidden(args, kwargs, autocast_input)
    except TypeError:
        return args, kwargs


def _scale_split_sizes(block: nn.Module, name: str, tp: int) -> None:
    """A parent that splits a packed projection's (now local) output by a stored part size."""
    parent = block.get_submodule(name.rsplit(".", 1)[0])
    part = _features(block.get_submodule(name))[1] // _parts(name)
    for attr in _SPLIT_SIZE_ATTRS:
        if getattr(parent, attr, None) == part:
            setattr(parent, attr, part // tp)


def _entry(group: Any, sp: bool, functional: bool = False) -> Any:
    """A covered child's input made whole for its column-parallel projections, once for all of them:
    cast to autocast's dtype (:func:`autocast_input`), then under ``sp`` all-gathered from the token
    shards (:func:`galvatron.runtime.relayout.own_tokens`) along the flattened tokens, so the gather and
    its backward reduce-scatter work on contiguous buffers; backward sums the projections' partial
    input gradients over the group (:class:`~galvatron.runtime.relayout.EnterTensorParallel`)."""

    return lambda module, args, kwargs: map_hidden(args, kwargs, lambda x: _enter(x, group, sp, functional))


def _enter(x: torch.Tensor, group: Any, sp: bool, functional: bool = False) -> torch.Tensor:
    """``x`` cast to autocast's dtype (:func:`autocast_input`), then made whole for column-parallel
    projections (:class:`~galvatron.runtime.relayout.EnterTensorParallel`)."""
    return EnterTensorParallel.apply(autocast_input(x), group, sp, functional)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's 16-bit dtype where autocast is on for its device and ``x`` is fp32, else ``x``.

    A module whose parameters are all projections (attention, MLP) gets its input (the norm's output:
    fp32 on autocast's fp32 residual stream) cast once at its entry; under sequence parallelism on the
    token shard before the all-gather, as Megatron gathers 16-bit activations. Its linears compute on
    the same values as if each cast the input itself (autocast casts once per linear: three full-width
    copies for q, k and v, each kept for backward), so they share one copy; the all-gather, or without
    SP the backward all-reduce, moves half the bytes; in backward the linears' input gradients are summed
    (and reduced over TP) in 16 bits, then cast up once."""
    kind = x.device.type
    if x.dtype != torch.float32 or not torch.is_autocast_enabled(kind):
        return x
    dtype = torch.get_autocast_dtype(kind)
    return x.to(dtype) if dtype in (torch.bfloat16, torch.float16) else x


def _sequence_parallel_norm(norm: nn.Module, group: Any) -> None:
    """A norm on the token shards (Megatron's sequence-parallel LayerNorm): it computes on plain local
    tensors, and each of its parameters, which every rank applies to other tokens, enters the forward
    through :class:`~galvatron.runtime.relayout.SumGradients`, so its gradient is summed over the TP
    group. The swap happens at the norm's call, so it also wraps the unsharded parameters FSDP2 puts in
    place before the block runs."""
    names = [n for n, p in norm.named_parameters(recurse=False) if p.requires_grad]

    def swap_in(module: nn.Module, args: tuple) -> None:
        params = module._parameters
        module._galvatron_sp_params = {n: params[n] for n in names}
        for n in names:
            params[n] = SumGradients.apply(params[n], group)  # type: ignore[assignment]

    def swap_out(module: nn.Module, args: tuple, out: Any) -> None:
        module._parameters.update(module.__dict__.pop("_galvatron_sp_params", {}))

    norm.register_forward_pre_hook(swap_in)
    norm.register_forward_hook(swap_out, always_call=True)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("Norm", "RMSNorm"))


def find_vocab_modules(edges: list[nn.Module], vocab: int | None) -> tuple[nn.Embedding | None, nn.Linear | None]:
    """The token embedding (largest ``nn.Embedding``) and the LM head (``nn.Linear`` with
    ``vocab`` outputs) among the modules outside the blocks."""
    embeddings = [m for e in edges for m in e.modules() if isinstance(m, nn.Embedding)]
    embedding = max(embeddings, key=lambda m: m.num_embeddings, default=None)
    vocab = vocab or (embedding.num_embeddings if embedding is not None else None)
    heads = [m for e in edges for m in e.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return embedding, (heads[-1] if heads else None)


def apply_vocab_parallel_embedding(embedding: nn.Embedding, tp_mesh: Any) -> None:
    """Shard the embedding table over the vocabulary (as ``torch.chunk``: uneven shards where tp
    does not divide it); the output is replicated.

    Megatron's ``VocabParallelEmbedding`` on plain local tensors: each rank looks up the tokens its
    rows hold, zeros for the others, and the output is summed over the group
    (:class:`~galvatron.runtime.relayout.LeaveTensorParallel`). DTensor's vocabulary-parallel embedding
    computes the same, but keeps its token mask in the output's placement, which ``torch.compile``
    carries from one trace into the next (pytorch/pytorch#160697): a compiled model with a graph break
    failed. Embeddings with ``max_norm``, ``scale_grad_by_freq`` or ``sparse`` keep DTensor's."""
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
        return
    weight = embedding.weight
    embedding.weight = nn.Parameter(distribute_tensor(weight, tp_mesh, [Shard(0)]), requires_grad=weight.requires_grad)
    group, vocab, padding = tp_mesh.get_group(), embedding.num_embeddings, embedding.padding_idx
    start = -(-vocab // tp_mesh.size()) * tp_mesh.get_local_rank()

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        w = embedding.weight.to_local()
        local = tokens - start
        outside = (local < 0) | (local >= w.shape[0])
        pad = padding - start if padding is not None and 0 <= padding - start < w.shape[0] else None
        out = F.embedding(local.masked_fill(outside, 0), w, pad).masked_fill(outside.unsqueeze(-1), 0.0)
        return LeaveTensorParallel.apply(out, group, False)

    embedding.forward = forward


def apply_vocab_parallel_head(head: nn.Linear, tp_mesh: Any) -> None:
    """Shard the LM head over the vocabulary (uneven shards where tp does not divide it, as the
    embedding's); its logits are a DTensor sharded on the last dim,
    which a loss under ``torch.distributed.tensor.parallel.loss_parallel()`` never gathers."""
    parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
