"""Context parallelism without processes: token layouts, position ids, labels, rank grids, masks,
loss and the wiring's checks."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from galvatron.errors import PlanError
from galvatron.models.gpt import GPT, GPTConfig
from galvatron.runtime.context import (
    ContextAttention,
    ContextGroups,
    _transformers_attention,
    _transformers_mask,
    apply_context_parallel,
    context_parallel_loss,
    hybrid_rank_grid,
    next_token_labels,
    sequence_layout,
    shard_batch,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from galvatron.runtime.context_kernels import BlockMask
from galvatron.runtime.context_ring import ring_mask
from galvatron.runtime.context_ulysses import kv_replication

KINDS = ("ulysses", "ring", "striped", "hybrid")


@pytest.mark.parametrize(("kind", "degree", "dim"), list(itertools.product(KINDS, (1, 2, 4), (0, 1, 2))))
def test_shard_then_unshard_is_identity(kind: str, degree: int, dim: int) -> None:
    x = torch.randn(8, 8, 8)
    shards = [shard_sequence(x, kind, r, degree, dim) for r in range(degree)]
    assert all(s.shape[dim] == 8 // degree for s in shards)
    assert torch.equal(unshard_sequence(shards, kind, dim), x)


def test_layouts_put_tokens_where_the_papers_do() -> None:
    assert shard_positions(8, "ring", 1, 4).tolist() == [2, 3]
    assert shard_positions(8, "hybrid", 3, 4).tolist() == [6, 7]
    assert shard_positions(8, "ulysses", 0, 2).tolist() == [0, 1, 2, 3]
    assert shard_positions(8, "striped", 1, 4).tolist() == [1, 5]
    assert [sequence_layout(k) for k in KINDS] == ["contiguous", "contiguous", "striped", "contiguous"]


def test_sequence_must_split_evenly() -> None:
    with pytest.raises(ValueError, match="not a multiple of the context-parallel degree 4"):
        shard_sequence(torch.zeros(1, 6), "ring", 0, 4)


def test_shard_batch_shifts_labels_before_sharding() -> None:
    tokens = torch.arange(16).view(2, 8)
    assert next_token_labels(tokens)[0].tolist() == [1, 2, 3, 4, 5, 6, 7, -100]
    batch = shard_batch(tokens, "striped", 1, 2)
    assert batch["input_ids"][1].tolist() == [9, 11, 13, 15]
    assert batch["position_ids"][1].tolist() == [1, 3, 5, 7]
    assert batch["labels"][1].tolist() == [10, 12, 14, -100]
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    assert shard_batch(tokens[:1], "ring", 1, 2, position_ids=packed)["position_ids"].tolist() == [[1, 2, 3, 4]]


def test_hybrid_grid_puts_ulysses_on_consecutive_ranks() -> None:
    ulysses, ring = hybrid_rank_grid([4, 5, 6, 7, 8, 9, 10, 11], 4)
    assert ulysses == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert ring == [[4, 8], [5, 9], [6, 10], [7, 11]]
    with pytest.raises(PlanError, match="cp_ulysses"):
        hybrid_rank_grid(range(6), 4)


@pytest.mark.parametrize(("kv_heads", "degree", "copies"), [(8, 4, 1), (2, 4, 2), (1, 4, 4), (6, 4, 2), (4, 8, 2)])
def test_kv_replication_is_the_fewest_copies_that_split(kv_heads: int, degree: int, copies: int) -> None:
    assert kv_replication(kv_heads, degree) == copies
    assert (kv_heads * copies) % degree == 0


def _work(size: int, striped: bool) -> list[float]:
    """Blocks of attention work per rank (a causal diagonal block is half a block)."""
    cost = {BlockMask.FULL: 1.0, BlockMask.CAUSAL: 0.5, BlockMask.STRICT: 0.5, None: 0.0}
    return [sum(cost[ring_mask(s, r, size, True, striped)] for s in range(size)) for r in range(size)]


def test_ring_is_imbalanced_and_striped_is_balanced_under_causal_masks() -> None:
    assert _work(4, striped=False) == [0.5, 1.5, 2.5, 3.5]
    assert _work(4, striped=True) == [2.0, 2.0, 2.0, 2.0]
    assert all(ring_mask(s, r, 4, False, st) is BlockMask.FULL for s, r, st in itertools.product(range(4), range(4),
                                                                                                   (0, 1)))


def test_loss_without_a_group_is_the_mean_over_labelled_tokens() -> None:
    logits = torch.randn(2, 6, 10, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, -100, 4, 5], [6, 7, 8, 9, 0, -100]])
    loss = context_parallel_loss(logits, labels, None)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits)[0]
    torch.testing.assert_close(logits.grad, grad)


def test_transformers_hooks_refuse_what_they_cannot_express() -> None:
    assert _transformers_mask(attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="padding masks"):
        _transformers_mask(attention_mask=torch.tensor([[True, False]]))
    module = torch.nn.Module()
    q = torch.randn(1, 4, 6, 8)
    out, _ = _transformers_attention(module, q, q[:, :2], q[:, :2], None, scaling=0.3)
    expected = F.scaled_dot_product_attention(q, q[:, :2], q[:, :2], is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    with pytest.raises(ValueError, match="dropout"):
        _transformers_attention(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        _transformers_attention(module, q, q, q, None, sliding_window=4)


def test_wiring_checks_before_touching_the_model() -> None:
    with pytest.raises(PlanError, match="hybrid needs ulysses and ring groups"):
        ContextAttention("hybrid", ContextGroups(cp=None))
    core = ContextAttention("ring", ContextGroups(cp=None))
    model = GPT(GPTConfig(layers=2))
    with pytest.raises(PlanError, match="3 attention cores for 2 attention layers"):
        apply_context_parallel(model, [core] * 3)
    with pytest.raises(PlanError, match="no attention layer"):
        apply_context_parallel(torch.nn.Linear(2, 2), core)
    assert apply_context_parallel(model, [None, None]) == 0
