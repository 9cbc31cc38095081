"""Sequence parallelism's token shards (``relayout.own_tokens``): the collectives of a TP+SP block move
contiguous buffers, with no copy around them. One process as rank 0 of 2 on torch's fake process
group (collectives keep their shapes and move nothing), so only op counts are checked here; the
numbers of TP+SP training are checked against single-process training in tests/dist/test_runtime_tp.py."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from galvatron.models.gpt import GPT, GPTConfig
from galvatron.plan import Recompute
from galvatron.runtime.recompute import apply_recompute
from galvatron.runtime.relayout import gather_tokens, own_tokens
from galvatron.runtime.tensor import apply_tensor_parallel, derive_block_plan
from galvatron.testing import fake_group

BATCH, SEQ, HIDDEN = 2, 8, 16


class OpCounter(TorchDispatchMode):
    """ATen ops by packet, and the ``(op, shape, dtype)`` of each op's first tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.inputs: Counter[tuple[str, tuple[int, ...], torch.dtype]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        op = str(func.overloadpacket)
        self.ops[op] += 1
        if args and isinstance(args[0], torch.Tensor):
            self.inputs[op, tuple(args[0].shape), args[0].dtype] += 1
        return func(*args, **(kwargs or {}))


def block_ops(sp: bool, autocast: bool = False, recompute: str = "none") -> OpCounter:
    """ATen ops of one GPT block's forward and backward under tp 2 (fp32 parameters and input, under
    CPU autocast to bf16 if ``autocast``; recomputed as ``recompute`` says), as rank 0 sees them."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    block = GPT(GPTConfig(layers=1, hidden=HIDDEN, heads=4, vocab=32, seq_len=SEQ, ffn_hidden=32,
                          activation="swiglu", norm="rmsnorm")).blocks[0]
    apply_tensor_parallel(block, derive_block_plan(block), init_device_mesh("cpu", (2,)), sp,
                          functional=recompute == "selective")
    apply_recompute(block, Recompute(recompute))
    x = torch.randn(BATCH, SEQ // 2 if sp else SEQ, HIDDEN, requires_grad=True)
    with OpCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return counter


def collectives(ops: Counter[str]) -> dict[str, int]:
    """Collective calls by kind, whether issued through c10d or functional collectives."""
    kinds = {"all_gather": ("allgather", "all_gather"), "reduce_scatter": ("reduce_scatter",),
             "all_reduce": ("allreduce", "all_reduce")}
    return {kind: sum(n for op, n in ops.items() if any(name in op for name in names))
            for kind, names in kinds.items()}


def test_sequence_parallel_collectives_copy_nothing() -> None:
    """SP adds its collectives (an all-gather and a reduce-scatter per attention and MLP, forward and
    backward; an all-reduce per norm weight) and nothing else: with batch-first sequence chunks
    DTensor concatenated around each one (8 ``cat`` per block)."""
    with fake_group(2):
        plain, sp = block_ops(sp=False).ops, block_ops(sp=True).ops
    assert sp["aten.cat"] == plain["aten.cat"]
    # and the two norms' weight gradients, summed over the group (each rank normed other tokens)
    assert collectives(sp) == {"all_gather": 4, "reduce_scatter": 4, "all_reduce": 2}, sp
    assert collectives(plain) == {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 4}, plain


def test_selective_recomputation_does_not_communicate_again() -> None:
    """Selective recomputation keeps the TP/SP forward collectives' outputs: the block's backward
    issues no collective a block without recomputation does not; full recomputation re-runs them."""
    with fake_group(2):
        for sp in (False, True):
            plain = collectives(block_ops(sp).ops)
            assert collectives(block_ops(sp, recompute="selective").ops) == plain, sp
            full = collectives(block_ops(sp, recompute="full").ops)  # the counter sees recomputation
            assert sum(full.values()) > sum(plain.values()), (sp, full)


def test_token_shards_are_contiguous_chunks_of_the_flattened_tokens() -> None:
    with fake_group(4):
        x = torch.arange(2 * 8 * 3).view(2, 8, 3)
        part = own_tokens(x, dist.group.WORLD)
        assert part.shape == (2, 2, 3) and part.is_contiguous()
        assert torch.equal(part.flatten(0, 1), x.flatten(0, 1)[:4])  # rank 0: the first 4 of 16 tokens
        assert gather_tokens(part, dist.group.WORLD).shape == x.shape
        with pytest.raises(ValueError, match="does not split its dimension 1 over 4 ranks"):
            own_tokens(torch.zeros(4, 6, 3), dist.group.WORLD)


def test_under_autocast_sequence_parallelism_gathers_16_bit_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention's and the MLP's fp32 input is cast once on the token shard and gathered in bf16,
    so no linear casts the gathered input (autocast would, once per linear: q, k, v, gate, up, and cast
    each input gradient back)."""
    import galvatron.runtime.tensor as tensor

    def casts(counter: OpCounter) -> dict[tuple[str, str], int]:
        width = {(BATCH, SEQ, HIDDEN): "full", (BATCH, SEQ // 2, HIDDEN): "shard"}
        return {(width[shape], str(dtype)): n for (op, shape, dtype), n in counter.inputs.items()
                if op == "aten._to_copy" and shape in width}

    with fake_group(2):
        cast_first = block_ops(sp=True, autocast=True)
        monkeypatch.setattr(tensor, "autocast_input", lambda x: x)
        cast_each = block_ops(sp=True, autocast=True)
    before, after = casts(cast_each), casts(cast_first)
    assert before[("full", "torch.float32")] == before[("full", "torch.bfloat16")] == 5  # forward, backward
    assert ("full", "torch.float32") not in after and ("full", "torch.bfloat16") not in after
    assert after[("shard", "torch.float32")] == before.get(("shard", "torch.float32"), 0) + 2
    assert after[("shard", "torch.bfloat16")] == before.get(("shard", "torch.bfloat16"), 0) + 2
    gathers = ("allgather", "all_gather")
    assert {dtype for (op, _, dtype) in cast_first.inputs if any(g in op for g in gathers)} == {torch.bfloat16}
    assert {dtype for (op, _, dtype) in cast_each.inputs if any(g in op for g in gathers)} == {
        torch.float32, torch.bfloat16}


def test_without_tensor_parallelism_each_module_input_is_cast_once() -> None:
    """16-bit plans without TP cast the attention's and the MLP's fp32 input once at their entry
    (``apply_input_casts``): no linear casts it again, the gradients reaching the input match autocast's
    own to bf16 rounding, and a child that is not all projections (a norm) is left alone."""
    from galvatron.runtime.tensor import apply_input_casts

    def run(cast_once: bool) -> tuple[OpCounter, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        block = GPT(GPTConfig(layers=1, hidden=HIDDEN, heads=4, vocab=32, seq_len=SEQ, ffn_hidden=32,
                              activation="swiglu", norm="rmsnorm")).blocks[0]
        if cast_once:
            apply_input_casts(block)
        x = torch.randn(BATCH, SEQ, HIDDEN, requires_grad=True)
        with OpCounter() as counter:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = block(x)
            (out[0] if isinstance(out, tuple) else out).float().square().sum().backward()
        return counter, x.grad, {n: p.grad for n, p in block.named_parameters()}

    (each, grad_each, params_each), (once, grad_once, params_once) = run(False), run(True)

    def casts(counter: OpCounter) -> int:
        return sum(n for (op, shape, dtype), n in counter.inputs.items()
                   if op == "aten._to_copy" and shape == (BATCH, SEQ, HIDDEN) and dtype == torch.float32)

    assert casts(each) - casts(once) == 5 - 2  # q, k, v, gate, up each cast it; now attention and MLP once
    assert torch.allclose(grad_once, grad_each, rtol=0.02, atol=1e-3)
    for name, grad in params_each.items():
        assert torch.allclose(params_once[name], grad, rtol=0.02, atol=1e-3), name
    assert not torch.equal(grad_once, grad_each)  # the input gradients were summed in bf16


def test_wrapped_selective_plan_does_not_communicate_again() -> None:
    """The same through ``galvatron.wrap``: a tp2+sp plan's step issues as many collectives under
    ``recompute: selective`` as without recomputation (rank 0 of 2 on a fake group)."""
    import galvatron
    from galvatron.plan import Plan

    counts = {}
    for mode in ("none", "selective"):
        with fake_group(2):
            torch.manual_seed(0)
            model = GPT(GPTConfig(layers=2, hidden=HIDDEN, heads=4, vocab=32, seq_len=SEQ, ffn_hidden=32,
                                  activation="swiglu", norm="rmsnorm"))
            wrapped = galvatron.wrap(model, plan=Plan.uniform(2, global_batch_size=BATCH, tp=2, sp=True,
                                                                 recompute=mode))
            tokens = torch.randint(0, 32, (BATCH, SEQ + 1))
            with OpCounter() as counter:
                wrapped.train_step((tokens[:, :-1], tokens[:, 1:]), lambda out, y: F.cross_entropy(
                    out.flatten(0, 1), y.flatten()))
            counts[mode] = collectives(counter.ops)
    assert counts["selective"] == counts["none"], counts
    assert counts["none"]["all_gather"] > 0
