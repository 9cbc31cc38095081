"""Expert-parallel layers on one CUDA device: the patched layers change no number, in fp32 and bf16, and
the dispatch path synchronises the host once per layer (the split sizes of the all-to-all)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_expert import MODELS, batch_for, build, loss_of
from torch import nn

from galvatron.runtime.expert import routed_experts
from galvatron.runtime.expert_wrap import apply_expert_parallel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_one_rank_wrap_on_cuda(name: str, dtype: torch.dtype) -> None:
    plain = build(name).to("cuda", dtype)
    wrapped = copy.deepcopy(plain)
    apply_expert_parallel(wrapped, None)
    batch = batch_for(1).cuda()
    losses = [loss_of(m, name, batch) for m in (plain, wrapped)]
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(losses[1].float(), losses[0].float(), **tol)
    for loss in losses:
        loss.backward()
    grads = dict(wrapped.named_parameters())
    worst = max((grads[n].grad - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-12)
                for n, p in plain.named_parameters())
    assert worst < (1e-4 if dtype == torch.float32 else 0.1)


def test_dispatch_synchronises_once() -> None:
    experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(4)).cuda()
    tokens = torch.randn(64, 32, device="cuda")
    weights, index = torch.randn(64, 4, device="cuda").softmax(-1).topk(2, dim=-1)

    def run(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return torch.cat([e(chunk) for e, chunk in zip(experts, rows.split(counts))])

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = routed_experts(tokens, index, weights, run, num_experts=4, ep_group=None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert out.shape == tokens.shape
