"""Activation recomputation per layer (Chen et al. 2016; Korthikanti et al. 2022).

- ``full``: the whole layer's forward runs under non-reentrant ``torch.utils.checkpoint``;
  only its inputs are kept, everything inside is recomputed in backward.
- ``selective``: a selective-checkpoint policy that keeps the outputs of matrix multiplications
  (the linear layers: most of the FLOPs) and of collectives, and recomputes everything else:
  the attention core (scaled-dot-product attention, softmax, dropout), norms, activations and
  rotary embeddings. This is Korthikanti's attention-core recomputation widened to all cheap
  elementwise work, which needs no knowledge of the layer's code. An eager attention's score
  matmuls count as matmuls and are kept.

The layer keeps its parameter names (its ``forward`` is wrapped in place, no wrapper module),
and module hooks (FSDP, re-layout) stay outside the recomputed region.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from galvatron.plan import Recompute


def _ops(namespace: Any, names: tuple[str, ...]) -> set[Any]:
    return {getattr(namespace, n) for n in names if hasattr(namespace, n)}


_SAVED_OPS = frozenset(
    _ops(torch.ops.aten, ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm"))
    | _ops(torch.ops._c10d_functional, ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
                                         "all_to_all_single", "wait_tensor"))
)


def _matmuls_and_collectives_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.MUST_SAVE if packet in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_matmuls_and_collectives_policy)


def apply_recompute(module: nn.Module, mode: Recompute) -> None:
    """Recompute ``module``'s activations in backward according to ``mode``."""
    if mode is Recompute.NONE:
        return
    forward = module.forward
    extra = {"context_fn": _selective_contexts} if mode is Recompute.SELECTIVE else {}

    @functools.wraps(forward)
    def recomputed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    module.forward = recomputed
