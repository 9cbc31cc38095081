"""Activation re-layout between layer groups with different ``dp x tp`` layouts, and Megatron's
sequence-parallel region boundaries, as tiny autograd functions (picotron style).

Gradient convention (what makes mixed layouts exact): the user's loss is a mean over the
samples a rank holds, so in a layer group split ``dp`` ways every rank holds ``dp`` times the
gradient of the global mean loss for its samples, and the group's gradient reduction averages
over ``dp``. Moving a batch from ``dp_a`` to ``dp_b`` shards therefore scales the gradient by
``dp_a / dp_b`` on the way back. Tensor-parallel peers hold identical (full) gradients of the
replicated activations between modules, so sequence gathers split gradients without reducing.
Every function skips its collective when the group has one rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from galvatron.runtime.mesh import Layout, ParallelDims, batch_groups, relayout_steps

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate ``x`` of every rank of ``group`` along ``dim``, in group-rank order."""
    k = dist.get_world_size(group)
    if k == 1:
        return x
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((k * x0.shape[0], *x0.shape[1:]))
    _all_gather_single(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def own_part(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of ``x`` split evenly along ``dim`` over ``group`` (a copy: a view
    would keep the whole of ``x`` alive and alias it)."""
    k = dist.get_world_size(group)
    if k == 1:
        return x
    if x.shape[dim] % k:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {k} ranks")
    size = x.shape[dim] // k
    return x.narrow(dim, dist.get_rank(group) * size, size).clone(memory_format=torch.contiguous_format)


class GatherBatch(torch.autograd.Function):
    """Fine batch shards -> one coarse shard: all-gather dim 0; backward takes the own slice,
    scaled by the group size (gradient convention above)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather(x, 0, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return own_part(grad, 0, ctx.group) * dist.get_world_size(ctx.group), None


class SplitBatch(torch.autograd.Function):
    """A coarse batch shard -> this rank's fine shard: slice dim 0; backward all-gathers the
    gradient, divided by the group size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return own_part(x, 0, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather(grad, 0, ctx.group) / dist.get_world_size(ctx.group), None


def own_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's sequence-parallel shard of ``x`` (``[d0, d1, ...]``, batch-first ``[batch, seq, ...]``):
    the group-rank'th of ``k`` contiguous chunks of its ``d0 * d1`` tokens (the first two dimensions
    flattened), shaped ``[d0, d1 / k, ...]`` (a copy, as :func:`own_part`).

    Megatron shards its sequence-first ``[seq, batch, hidden]`` stream on dimension 0, so every
    sequence-parallel collective moves whole contiguous buffers. Batch-first sequence chunks
    (``[batch, seq / k, hidden]``) would need a chunk-and-concatenate copy around each all-gather and
    reduce-scatter (DTensor's ``Shard(1)``); chunks of the flattened tokens need none, and the ops of a
    sequence-parallel region (norms, residual adds, dropout) are token-wise, so which tokens a rank
    holds does not matter to them. The local shape stays that of a sequence chunk."""
    k = dist.get_world_size(group)
    if k == 1:
        return x
    if x.dim() < 2 or x.shape[1] % k:
        raise ValueError(f"a tensor of shape {tuple(x.shape)} does not split its dimension 1 over {k} ranks")
    size = x.shape[0] * x.shape[1] // k
    part = x.flatten(0, 1).narrow(0, dist.get_rank(group) * size, size)
    return part.clone(memory_format=torch.contiguous_format).view(x.shape[0], x.shape[1] // k, *x.shape[2:])


def _waited(out: torch.Tensor) -> torch.Tensor:
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _funcol(name: str, older: str) -> Callable[..., torch.Tensor]:
    """A functional collective by its name, or by its older one (torch < 2.12), looked up at each call."""
    return getattr(funcol, name, None) or getattr(funcol, older)


# ``functional``: the collective returns its output (a functional collective), which selective
# recomputation keeps (``runtime.recompute``'s policy sees functional collectives only) instead of
# communicating again in backward; the forward of a selectively recomputed block asks for it. Elsewhere
# c10d's in-place collectives, with about a quarter of the host time (9 against 37 us on a fake group).
def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup, functional: bool = False) -> torch.Tensor:
    """The whole ``[d0, d1 * k, ...]`` tensor from every rank's :func:`own_tokens` shard ``x``: one
    all-gather into a contiguous buffer, no copy after it (``functional``: as a functional collective)."""
    k = dist.get_world_size(group)
    if k == 1:
        return x
    flat = x.contiguous().flatten(0, 1)
    if functional:
        out = _waited(_funcol("all_gather_single", "all_gather_tensor")(flat, 0, group))
    else:
        out = x.new_empty((k * flat.shape[0], *flat.shape[1:]))
        _all_gather_single(out, flat, group=group)
    return out.view(x.shape[0], x.shape[1] * k, *x.shape[2:])


def reduce_scatter_tokens(x: torch.Tensor, group: dist.ProcessGroup, functional: bool = False) -> torch.Tensor:
    """The sum of every rank's ``x`` (``[d0, d1, ...]``), this rank's :func:`own_tokens` shard of it: one
    reduce-scatter of the contiguous flattened tokens (``functional``: as a functional collective)."""
    k = dist.get_world_size(group)
    if k == 1:
        return x
    if x.shape[1] % k:
        raise ValueError(f"a tensor of shape {tuple(x.shape)} does not split its dimension 1 over {k} ranks")
    flat = x.contiguous().flatten(0, 1)
    if functional:
        out = _waited(_funcol("reduce_scatter_single", "reduce_scatter_tensor")(flat, "sum", 0, group))
    else:
        out = x.new_empty((flat.shape[0] // k, *flat.shape[1:]))
        _reduce_scatter_single(out, flat, group=group)
    return out.view(x.shape[0], x.shape[1] // k, *x.shape[2:])


class EnterTensorParallel(torch.autograd.Function):
    """Megatron's entry into a tensor-parallel module (``f``): forward the input as it is, or under
    sequence parallelism all-gather the token shards (:func:`gather_tokens`); backward sums the
    ranks' partial input gradients: all-reduce, or reduce-scatter into the token shards."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, sequence_parallel: bool,
                functional: bool = False) -> torch.Tensor:
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        return gather_tokens(x, group, functional) if sequence_parallel else x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.sequence_parallel:
            return reduce_scatter_tokens(grad, ctx.group), None, None, None
        grad = grad.contiguous()
        if dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None, None


class LeaveTensorParallel(torch.autograd.Function):
    """Megatron's exit from a tensor-parallel module (``g``): sum the ranks' partial outputs, all-reduced,
    or under sequence parallelism reduce-scattered into the token shards; backward passes the gradient
    on (all-gathered from the token shards under SP)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, sequence_parallel: bool,
                functional: bool = False) -> torch.Tensor:
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        if sequence_parallel:
            return reduce_scatter_tokens(x, group, functional)
        if dist.get_world_size(group) == 1:
            return x.view_as(x)
        if functional:
            return _waited(funcol.all_reduce(x.contiguous(), "sum", group))
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return (gather_tokens(grad, ctx.group) if ctx.sequence_parallel else grad), None, None, None


class SumGradients(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient: a replicated parameter each rank uses on
    different tokens (a row-parallel bias under sequence parallelism) gets the whole gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ScatterToSequenceParallel(torch.autograd.Function):
    """Megatron's entry into a sequence-parallel region: keep this rank's tokens (:func:`own_tokens`);
    backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return own_tokens(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return gather_tokens(grad, ctx.group), None


class GatherFromSequenceParallel(torch.autograd.Function):
    """Megatron's exit from a sequence-parallel region into replicated compute: all-gather the
    tokens (:func:`gather_tokens`); backward keeps this rank's part (the gradient is already full)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, functional: bool = False) -> torch.Tensor:
        ctx.group = group
        return gather_tokens(x, group, functional)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return own_tokens(grad, ctx.group), None, None


def batch_relayout(dims: ParallelDims, src: Layout, dst: Layout) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function moving a batch-major tensor from layout ``src`` to ``dst`` (identity when
    both split the batch the same number of ways)."""
    steps = []
    for kind, a, b in relayout_steps(src.dp, dst.dp):
        fine, coarse = (a, b) if kind == "gather" else (b, a)
        ranks = next(g for g in batch_groups(dims.ranks, fine, coarse) if dims.rank in g)
        steps.append((GatherBatch if kind == "gather" else SplitBatch, dims.group(ranks)))

    def move(x: torch.Tensor) -> torch.Tensor:
        for fn, group in steps:
            x = fn.apply(x, group)
        return x

    return move


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], batch: int | None = None) -> Any:
    """Apply ``fn`` to every tensor in nested tuples/lists/dicts whose dim 0 is ``batch``
    (every tensor when ``batch`` is None); other values pass through."""
    if isinstance(obj, torch.Tensor):
        if batch is None or (obj.dim() and obj.shape[0] == batch):
            return fn(obj)
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(v, fn, batch) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn, batch) for v in obj)
    if isinstance(obj, dict):
        return type(obj)({k: map_tensors(v, fn, batch) for k, v in obj.items()})
    return obj


def map_hidden(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    """Apply ``fn`` to a module's hidden states: its first positional argument, or the
    ``hidden_states`` keyword (Hugging Face layers)."""
    if args and isinstance(args[0], torch.Tensor):
        return (fn(args[0]), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    raise TypeError("cannot find the hidden states: expected a tensor as first argument or hidden_states=")


def map_output(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to a module's output hidden states: the output, or its first element."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return type(out)((fn(out[0]), *out[1:]))
    raise TypeError(f"cannot find the hidden states in a {type(out).__name__} output")


class ForwardContext:
    """What the re-layout hooks of one forward share: the layout the model's own code outside
    the blocks runs in (``outer``), its local batch size, and the tensors already re-laid out."""

    def __init__(self) -> None:
        self.outer: Layout | None = None
        self.batch: int | None = None
        self._cache: dict[tuple[int, Layout], tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self, outer: Layout, batch: int) -> None:
        self.outer, self.batch = outer, batch
        self._cache.clear()

    def cached(self, x: torch.Tensor, dst: Layout, move: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        hit = self._cache.get((id(x), dst))
        if hit is None or hit[0] is not x:
            hit = (x, move(x))
            self._cache[(id(x), dst)] = hit
        return hit[1]


def first_batch_size(args: tuple, kwargs: dict) -> int:
    """Dim 0 of the first tensor (depth first) among a call's arguments."""
    stack = [*reversed(kwargs.values()), *reversed(args)]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
        if isinstance(value, (tuple, list)):
            stack.extend(reversed(value))
        elif isinstance(value, dict):
            stack.extend(reversed(value.values()))
    raise TypeError("the model's inputs hold no batched tensor")


def install_group_relayouts(blocks: list[nn.Module], layout: Layout, next_layout: Layout, *,
                            sp_group: dist.ProcessGroup | None, dims: ParallelDims, ctx: ForwardContext) -> None:
    """Hooks that run one layer group's blocks in ``layout``.

    Every block gets the batch-major arguments made outside the blocks (hidden states entering
    the group, masks, positions: dim 0 = ``ctx.batch``) moved from ``ctx.outer`` to ``layout``;
    the first block also enters the sequence-parallel region (``sp_group``); the last block's
    output leaves it and moves to ``next_layout``.
    """
    moves: dict[Layout, Callable[[torch.Tensor], torch.Tensor]] = {}
    to_next = batch_relayout(dims, layout, next_layout) if layout.dp != next_layout.dp else None

    def enter(module: nn.Module, args: tuple, kwargs: dict, first: bool) -> tuple[tuple, dict]:
        outer = ctx.outer
        if outer is not None and ctx.batch is not None and outer.dp != layout.dp:
            if outer not in moves:
                moves[outer] = batch_relayout(dims, outer, layout)
            move = lambda x: ctx.cached(x, layout, moves[outer])
            args, kwargs = map_tensors(args, move, ctx.batch), map_tensors(kwargs, move, ctx.batch)
        if first and sp_group is not None:
            args, kwargs = map_hidden(args, kwargs, lambda x: ScatterToSequenceParallel.apply(x, sp_group))
        return args, kwargs

    def leave(module: nn.Module, args: tuple, out: Any) -> Any:
        if sp_group is not None:
            out = map_output(out, lambda x: GatherFromSequenceParallel.apply(x, sp_group))
        return map_output(out, to_next) if to_next is not None else out

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, k, first=i == 0: enter(m, a, k, first), with_kwargs=True)
    if sp_group is not None or to_next is not None:
        blocks[-1].register_forward_hook(leave)
