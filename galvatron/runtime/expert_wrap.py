"""Expert parallelism for unmodified MoE layers, recognised by their structure.

Three structures are recognised (:class:`MoEKind`):

- ``module_list``: a ``router`` module, a ``route(tokens) -> (index, weights)`` method, ``experts`` as an
  ``nn.ModuleList`` of MLPs and ``shared`` experts as an ``nn.ModuleList`` (galvatron's reference ``MoE``).
- ``fused``: a ``gate`` router returning ``(logits, weights, index)`` and ``experts`` holding fused 3-D
  ``gate_up_proj`` (experts, 2 * ffn, hidden) and ``down_proj`` (experts, hidden, ffn) parameters
  (transformers 5 Mixtral and Qwen3-MoE sparse blocks).
- ``fused_gated_shared``: ``fused`` plus a ``shared_expert`` scaled by ``sigmoid(shared_expert_gate(x))``
  (transformers 5 Qwen2-MoE).

:func:`apply_expert_parallel` patches each such layer in place: its experts are cut to this rank's
share (parameter names unchanged: a ModuleList becomes a ModuleDict keyed by the global expert index,
a fused tensor keeps its name with fewer experts), and its ``forward`` becomes the dispatch/combine of
:func:`galvatron.runtime.expert.routed_experts` around the user's own router and experts.

The load-balancing loss is passed through: the reference MoE's ``aux_loss`` is recomputed with
statistics summed over ``aux_group`` (the batch's ``dp * cp`` ranks), so it equals a single-process
run on the whole batch; Hugging Face models compute theirs outside the block from the router logits,
which the user's router still records, over each rank's own tokens (as under plain data parallelism).
"""

from __future__ import annotations

import enum
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from galvatron.errors import GalvatronError, PlanError
from galvatron.runtime.expert import (
    DropPolicy,
    Group,
    group_rank,
    group_size,
    load_balancing_loss,
    routed_experts,
)
from galvatron.runtime.relayout import GatherFromSequenceParallel, ScatterToSequenceParallel, own_tokens


class MoEKind(enum.StrEnum):
    """Structure of a recognised MoE layer."""

    MODULE_LIST = "module_list"
    FUSED = "fused"
    FUSED_GATED_SHARED = "fused_gated_shared"


@dataclass(frozen=True, kw_only=True)
class ExpertParallelState:
    """What :func:`apply_expert_parallel` did to one layer (kept on it as ``_galvatron_ep``)."""

    kind: MoEKind
    num_experts: int
    """Routed experts of the whole layer."""
    local_experts: range
    """Global indices of the experts this rank holds."""
    ep_group: Group
    aux_group: Group
    tp_group: Group
    sequence_group: Group
    """MoE Parallel Folding: ranks that hold the same tokens, each routing its chunk of them
    (``relayout.own_tokens``; ``None``: this rank routes all of them)."""
    capacity_factor: float | None
    drop_policy: DropPolicy


_STATE = "_galvatron_ep"
_LOAD = "_galvatron_ep_load"
_CAST = "_galvatron_expert_casts"


# ------------------------------------------------------------------------------------ recognition
def moe_kind(module: nn.Module) -> MoEKind | None:
    """The :class:`MoEKind` of ``module``, or None when it is not a recognised MoE layer."""
    experts = getattr(module, "experts", None)
    if (isinstance(experts, nn.ModuleList | nn.ModuleDict) and callable(getattr(module, "route", None))
            and isinstance(getattr(module, "router", None), nn.Module)
            and isinstance(getattr(module, "shared", None), nn.ModuleList)):
        return MoEKind.MODULE_LIST
    gate = getattr(module, "gate", None)
    if isinstance(gate, nn.Module) and isinstance(getattr(gate, "top_k", None), int) and _is_fused(experts):
        if isinstance(getattr(module, "shared_expert", None), nn.Module) and isinstance(
                getattr(module, "shared_expert_gate", None), nn.Module):
            return MoEKind.FUSED_GATED_SHARED
        return MoEKind.FUSED
    return None


def _is_fused(experts: object) -> bool:
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (isinstance(experts, nn.Module) and isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3 and isinstance(getattr(experts, "num_experts", None), int))


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoEKind]]:
    """``(path, kind)`` of every recognised MoE layer in ``model``, in module order."""
    found = []
    for path, module in model.named_modules():
        kind = moe_kind(module)
        if kind is not None:
            found.append((path, kind))
    return found


# ---------------------------------------------------------------------------------------- apply
def apply_expert_parallel(model: nn.Module, ep_group: Group, *, aux_group: Group = None, tp_group: Group = None,
                          sequence_group: Group = None, capacity_factor: float | None = None,
                          drop_policy: DropPolicy | str = DropPolicy.PROBS) -> list[tuple[str, MoEKind]]:
    """Shard and patch, in place, every MoE layer of ``model`` (a whole model or one block).

    ``ep_group`` splits the experts (``None``: all experts on this rank); ``aux_group``, the ranks that
    share the batch, makes the reference MoE's load-balancing loss global; ``tp_group`` splits every
    expert's MLP (expert tensor parallelism; the tokens must be the same on its ranks).
    ``sequence_group`` (MoE Parallel Folding): ranks holding the same (batch, sequence, hidden) tokens,
    of which rank ``i`` (with its ``tp_group``) routes the ``i``-th chunk of the sequence; the layer's
    output gathers the chunks, so the router and shared experts still see every token.
    ``capacity_factor`` switches from dropless routing to token dropping. Returns the layers patched;
    raises if there are none or one was patched before.
    """
    if capacity_factor is not None and capacity_factor <= 0:
        raise PlanError("capacity_factor", f"{capacity_factor!r} is not a positive number")
    layers = find_moe_layers(model)
    if not layers:
        raise GalvatronError(f"no MoE layer recognised in {type(model).__name__}")
    for path, kind in layers:
        module = model.get_submodule(path)
        if hasattr(module, _STATE):
            raise GalvatronError(f"MoE layer {path or type(model).__name__!r} is already expert-parallel")
        if _has_dtensor(module.experts):
            raise GalvatronError(f"the experts of {path!r} are already tensor-parallel (DTensor): leave "
                                 "'*.experts.*' out of the TP plan and pass tp_group (expert TP) instead")
        num_experts = _num_experts(module, kind)
        ep, rank = group_size(ep_group), group_rank(ep_group)
        if num_experts % ep:
            raise PlanError("ep", f"{ep} does not divide the {num_experts} experts of {path!r}")
        per_rank = num_experts // ep
        state = ExpertParallelState(
            kind=kind, num_experts=num_experts, local_experts=range(rank * per_rank, (rank + 1) * per_rank),
            ep_group=ep_group, aux_group=aux_group, tp_group=tp_group, sequence_group=sequence_group,
            capacity_factor=capacity_factor,
            drop_policy=DropPolicy(drop_policy))
        _SHARD[kind](module, state, path)
        object.__setattr__(module, _STATE, state)
        module.forward = types.MethodType(_FORWARD[kind], module)
    return layers


def apply_expert_casts(model: nn.Module) -> list[str]:
    """Make every fused-experts module of ``model`` (3-D ``gate_up_proj`` and ``down_proj``) compute
    with its weights in autocast's dtype while autocast is on: their implementation sees 16-bit
    copies, whose gradients autocast's own cast backward brings to the fp32 parameters, as it does for
    every linear. Without it, Hugging Face's ``grouped_mm`` experts cast the tokens to the weights'
    dtype and run the grouped GEMM outside autocast, in fp32 over fp32 parameters (16x slower on an
    H100: benchmarks/results/grouped_gemm_dtype.json), and its ``eager`` experts give every expert's
    slice a full-size fp32 gradient. Outside autocast, or on 16-bit parameters, the module runs as it
    is. Returns the modules' paths (a module patched before is left alone)."""
    patched = []
    for path, module in model.named_modules():
        if _is_fused(module) and not hasattr(module, _CAST):
            object.__setattr__(module, _CAST, True)
            module.forward = types.MethodType(_forward_cast, module)
            patched.append(path)
    return patched


def _forward_cast(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
    forward = type(self).forward
    device = self.gate_up_proj.device.type
    if not torch.is_autocast_enabled(device):
        return forward(self, *args, **kwargs)
    low = torch.get_autocast_dtype(device)
    casts = {name: p.to(low) for name, p in self._parameters.items()
             if p is not None and p.is_floating_point() and p.dtype != low}
    if not casts:
        return forward(self, *args, **kwargs)
    kept = {name: self._parameters[name] for name in casts}
    self._parameters.update(casts)  # read as attributes by the implementation; restored below
    try:
        return forward(self, *args, **kwargs)
    finally:
        self._parameters.update(kept)


def expert_parallel_state(module: nn.Module) -> ExpertParallelState | None:
    """The state of a patched MoE layer, None for any other module."""
    return getattr(module, _STATE, None)


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the routed-expert containers of every patched layer: their parameters are
    the expert parameters (reduce over the expert data-parallel group; FSDP2 ``fully_shard`` them on it)."""
    return [(f"{path}.experts" if path else "experts", module.experts)
            for path, module in model.named_modules() if hasattr(module, _STATE)]


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the expert parameters of every patched layer."""
    return {f"{path}.{name}" for path, experts in expert_modules(model) for name, _ in experts.named_parameters()}


def expert_load(model: nn.Module) -> list[list[int]]:
    """Per patched layer (in module order), the assignments each local expert of this rank received in
    the last forward: the routing imbalance a cost model needs is max over ranks / mean of their sums."""
    return [list(getattr(m, _LOAD, [])) for m in model.modules() if hasattr(m, _STATE)]


@dataclass(frozen=True)
class ExpertShard:
    """Where one held expert tensor (a parameter, or an optimizer state shaped like it) lies in the
    full tensor of the single-process model: the checkpoint layout of expert parallelism."""

    shape: tuple[int, ...]
    """The full tensor's shape."""
    local_shape: tuple[int, ...]
    """The held tensor's shape."""
    pieces: tuple[tuple[int, int, int, tuple[int, ...]], ...]
    """``(dim, start, length, offsets)``: the held tensor's ``narrow(dim, start, length)`` is the block of
    the full tensor at ``offsets`` (a fused ``[gate; up]`` tensor has two)."""
    grid: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    """``(offsets, sizes)`` of every block of the full tensor, each once, whichever rank holds it."""

    def views(self, held: torch.Tensor) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """``(offsets in the full tensor, view of held)`` per piece."""
        return [(offsets, held.narrow(dim, start, length)) for dim, start, length, offsets in self.pieces]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The tensor this rank holds, cut from a full one."""
        if tuple(full.shape) != self.shape:
            raise GalvatronError(f"an expert tensor of shape {tuple(full.shape)} where {self.shape} was expected")
        parts = []
        for dim, _, length, offsets in self.pieces:
            sizes = [length if d == dim else n for d, n in enumerate(self.local_shape)]
            parts.append(full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))])
        return torch.cat(parts, dim=self.pieces[0][0])


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """:class:`ExpertShard` of every expert parameter this rank holds, by name in ``model``."""
    shards = {}
    for path, module in model.named_modules():
        state = expert_parallel_state(module)
        if state is not None:
            prefix = f"{path}.experts." if path else "experts."
            for name, param in module.experts.named_parameters():
                shards[prefix + name] = _expert_shard(state, name, tuple(param.shape))
    return shards


def _expert_shard(state: ExpertParallelState, name: str, local: tuple[int, ...]) -> ExpertShard:
    """The layout :func:`_shard_module_list` and :func:`_shard_fused` produce, for every holder: ``parts``
    blocks of ``width`` along ``dim``, part ``j`` of tp rank ``r`` at ``(j * tp + r) * width``; fused tensors
    also hold ``len(local_experts)`` experts along dim 0."""
    tp, rank = group_size(state.tp_group), group_rank(state.tp_group)
    if state.kind is MoEKind.MODULE_LIST:
        split = _mlp_split_dim(name.split(".", 1)[1]) if tp > 1 else None
        dim, parts, starts, mine = split or 0, 1, [None], None
        if split is None:
            tp, rank = 1, 0
    else:
        dim, parts = (2, 1) if name == "down_proj" else (1, 2)
        starts, mine = range(0, state.num_experts, len(state.local_experts)), state.local_experts.start
    width = local[dim] // parts

    def offsets(start: int | None, part: int, r: int) -> tuple[int, ...]:
        at = [0] * len(local)
        at[dim] = (part * tp + r) * width
        if start is not None:
            at[0] = start
        return tuple(at)

    shape, sizes = list(local), list(local)
    shape[dim], sizes[dim] = local[dim] * tp, width
    if mine is not None:
        shape[0] = state.num_experts
    return ExpertShard(shape=tuple(shape), local_shape=local,
                       pieces=tuple((dim, j * width, width, offsets(mine, j, rank)) for j in range(parts)),
                       grid=tuple((offsets(s, j, r), tuple(sizes)) for s in starts for j in range(parts)
                                  for r in range(tp)))


def _has_dtensor(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _num_experts(module: nn.Module, kind: MoEKind) -> int:
    return len(module.experts) if kind is MoEKind.MODULE_LIST else module.experts.num_experts


# ------------------------------------------------------------------------------------- sharding
def _shard_rows(weight: torch.Tensor, dim: int, tp_group: Group) -> nn.Parameter:
    """This tp rank's contiguous slice of ``weight`` along ``dim``."""
    tp, rank = group_size(tp_group), group_rank(tp_group)
    if weight.shape[dim] % tp:
        raise PlanError("tp", f"{tp} does not divide an expert dimension of size {weight.shape[dim]}")
    return nn.Parameter(weight.detach().chunk(tp, dim=dim)[rank].clone(), requires_grad=weight.requires_grad)


def _shard_module_list(module: nn.Module, state: ExpertParallelState, path: str) -> None:
    experts = {str(e): module.experts[e] for e in state.local_experts}
    if group_size(state.tp_group) > 1:
        for e, expert in experts.items():
            _shard_mlp(expert, state.tp_group, f"{path}.experts.{e}")
    module.experts = nn.ModuleDict(experts)


def _mlp_split_dim(name: str) -> int | None:
    """The dim along which :func:`_shard_mlp` splits an expert MLP's parameter (None: kept whole)."""
    if name.startswith(("up_proj.", "gate_proj.")):
        return 0
    return 1 if name == "down_proj.weight" else None


def _shard_mlp(expert: nn.Module, tp_group: Group, path: str) -> None:
    """Column-split ``up_proj``/``gate_proj`` and row-split ``down_proj`` of one MLP expert."""
    down = getattr(expert, "down_proj", None)
    columns = [getattr(expert, name, None) for name in ("up_proj", "gate_proj")]
    if not isinstance(down, nn.Linear) or not isinstance(columns[0], nn.Linear):
        raise GalvatronError(f"expert tensor parallelism needs up_proj/down_proj Linear layers in {path!r}")
    if down.bias is not None:
        raise GalvatronError(f"expert tensor parallelism of {path!r}: a down_proj bias is not supported")
    for linear in columns:
        if isinstance(linear, nn.Linear):
            linear.weight = _shard_rows(linear.weight, 0, tp_group)
            if linear.bias is not None:
                linear.bias = _shard_rows(linear.bias, 0, tp_group)
    down.weight = _shard_rows(down.weight, 1, tp_group)


def _shard_fused(module: nn.Module, state: ExpertParallelState, path: str) -> None:
    experts = module.experts
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) or not getattr(
            experts, "is_concatenated", True):
        raise GalvatronError(f"{path!r}: only concatenated [gate; up] experts without bias are supported")
    local = slice(state.local_experts.start, state.local_experts.stop)
    gate_up = experts.gate_up_proj.detach()[local]
    down = experts.down_proj.detach()[local]
    if group_size(state.tp_group) > 1:
        gate, up = gate_up.chunk(2, dim=1)
        gate_up = torch.cat([_shard_rows(gate, 1, state.tp_group), _shard_rows(up, 1, state.tp_group)], dim=1)
        down = _shard_rows(down, 2, state.tp_group)
        experts.intermediate_dim = down.shape[2]
    experts.gate_up_proj = nn.Parameter(gate_up.clone(), requires_grad=experts.gate_up_proj.requires_grad)
    experts.down_proj = nn.Parameter(down.clone(), requires_grad=experts.down_proj.requires_grad)
    experts.num_experts = len(state.local_experts)


_SHARD: dict[MoEKind, Callable[[nn.Module, ExpertParallelState, str], None]] = {
    MoEKind.MODULE_LIST: _shard_module_list,
    MoEKind.FUSED: _shard_fused,
    MoEKind.FUSED_GATED_SHARED: _shard_fused,
}


# -------------------------------------------------------------------------------------- forward
def _routed(module: nn.Module, shape: torch.Size, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
            run: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> torch.Tensor:
    """The routed experts' output for ``tokens`` (the layer's input of ``shape``, flattened)."""
    state: ExpertParallelState = getattr(module, _STATE)

    def run_and_count(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        object.__setattr__(module, _LOAD, counts)
        return run(rows, counts)

    def routed(tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return routed_experts(tokens, index, weights, run_and_count, num_experts=state.num_experts,
                              ep_group=state.ep_group, tp_group=state.tp_group,
                              capacity_factor=state.capacity_factor, drop_policy=state.drop_policy)

    group = state.sequence_group
    if group is None:
        return routed(tokens, index, weights)
    if len(shape) != 3:
        raise GalvatronError(f"MoE Parallel Folding routes sequence chunks of (batch, sequence, hidden) inputs; "
                             f"this MoE layer got {tuple(shape)}")

    def chunk(t: torch.Tensor) -> torch.Tensor:  # backward gathers the gradient: TP peers keep it whole
        return ScatterToSequenceParallel.apply(t.view(*shape[:2], -1), group).flatten(0, 1)

    out = routed(chunk(tokens), own_tokens(index.view(*shape[:2], -1), group).flatten(0, 1), chunk(weights))
    return GatherFromSequenceParallel.apply(out.view(shape[0], -1, shape[2]), group).flatten(0, 1)


def _run_module_list(experts: nn.ModuleDict, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each local expert on its rows; one with no rows is not called, so it gets no gradient (as in the
    reference MoE), and an expert that no rank used keeps ``grad = None`` after data-parallel reduction."""
    chunks = rows.split(counts)
    return torch.cat([expert(chunk) if len(chunk) else chunk for expert, chunk in zip(experts.values(), chunks)])


def _run_fused(experts: nn.Module, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The user's fused experts, each row routed to its local expert with weight one."""
    repeats = torch.tensor(counts, device=rows.device)
    local = torch.arange(len(counts), device=rows.device).repeat_interleave(repeats, output_size=rows.shape[0])
    return experts(rows, local.unsqueeze(1), torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device))


def _forward_module_list(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference MoE's forward with the routed experts expert-parallel."""
    state: ExpertParallelState = getattr(self, _STATE)
    tokens = x.reshape(-1, x.shape[-1])
    captured: list[torch.Tensor] = []
    hook = self.router.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        index, weights = self.route(tokens)
    finally:
        hook.remove()
    if state.aux_group is not None:
        self.aux_loss = load_balancing_loss(captured[-1], index, state.num_experts, state.aux_group)
    out = _routed(self, x.shape, tokens, index, weights, partial(_run_module_list, self.experts))
    for expert in self.shared:
        out = out + expert(tokens)
    return out.view(x.shape)


def _forward_fused(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The transformers 5 sparse-MoE-block forward (Mixtral, Qwen2-MoE, Qwen3-MoE) with expert parallelism."""
    shape = x.shape
    jitter = getattr(self, "jitter_noise", 0.0)
    if self.training and jitter > 0:
        x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
    tokens = x.reshape(-1, shape[-1])
    _, weights, index = self.gate(tokens)
    out = _routed(self, shape, tokens, index, weights, partial(_run_fused, self.experts))
    if hasattr(self, "shared_expert_gate"):
        out = out + F.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
    return out.reshape(shape)


_FORWARD: dict[MoEKind, Callable[..., torch.Tensor]] = {
    MoEKind.MODULE_LIST: _forward_module_list,
    MoEKind.FUSED: _forward_fused,
    MoEKind.FUSED_GATED_SHARED: _forward_fused,
}
