"""Activation recomputation per layer (Chen et al. 2016; Korthikanti et al. 2022).

- ``full``: the whole layer's forward runs under non-reentrant ``torch.utils.checkpoint``;
  only its inputs are kept, everything inside is recomputed in backward.
- ``selective``: Korthikanti's "attention core" recomputation, expressed as a selective
  checkpoint policy: the outputs of the scaled-dot-product-attention kernels, softmax and
  dropout are recomputed, every other op's output is saved. For fused (flash / memory
  efficient) SDPA this drops the attention output and softmax statistics; for an eager
  attention it drops the softmax and its dropout (the ``s x s`` score matmuls are kept).

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

_RECOMPUTED_OPS = frozenset(
    getattr(torch.ops.aten, name)
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
        "_scaled_dot_product_attention_math",
        "_softmax",
        "_safe_softmax",
        "native_dropout",
    )
    if hasattr(torch.ops.aten, name)
)


def _attention_core_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    packet = getattr(op, "overloadpacket", op)
    return CheckpointPolicy.PREFER_RECOMPUTE if packet in _RECOMPUTED_OPS else CheckpointPolicy.MUST_SAVE


def _selective_contexts() -> Any:
    return create_selective_checkpoint_contexts(_attention_core_policy)


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
