"""Expert parallelism on forked gloo ranks, compared number for number with single-process training.

Every case trains a tiny MoE model for three SGD steps on each rank, once in a single process (the
reference) and once expert-parallel (EP folded over data parallelism, optionally with expert tensor
parallelism) with a plain gradient all-reduce: non-expert gradients averaged over the batch's ranks,
expert gradients summed over the expert data-parallel group and divided by the number of the batch's
ranks. All cases of one world size share one launch.

The reference MoE's aux loss is global (equal to a full-batch single-process run); Hugging Face models
compute theirs per rank, so their reference is the mean of per-shard losses (plain data parallelism).
The ``tp`` cases split the experts (expert TP) and replicate everything else over the tp ranks, which see
the same tokens; ``attention_tp`` cases split attention, dense MLPs and shared experts with the runtime's
DTensor tensor parallelism as well (the experts are left out of its plan).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from galvatron.models.gpt import GPT, GPTConfig, MoE
from galvatron.runtime.expert import DropPolicy, ExpertGroups, new_expert_groups
from galvatron.runtime.expert_wrap import MoEKind, apply_expert_parallel, expert_parameter_names, find_moe_layers
from galvatron.testing import run_ranks

transformers = pytest.importorskip("transformers")

SEQ, STEPS, LR, MOMENTUM, AUX_COEF = 8, 3, 0.1, 0.9, 0.1
MODELS = ("gpt", "mixtral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Case:
    model: str
    ep: int
    tp: int = 1
    capacity: float | None = None
    policy: DropPolicy = DropPolicy.PROBS
    attention_tp: bool = False
    """Split attention, dense and shared-expert layers with the runtime's DTensor TP as well."""

    @property
    def name(self) -> str:
        drop = f"-cap{self.capacity}-{self.policy.value}" if self.capacity else ""
        return f"{self.model}-ep{self.ep}-tp{self.tp}{drop}{'-attn_tp' if self.attention_tp else ''}"


CASES = {
    2: [Case("gpt", 2), Case("gpt", 2, capacity=0.5), Case("gpt", 2, capacity=1.0, policy=DropPolicy.POSITION),
        Case("gpt", 1, tp=2), Case("mixtral", 2), Case("qwen2", 2), Case("qwen3", 2), Case("mixtral", 1, tp=2)],
    4: [Case("gpt", 4), Case("gpt", 2), Case("gpt", 2, tp=2), Case("gpt", 2, tp=2, attention_tp=True),
        Case("gpt", 2, capacity=0.75), Case("mixtral", 2),
        Case("mixtral", 2, tp=2), Case("qwen2", 4), Case("qwen2", 2, tp=2), Case("qwen3", 2)],
}


# ------------------------------------------------------------------------------------------ models
def build(name: str) -> nn.Module:
    """A tiny model with 4 experts, top-2, two MoE layers and decisive (well separated) router weights."""
    torch.manual_seed(0)
    hf = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": SEQ + 1, "num_experts_per_tok": 2,
          "output_router_logits": True, "router_aux_loss_coef": AUX_COEF}
    if name == "gpt":
        model = GPT(GPTConfig(vocab=64, seq_len=SEQ, layers=2, hidden=32, heads=4, experts=4, top_k=2,
                              expert_ffn_hidden=32, shared_experts=1, activation="swiglu"))
    elif name == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **hf, intermediate_size=32, num_local_experts=4))
    elif name == "qwen2":
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **hf, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **hf, intermediate_size=64, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True, head_dim=8))
    for path, _ in find_moe_layers(model):
        layer = model.get_submodule(path)
        router = layer.router if isinstance(layer, MoE) else layer.gate
        nn.init.normal_(router.weight, std=1.0)
    return model


def batch_for(world: int) -> torch.Tensor:
    return torch.randint(0, 64, (2 * world, SEQ + 1), generator=torch.Generator().manual_seed(world))


def loss_of(model: nn.Module, name: str, batch: torch.Tensor) -> torch.Tensor:
    if name == "gpt":
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) + AUX_COEF * model.aux_loss()
    return model(input_ids=batch, labels=batch).loss


# ---------------------------------------------------------------------- single-process reference
def _dropping_forward(moe: MoE, shards: int, factor: float, policy: DropPolicy) -> Any:
    """The reference MoE's forward with each of ``shards`` contiguous token chunks (one rank's tokens)
    dropping, per expert, the assignments past ``ceil(factor * tokens * top_k / experts)``: the lowest
    weights (``probs``) or the latest tokens (``position``)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        index, weights = moe.route(tokens)
        keep = torch.zeros_like(index, dtype=torch.bool)
        for rows in torch.arange(tokens.shape[0]).chunk(shards):
            capacity = math.ceil(factor * len(rows) * moe.top_k / moe.num_experts)
            for e in range(moe.num_experts):
                slots = [(int(t), s) for t in rows for s in range(moe.top_k) if index[t, s] == e]
                if policy is DropPolicy.PROBS:
                    slots.sort(key=lambda ts: -weights[ts].item())
                for t, s in slots[:capacity]:
                    keep[t, s] = True
        moe.dropped = int((~keep).sum())
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(moe.experts):
            rows, slot = (keep & (index == e)).nonzero(as_tuple=True)
            out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        for expert in moe.shared:
            out = out + expert(tokens)
        return out.view(x.shape)

    return forward


def reference(case: Case, model: nn.Module, batch: torch.Tensor, shards: int) -> dict[str, Any]:
    """Losses of each step and the final parameters of a single-process run."""
    model = copy.deepcopy(model)
    dropped = 0
    if case.capacity is not None:
        for path, _ in find_moe_layers(model):
            moe = model.get_submodule(path)
            moe.forward = _dropping_forward(moe, shards, case.capacity, case.policy)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        if case.model == "gpt":
            loss = loss_of(model, case.model, batch)
        else:
            loss = torch.stack([loss_of(model, case.model, b) for b in batch.chunk(shards)]).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        dropped += sum(getattr(m, "dropped", 0) for m in model.modules())
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "dropped": dropped}


# ------------------------------------------------------------------------------------------ ranks
def _tp_group(model: nn.Module, case: Case, world: int) -> dist.ProcessGroup | None:
    """The tp group of consecutive ranks; with ``attention_tp``, the runtime's TP applied to every block
    except its routed experts."""
    if not case.attention_tp:
        mine, _ = dist.new_subgroups_by_enumeration([list(range(i, i + case.tp)) for i in range(0, world, case.tp)])
        return mine if case.tp > 1 else None
    from torch.distributed.device_mesh import init_device_mesh

    from galvatron.runtime import tensor

    mesh = init_device_mesh("cpu", (world // case.tp, case.tp), mesh_dim_names=("dp", "tp"))
    for block in model.blocks:
        plan = {n: style for n, style in tensor.derive_block_plan(block).items() if ".experts." not in n}
        tensor.apply_tensor_parallel(block, plan, mesh["tp"], sp=False)
    return mesh["tp"].get_group()


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(_local(tensor), group=group)
    return tensor


def reduce_gradients(model: nn.Module, expert_names: set[str], groups: ExpertGroups, batch_ranks: int) -> None:
    """Plain data-parallel reduction: expert gradients summed over the expert data-parallel group, the rest
    over the batch's ranks, both divided by the number of the batch's ranks. A missing gradient counts as
    zero; one missing on every rank stays missing (an expert no token reached, as in one process)."""
    for name, param in model.named_parameters():
        group = groups.expert_dp if name in expert_names else groups.tokens
        present = torch.tensor([float(param.grad is not None)])
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        _all_reduce(param.grad, group).div_(batch_ranks)
        if _all_reduce(present, group).item() == 0:
            param.grad = None


def expected_shard(name: str, full: torch.Tensor, expert_names: set[str], case: Case, ep_rank: int,
                   tp_rank: int) -> torch.Tensor:
    """The slice of a reference parameter this rank holds (computed here independently of the runtime)."""
    if name not in expert_names:
        return full
    if case.model == "gpt":  # experts.<global index>.<proj>.weight: only tp splits it
        dim = 1 if ".down_proj." in name else 0
        return full.chunk(case.tp, dim=dim)[tp_rank]
    per_rank = full.shape[0] // case.ep
    full = full[ep_rank * per_rank : (ep_rank + 1) * per_rank]
    if name.endswith("down_proj"):
        return full.chunk(case.tp, dim=2)[tp_rank]
    gate, up = full.chunk(2, dim=1)
    return torch.cat([gate.chunk(case.tp, dim=1)[tp_rank], up.chunk(case.tp, dim=1)[tp_rank]], dim=1)


def _run_case(case: Case, model: nn.Module, batch: torch.Tensor) -> dict[str, Any]:
    world, rank = dist.get_world_size(), dist.get_rank()
    batch_ranks = world // case.tp
    ref = reference(case, model, batch, batch_ranks)
    groups = new_expert_groups([list(range(t, world, case.tp)) for t in range(case.tp)], case.ep)
    model = copy.deepcopy(model)
    tp_group = _tp_group(model, case, world)
    apply_expert_parallel(model, groups.ep, aux_group=groups.tokens, tp_group=tp_group,
                          capacity_factor=case.capacity, drop_policy=case.policy)
    expert_names = expert_parameter_names(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    shard = batch.chunk(batch_ranks)[rank // case.tp]
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, case.model, shard)
        loss.backward()
        reduce_gradients(model, expert_names, groups, batch_ranks)
        opt.step()
        losses.append(_all_reduce(loss.detach().clone(), groups.tokens).item() / batch_ranks)
    ep_rank = groups.ep.rank() if groups.ep is not None else 0
    tp_rank = tp_group.rank() if tp_group is not None else 0
    errors = {name: (_full(p) - expected_shard(name, ref["params"][name], expert_names, case, ep_rank, tp_rank))
              .abs().max().item() for name, p in model.named_parameters()}
    total_experts = sum(p.numel() for n, p in ref["params"].items() if ".experts." in n)
    return {"losses": losses, "ref_losses": ref["losses"], "dropped": ref["dropped"],
            "param_error": max(errors.values()), "worst": max(errors, key=errors.get),
            "dtensors": sum(isinstance(p, DTensor) for p in model.parameters()),
            "expert_fraction": sum(p.numel() for n, p in model.named_parameters() if n in expert_names) / total_experts}


def _rank_main(cases: list[Case], models: dict[str, nn.Module], batch: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Every case on this rank; the single-process reference runs here too, since a parent that ran
    backward on a CUDA build of torch cannot fork ranks that run backward."""
    return {case.name: _run_case(case, models[case.model], batch) for case in cases}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: build(name) for name in MODELS}


_RESULTS: dict[int, list[dict[str, Any]]] = {}


def results(world: int, models: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """Per-rank results of every case of ``world`` ranks (one launch, cached)."""
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(_rank_main, world, CASES[world], models, batch_for(world), timeout=300)
    return _RESULTS[world]


@pytest.mark.slow
@pytest.mark.parametrize("world,case", [(w, c) for w, cases in CASES.items() for c in cases],
                         ids=lambda v: v.name if isinstance(v, Case) else f"w{v}")
def test_expert_parallel_matches_single_process(world: int, case: Case, models: dict[str, nn.Module]) -> None:
    for rank, got in enumerate(results(world, models)):
        res = got[case.name]
        if case.capacity is not None:
            assert res["dropped"] > 0, "the capacity case must drop tokens to test anything"
        torch.testing.assert_close(res["losses"], res["ref_losses"], rtol=1e-5, atol=1e-6, msg=f"rank {rank} losses")
        assert res["param_error"] < 1e-5, f"rank {rank}: {res['worst']} off by {res['param_error']:.2e}"
        assert res["expert_fraction"] == 1 / (case.ep * case.tp)
        assert (res["dtensors"] > 0) == case.attention_tp


# ----------------------------------------------------------------------------- single process
@pytest.mark.parametrize("name", MODELS)
def test_recognised_kinds(name: str, models: dict[str, nn.Module]) -> None:
    kind = {"gpt": MoEKind.MODULE_LIST, "qwen2": MoEKind.FUSED_GATED_SHARED}.get(name, MoEKind.FUSED)
    layers = find_moe_layers(models[name])
    assert [k for _, k in layers] == [kind, kind]


@pytest.mark.parametrize("name", MODELS)
def test_one_rank_wrap_changes_no_number(name: str, models: dict[str, nn.Module]) -> None:
    """With no groups the patched layers give the unpatched loss and gradients."""
    batch = batch_for(1)
    plain, wrapped = copy.deepcopy(models[name]), copy.deepcopy(models[name])
    apply_expert_parallel(wrapped, None, aux_group=None)
    losses = [loss_of(m, name, batch) for m in (plain, wrapped)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for loss in losses:
        loss.backward()
    grads = dict(wrapped.named_parameters())
    for n, p in plain.named_parameters():
        torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
