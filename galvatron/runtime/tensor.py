"""Tensor parallelism with DTensor (Megatron-LM, Shoeybi et al. 2019), Megatron sequence
parallelism for norms (Korthikanti et al. 2022), vocabulary-parallel embedding and head.

A block's TP plan maps its ``nn.Linear`` submodules to ``colwise`` / ``rowwise``. It comes,
in order of precedence, from the user (``wrap(..., tp_plan={...})``, names relative to a
block), from a Hugging Face model's ``config.base_model_tp_plan`` (its ``colwise``/``rowwise``
entries; others are left replicated), or from the module structure (attention ``q/k/v``
projections and MLP ``up/gate`` are column-parallel, ``o`` / ``down`` row-parallel).
Modules the plan does not cover (norms, routers, fused expert weights) compute replicated.

Each direct child of a block sits on the residual stream. A child whose parameters are all
covered by the plan (attention, MLP) receives its input as one replicated DTensor, so its
column-parallel projections share one backward reduction (reduce-scatter with SP). Any other
child with parameters runs replicated on plain tensors (gathered from the sequence shards
under SP). SDPA and everything between the projections see local tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from galvatron.errors import PlanError
from galvatron.runtime.relayout import GatherFromSequenceParallel, ScatterToSequenceParallel, map_hidden, map_output

COLWISE = frozenset({
    "q_proj", "k_proj", "v_proj", "query", "key", "value", "wq", "wk", "wv",
    "up_proj", "gate_proj", "w1", "w3", "fc1", "fc_in", "c_fc", "dense_h_to_4h",
})
ROWWISE = frozenset({"o_proj", "out_proj", "wo", "dense", "c_proj", "down_proj", "w2", "fc2", "fc_out",
                     "dense_4h_to_h"})
STYLES = ("colwise", "rowwise")


def derive_block_plan(block: nn.Module) -> dict[str, str]:
    """``colwise``/``rowwise`` for the block's linear layers, recognised by their names."""
    plan = {}
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and (leaf in COLWISE or leaf in ROWWISE):
            plan[name] = "colwise" if leaf in COLWISE else "rowwise"
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
    """The first non-empty plan of ``plans`` expanded over ``block``'s linear layers
    (``*`` wildcards allowed) and checked: every module with column-parallel layers also has
    row-parallel ones, and the reverse."""
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    chosen = next((p for p in plans if p), None)
    plan: dict[str, str] = {}
    for pattern, style in (chosen or {}).items():
        if style not in STYLES:
            raise PlanError(f"{path}.tp", f"tp_plan style {style!r} for {pattern!r} is not one of {STYLES}")
        plan.update({name: style for name in linears if fnmatch.fnmatchcase(name, pattern)})
    if not plan:
        raise PlanError(f"{path}.tp", f"cannot derive a tensor-parallel plan for {type(block).__name__} "
                        "(no q/k/v/o or up/gate/down linear layers); pass wrap(..., tp_plan={...})")
    parents: dict[str, set[str]] = {}
    for name, style in plan.items():
        if "." not in name:
            raise PlanError(f"{path}.tp", f"tp_plan entry {name!r} must be inside a submodule of the block")
        parents.setdefault(name.rsplit(".", 1)[0], set()).add(style)
    for parent, styles in parents.items():
        if styles != set(STYLES):
            raise PlanError(f"{path}.tp", f"{type(block).__name__}.{parent} has only {styles.pop()} layers "
                            "in its tensor-parallel plan; a module needs both colwise and rowwise")
    return plan


def check_divisible(block: nn.Module, plan: Mapping[str, str], tp: int, path: str) -> None:
    """Raise unless every planned linear layer splits evenly over ``tp`` ranks."""
    for name, style in plan.items():
        layer = block.get_submodule(name)
        size = layer.out_features if style == "colwise" else layer.in_features
        if size % tp:
            raise PlanError(f"{path}.tp", f"{tp} does not divide the {size} features of {name} ({style})")


def apply_tensor_parallel(block: nn.Module, plan: Mapping[str, str], tp_mesh: Any, sp: bool) -> None:
    """Shard ``block`` over the 1-D ``tp_mesh`` by ``plan``; with ``sp`` its input and output
    are sequence shards (dim 1) and its norms run on them."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for child_name, child in block.named_children():
        names = {n: s for n, s in plan.items() if n.split(".", 1)[0] == child_name}
        covered = bool(names) and all(
            f"{child_name}.{n}" in plan or not any(True for _ in m.parameters(recurse=False))
            for n, m in child.named_modules() if n
        )
        styles = {
            n.split(".", 1)[1]: ColwiseParallel() if s == "colwise" else RowwiseParallel(
                output_layouts=_shard_seq() if sp and covered else _replicate())
            for n, s in names.items()
        }
        if styles:
            parallelize_module(child, tp_mesh, styles)
        if covered:
            child.register_forward_pre_hook(_dtensor_entry(tp_mesh, sp), with_kwargs=True)
        elif sp and _is_norm(child):
            from torch.distributed.tensor.parallel import SequenceParallel

            parallelize_module(child, tp_mesh, SequenceParallel(use_local_output=True))
        elif sp and any(True for _ in child.parameters()):
            group = tp_mesh.get_group()
            child.register_forward_pre_hook(
                lambda m, a, k, g=group: map_hidden(a, k, lambda x: GatherFromSequenceParallel.apply(x, g)),
                with_kwargs=True)
            child.register_forward_hook(
                lambda m, a, out, g=group: map_output(out, lambda x: ScatterToSequenceParallel.apply(x, g)))


def _dtensor_entry(tp_mesh: Any, sp: bool) -> Any:
    from torch.distributed.tensor import DTensor

    placement = _shard_seq() if sp else _replicate()

    def to_replicated(x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, DTensor):
            return x
        return DTensor.from_local(x, tp_mesh, [placement], run_check=False).redistribute(tp_mesh, [_replicate()])

    return lambda module, args, kwargs: map_hidden(args, kwargs, to_replicated)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("Norm", "RMSNorm"))


def _shard_seq() -> Any:
    from torch.distributed.tensor import Shard

    return Shard(1)


def _replicate() -> Any:
    from torch.distributed.tensor import Replicate

    return Replicate()


def find_vocab_modules(edges: list[nn.Module], vocab: int | None) -> tuple[nn.Embedding | None, nn.Linear | None]:
    """The token embedding (largest ``nn.Embedding``) and the LM head (``nn.Linear`` with
    ``vocab`` outputs) among the modules outside the blocks."""
    embeddings = [m for e in edges for m in e.modules() if isinstance(m, nn.Embedding)]
    embedding = max(embeddings, key=lambda m: m.num_embeddings, default=None)
    vocab = vocab or (embedding.num_embeddings if embedding is not None else None)
    heads = [m for e in edges for m in e.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return embedding, (heads[-1] if heads else None)


def apply_vocab_parallel_embedding(embedding: nn.Embedding, tp_mesh: Any) -> None:
    """Shard the embedding table over the vocabulary; the output is replicated."""
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=_replicate(), output_layouts=_replicate()))


def apply_vocab_parallel_head(head: nn.Linear, tp_mesh: Any) -> None:
    """Shard the LM head over the vocabulary; its logits are a DTensor sharded on the last dim,
    which a loss under ``torch.distributed.tensor.parallel.loss_parallel()`` never gathers."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
