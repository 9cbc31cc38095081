"""Expert-parallel helpers without processes: rank grid, capacity dropping, permutations, routed experts
on one rank, the load-balancing loss, and recognition of MoE layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from galvatron import PlanError
from galvatron.errors import GalvatronError
from galvatron.models.gpt import GPT, MLP, GPTConfig, MoE
from galvatron.runtime.expert import (
    DropPolicy,
    capacity_keep_mask,
    expert_capacity,
    expert_rank_grid,
    group_by_local_expert,
    inverse_permutation,
    load_balancing_loss,
    routed_experts,
)
from galvatron.runtime.expert_wrap import (
    MoEKind,
    apply_expert_parallel,
    expert_load,
    expert_parallel_state,
    find_moe_layers,
)


def test_rank_grid_folds_ep_over_consecutive_ranks() -> None:
    ep_groups, edp_groups = expert_rank_grid([0, 2, 4, 6, 8, 10, 12, 14], 4)
    assert ep_groups == [[0, 2, 4, 6], [8, 10, 12, 14]]
    assert edp_groups == [[0, 8], [2, 10], [4, 12], [6, 14]]
    assert expert_rank_grid([3], 1) == ([[3]], [[3]])
    assert expert_rank_grid([0, 1], 2) == ([[0, 1]], [[0], [1]])


@pytest.mark.parametrize("ep", [0, 3])
def test_rank_grid_rejects_ep_not_dividing(ep: int) -> None:
    with pytest.raises(PlanError, match=r"^ep: "):
        expert_rank_grid([0, 1, 2, 3], ep)


def test_expert_capacity() -> None:
    assert expert_capacity(16, 2, 4, 1.0) == 8
    assert expert_capacity(10, 2, 8, 1.25) == math.ceil(1.25 * 20 / 8)


def _brute_force_keep(index: torch.Tensor, weights: torch.Tensor, experts: int, capacity: int,
                      policy: DropPolicy) -> torch.Tensor:
    keep = torch.zeros_like(index, dtype=torch.bool)
    for e in range(experts):
        slots = [(t, s) for t in range(index.shape[0]) for s in range(index.shape[1]) if index[t, s] == e]
        if policy is DropPolicy.PROBS:
            slots.sort(key=lambda ts: -weights[ts].item())
        for t, s in slots[:capacity]:
            keep[t, s] = True
    return keep


@pytest.mark.parametrize("policy", list(DropPolicy))
@pytest.mark.parametrize("capacity", [0, 1, 3, 40])
def test_capacity_keep_mask_matches_brute_force(policy: DropPolicy, capacity: int) -> None:
    gen = torch.Generator().manual_seed(capacity)
    probs = torch.rand(20, 6, generator=gen).softmax(-1)
    probs[3] = probs[4]  # equal weights: ties go to the earlier token
    weights, index = probs.topk(2, dim=-1)
    got = capacity_keep_mask(index, weights, 6, capacity, policy)
    assert torch.equal(got, _brute_force_keep(index, weights, 6, capacity, policy))
    per_expert = torch.bincount(index[got], minlength=6)
    assert int(per_expert.max()) <= capacity


def test_group_by_local_expert() -> None:
    recv = torch.tensor([[2, 0, 1], [1, 3, 0]])  # source 0 sends 2, 0, 1 rows; source 1 sends 1, 3, 0
    perm = group_by_local_expert(recv, 7)
    # arrival order: s0e0 s0e0 s0e2 s1e0 s1e1 s1e1 s1e1 -> grouped: e0 (0, 1, 3), e1 (4, 5, 6), e2 (2)
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert inverse_permutation(perm)[perm].tolist() == list(range(7))


def _loop_reference(tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                    experts: nn.ModuleList, keep: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for s in range(index.shape[1]):
            if keep is None or keep[t, s]:
                out[t] += weights[t, s] * experts[int(index[t, s])](tokens[t])
    return out


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_routed_experts_on_one_rank_matches_loop(capacity_factor: float | None) -> None:
    torch.manual_seed(0)
    experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
    tokens = torch.randn(12, 8)
    weights, index = torch.randn(12, 4).softmax(-1).topk(2, dim=-1)

    def run(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return torch.cat([e(chunk) for e, chunk in zip(experts, rows.split(counts))])

    got = routed_experts(tokens, index, weights, run, num_experts=4, ep_group=None, capacity_factor=capacity_factor)
    keep = None
    if capacity_factor is not None:
        keep = _brute_force_keep(index, weights, 4, expert_capacity(12, 2, 4, capacity_factor), DropPolicy.PROBS)
        assert not keep.all()
    torch.testing.assert_close(got, _loop_reference(tokens, index, weights, experts, keep))


def test_load_balancing_loss_on_one_rank_is_the_reference_aux_loss() -> None:
    torch.manual_seed(0)
    moe = MoE(GPTConfig(hidden=16, experts=6, top_k=2))
    tokens = torch.randn(10, 16)
    index, _ = moe.route(tokens)
    got = load_balancing_loss(moe.router(tokens), index, 6, None)
    torch.testing.assert_close(got, moe.aux_loss)


def test_find_moe_layers_by_structure() -> None:
    model = GPT(GPTConfig(layers=3, experts=4, moe_every=2))
    assert find_moe_layers(model) == [("blocks.0.mlp", MoEKind.MODULE_LIST), ("blocks.2.mlp", MoEKind.MODULE_LIST)]
    assert find_moe_layers(GPT(GPTConfig(layers=2))) == []
    assert find_moe_layers(MLP(GPTConfig(), 8)) == []


def test_apply_rejects_dense_models_twice_wrapped_layers_and_bad_ep() -> None:
    with pytest.raises(GalvatronError, match="no MoE layer"):
        apply_expert_parallel(GPT(GPTConfig(layers=1)), None)
    model = GPT(GPTConfig(layers=1, experts=4))
    assert apply_expert_parallel(model, None) == [("blocks.0.mlp", MoEKind.MODULE_LIST)]
    state = expert_parallel_state(model.blocks[0].mlp)
    assert state is not None and state.local_experts == range(4) and expert_parallel_state(model) is None
    with pytest.raises(GalvatronError, match="already expert-parallel"):
        apply_expert_parallel(model, None)
    with pytest.raises(PlanError, match=r"^capacity_factor: "):
        apply_expert_parallel(GPT(GPTConfig(layers=1, experts=4)), None, capacity_factor=0.0)


def test_unused_experts_get_no_gradient_as_in_the_reference() -> None:
    """Zero tokens give equal router logits, so every token picks the same two experts; the other two
    keep ``grad = None`` in both the reference and the patched layer, whose recorded load says so."""
    torch.manual_seed(0)
    plain = MoE(GPTConfig(hidden=16, experts=4, top_k=2, shared_experts=1))
    wrapped = copy.deepcopy(plain)
    apply_expert_parallel(wrapped, None)
    x = torch.zeros(2, 3, 16)
    used = {f"experts.{e}." for e in plain.route(x.view(-1, 16))[0].unique().tolist()}
    assert len(used) == 2
    for moe in (plain, wrapped):
        moe(x).pow(2).sum().backward()
    routed = plain.route(x.view(-1, 16))[0]
    assert expert_load(wrapped) == [torch.bincount(routed.reshape(-1), minlength=4).tolist()]
    for name, p in plain.named_parameters():
        q = wrapped.get_parameter(name)
        unused = name.startswith("experts.") and not name.startswith(tuple(used))
        assert (p.grad is None) == (q.grad is None) == unused, name


@pytest.mark.parametrize("impl", ["grouped_mm", "eager", "batched_mm"])
def test_fused_experts_compute_in_autocast_dtype(impl: str) -> None:
    """Under autocast a fused-experts module computes with 16-bit copies of its 3-D weights, whatever
    transformers implementation runs it (``grouped_mm`` otherwise runs its GEMMs in fp32 over fp32
    parameters): its output and its fp32 parameters' gradients equal the module run on 16-bit casts
    of them by hand, the parameters stay the same objects, and outside autocast nothing changes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from galvatron.runtime.expert_wrap import apply_expert_casts

    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=96)
    config._experts_implementation = impl
    torch.manual_seed(0)
    moe = transformers.MixtralForCausalLM(config).model.layers[0].mlp
    reference = copy.deepcopy(moe)
    x = torch.randn(2, 16, 64)

    class GemmDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[torch.dtype] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("_grouped_mm", "bmm", "mm", "addmm"):
                self.seen |= {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            return func(*args, **(kwargs or {}))

    assert apply_expert_casts(moe) == ["experts"] and apply_expert_casts(moe) == []
    weights = moe.experts.gate_up_proj
    with torch.autocast("cpu", dtype=torch.bfloat16), GemmDtypes() as gemms:
        out = moe(x)
    out.float().square().sum().backward()
    assert gemms.seen == {torch.bfloat16}
    assert moe.experts.gate_up_proj is weights and isinstance(weights, nn.Parameter)
    assert weights.grad is not None and weights.grad.dtype == torch.float32

    by_hand = {f"experts.{n}": p.to(torch.bfloat16) for n, p in reference.experts.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.func.functional_call(reference, by_hand, (x,))
    expected.float().square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(weights.grad, reference.experts.gate_up_proj.grad, rtol=0, atol=0)
    moe.zero_grad()
    torch.testing.assert_close(moe(x), reference(x), rtol=0, atol=0)  # no autocast: the module as it is
