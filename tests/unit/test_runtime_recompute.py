"""Activation recomputation reruns what it should in backward, and gives the same gradients (one process)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from galvatron.models.gpt import Block, GPTConfig, rope_cache
from galvatron.plan import Recompute
from galvatron.runtime.recompute import apply_recompute


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops_and_grads(mode: Recompute) -> tuple[Counter[str], list[torch.Tensor]]:
    torch.manual_seed(0)
    block = Block(GPTConfig(hidden=64, heads=4, seq_len=32, activation="swiglu", norm="rmsnorm"), moe=False)
    apply_recompute(block, mode)
    x = torch.randn(2, 32, 64, requires_grad=True)
    cos, sin = rope_cache(32, 16)
    out = block(x, (cos[None, :, None], sin[None, :, None]))
    with _Count() as count:
        out.square().sum().backward()
    return count.ops, [x.grad, *(p.grad for p in block.parameters())]


def test_recompute_reruns_the_forward_it_drops_and_gives_the_same_gradients():
    none, grads = _backward_ops_and_grads(Recompute.NONE)
    selective, grads_selective = _backward_ops_and_grads(Recompute.SELECTIVE)
    full, grads_full = _backward_ops_and_grads(Recompute.FULL)
    forward_only = ("silu", "_scaled_dot_product_flash_attention_for_cpu")
    assert all(none[op] == 0 for op in forward_only)
    assert all(selective[op] > 0 and full[op] > 0 for op in forward_only)
    assert selective["mm"] == none["mm"] < full["mm"]  # selective keeps the matmul outputs
    for other in (grads_selective, grads_full):
        for a, b in zip(grads, other, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", list(Recompute))
def test_recompute_keeps_parameter_names(mode: Recompute):
    block = Block(GPTConfig(), moe=False)
    names = [n for n, _ in block.named_parameters()]
    apply_recompute(block, mode)
    assert [n for n, _ in block.named_parameters()] == names
