"""Context-parallel attention, batch layout and loss on real gloo ranks, against one process.

One launch per world size runs every kind x causal x (MHA, GQA) case; each rank returns the
largest deviation of its output and dq/dk/dv shards from single-process SDPA. The model tests
train the reference GPT and a tiny Hugging Face Llama for three AdamW steps with each kind,
wired by ``apply_context_parallel`` and reduced by ``context_parallel_loss``, and compare the
losses and parameters with single-process training. Everything runs in float64, so tolerances
are tight.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from galvatron.models.gpt import GPT, GPTConfig
from galvatron.runtime.context import (
    ContextAttention,
    ContextGroups,
    apply_context_parallel,
    context_parallel_loss,
    new_context_groups,
    next_token_labels,
    shard_batch,
    shard_sequence,
)
from galvatron.testing import run_ranks

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

ATOL = 1e-10
HEADS, SEQ, HEAD_DIM, BATCH = 4, 16, 8, 2


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _attention_error(core: ContextAttention, kind: str, rank: int, degree: int, causal: bool, kv_heads: int,
                     tp: tuple[int, int] = (0, 1)) -> float:
    """Largest |difference| of this rank's output and input gradients from the full computation.
    ``tp = (tp_rank, tp_degree)``: this rank holds that slice of the query and K/V heads."""
    gen = torch.Generator().manual_seed(1234 + kv_heads + 2 * causal)
    full = [torch.randn(BATCH, h, SEQ, HEAD_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
            for h in (HEADS, kv_heads, kv_heads)]
    dout = torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=gen, dtype=torch.float64)
    reference = _reference_attention(*full, causal)
    reference.backward(dout)

    def mine(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t.detach().chunk(tp[1], dim=1)[tp[0]], kind, rank, degree, dim=2)

    local = [mine(t).clone().requires_grad_() for t in full]
    out = core(*local, causal=causal)
    out.backward(mine(dout))
    pairs = [(out, reference)] + [(t.grad, f.grad) for t, f in zip(local, full)]
    return max((a - mine(e)).abs().max().item() for a, e in pairs)


def _attention_cases(hybrid_ulysses: int) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    ranks = [list(range(world))]
    cores = {kind: ContextAttention(kind, new_context_groups(ranks, kind)) for kind in ("ulysses", "ring", "striped")}
    cores["hybrid"] = ContextAttention("hybrid", new_context_groups(ranks, "hybrid", hybrid_ulysses))
    errors = {}
    for (kind, core), causal, kv_heads in itertools.product(cores.items(), (True, False), (HEADS, 2, 1)):
        errors[f"{kind} causal={causal} kv_heads={kv_heads}"] = _attention_error(core, kind, rank, world, causal,
                                                                                 kv_heads)
    return errors


def _tensor_parallel_cases() -> dict[str, float]:
    """tp 2 x cp 2 on 4 ranks: cp groups {0, 2} and {1, 3}; tp rank t holds query heads [2t, 2t+2)."""
    rank = dist.get_rank()
    errors = {}
    for kind in ("ulysses", "ring", "striped"):
        core = ContextAttention(kind, new_context_groups([[0, 2], [1, 3]], kind))
        for causal, kv_heads in itertools.product((True, False), (HEADS, 2)):
            errors[f"tp2 x {kind} causal={causal} kv_heads={kv_heads}"] = _attention_error(
                core, kind, rank // 2, 2, causal, kv_heads, tp=(rank % 2, 2))
    return errors


def _refusals() -> list[str]:
    """Errors for too few heads for Ulysses and for layers whose token layouts differ."""
    world = ContextGroups(dist.group.WORLD)
    q = torch.zeros(1, 3, 4, 8)
    mixed = [ContextAttention("ring", world), ContextAttention("striped", world)]
    calls = [lambda: ContextAttention("ulysses", world)(q, q, q), lambda: apply_context_parallel(_gpt(), mixed)]
    messages = []
    for call in calls:
        try:
            call()
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    return messages


def _attention_world(hybrid_ulysses: int, with_tp: bool) -> tuple[dict[str, float], list[str]]:
    errors = _attention_cases(hybrid_ulysses)
    if with_tp:
        errors.update(_tensor_parallel_cases())
    return errors, _refusals()


@pytest.mark.parametrize(("world", "hybrid_ulysses"), [(2, 2), (4, 2)])
def test_attention_matches_single_process(world: int, hybrid_ulysses: int) -> None:
    results = run_ranks(_attention_world, world, hybrid_ulysses, world == 4)
    for rank, (errors, refusals) in enumerate(results):
        assert len(errors) == 24 + (12 if world == 4 else 0)
        bad = {case: err for case, err in errors.items() if err > ATOL}
        assert not bad, f"rank {rank}: {bad}"
        assert "does not divide the 3 local query heads" in refusals[0]
        assert "different token layouts" in refusals[1]


# ----------------------------------------------------------------------------- models
def _gpt() -> nn.Module:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab=64, seq_len=SEQ, layers=2, hidden=32, heads=HEADS, kv_heads=2)).double()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).double()


def _logits(model: nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, GPT):
        return model(tokens, position_ids)
    return model(input_ids=tokens, position_ids=position_ids, use_cache=False).logits


def _train(model: nn.Module, batches: list[dict[str, torch.Tensor]], loss_fn: Callable[..., torch.Tensor],
           reduce_grads: Callable[[nn.Module], None]) -> tuple[list[float], nn.Module]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(_logits(model, batch["input_ids"], batch["position_ids"]), batch["labels"])
        loss.backward()
        reduce_grads(model)
        opt.step()
        losses.append(loss.item())
    return losses, model


def _batches(steps: int = 3, batch: int = BATCH) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, 64, (batch, SEQ), generator=gen)
        out.append({"input_ids": tokens, "position_ids": torch.arange(SEQ).expand_as(tokens),
                    "labels": next_token_labels(tokens)})
    return out


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _sum_grads(group: dist.ProcessGroup, dp_group: dist.ProcessGroup | None = None) -> Callable[[nn.Module], None]:
    """Plain gradient reduction: sum over the cp group, then average over the dp group."""

    def reduce(model: nn.Module) -> None:
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
            if dp_group is not None:
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dist.get_world_size(dp_group)

    return reduce


def _model_error(build: Callable[[], nn.Module], kind: str, groups: ContextGroups, cp_rank: int, dp_rank: int = 0,
                 dp_group: dist.ProcessGroup | None = None) -> float:
    """Largest deviation of the three losses and the final parameters from single-process training
    on the whole batch, of which dp replica ``dp_rank`` takes its share of the samples."""
    dp = 1 if dp_group is None else dist.get_world_size(dp_group)
    batches = _batches(batch=BATCH * dp)
    ref_losses, ref_model = _train(build(), batches, _mean_loss, lambda _: None)
    model = build()
    if apply_context_parallel(model, ContextAttention(kind, groups)) != 2:
        raise RuntimeError("apply_context_parallel did not wire both attention layers")
    rows = slice(dp_rank * BATCH, (dp_rank + 1) * BATCH)
    degree = dist.get_world_size(groups.cp)
    local = [shard_batch(b["input_ids"][rows], kind, cp_rank, degree) for b in batches]
    losses, model = _train(model, local, lambda lg, lb: context_parallel_loss(lg, lb, groups.cp),
                           _sum_grads(groups.cp, dp_group))
    if dp_group is not None:  # a replica's loss; the reference's is the mean over replicas
        mean = torch.tensor(losses, dtype=torch.float64)
        dist.all_reduce(mean, group=dp_group)
        losses = (mean / dp).tolist()
    loss_err = max(abs(a - b) for a, b in zip(losses, ref_losses))
    param_err = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref_model.parameters()))
    return max(loss_err, param_err)


def _models_world(kinds: tuple[str, ...], hybrid_ulysses: int, dp_cases: bool) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = {}
    for kind in kinds:
        groups = new_context_groups([list(range(world))], kind, hybrid_ulysses)
        for name, build in (("gpt", _gpt), ("llama", _llama)):
            errors[f"{name} {kind} cp{world}"] = _model_error(build, kind, groups, rank)
    if dp_cases:  # dp 2 x cp 2: cp groups {0, 1} and {2, 3}, dp groups {0, 2} and {1, 3}
        dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        for kind in ("ring", "striped"):
            groups = new_context_groups([[0, 1], [2, 3]], kind)
            errors[f"gpt {kind} dp2 x cp2"] = _model_error(_gpt, kind, groups, rank % 2, rank // 2,
                                                           dp_groups[rank % 2])
    return errors


@pytest.mark.parametrize(("world", "kinds", "dp_cases"), [
    (2, ("ulysses", "ring", "striped"), False),
    (4, ("hybrid",), True),
])
def test_models_train_like_single_process(world: int, kinds: tuple[str, ...], dp_cases: bool) -> None:
    results = run_ranks(_models_world, world, kinds, 2, dp_cases)
    for rank, errors in enumerate(results):
        assert len(errors) == 2 * len(kinds) + (2 if dp_cases else 0)
        bad = {case: err for case, err in errors.items() if err > 1e-9}
        assert not bad, f"rank {rank}: {bad}"
