"""Context parallelism (ulysses, ring, striped, hybrid) under ``galvatron.wrap`` on 2 and 4 gloo
ranks, alone and with DP, TP (+SP), ZeRO and per-layer-group kinds, for the reference GPT and a
tiny Hugging Face Llama, against single-process training (see test_runtime_harness): the
unmodified models get global position ids and token shards from the runtime.

``model.cross_entropy`` is checked with labels whose ignored positions leave the cp ranks with
different token counts: it matches single-process training there, and the plain per-rank mean
(the control) does not. Plans the runtime cannot run with context parallelism are refused
before any process group.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from galvatron.errors import PlanError
from galvatron.plan import Plan
from galvatron.testing import run_ranks

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runtime_harness as harness
from test_runtime_harness import LAYERS, MODELS, Case, plan_dict, uniform

pytestmark = pytest.mark.slow

KINDS = ("ulysses", "ring", "striped")


def _cp(world: int, kind: str, cp: int = 2, **strategy: Any) -> Plan:
    extra = {"cp_ulysses": 2} if kind == "hybrid" else {}
    return uniform(world, cp=cp, cp_kind=kind, **extra, **strategy)


def _cases(world: int) -> list[Case]:
    models = ("gpt", "llama")
    if world == 2:
        cases = [Case(f"{m}-{k}-cp2", m, _cp(2, k)) for m in models for k in KINDS]
        cases += [
            Case("gpt-ring-cp2-plain-backward", "gpt", _cp(2, "ring"), plain=True),
            Case("gpt-striped-cp2-zero3", "gpt", _cp(2, "striped", zero=3)),
            Case("llama-ulysses-cp2-zero1-adam", "llama", _cp(2, "ulysses", zero=1), adam=True),
            Case("gpt-ulysses-then-ring", "gpt", plan_dict(2, [
                {"range": [0, 2], "cp": 2, "cp_kind": "ulysses"}, {"range": [2, 4], "cp": 2, "cp_kind": "ring"}])),
        ]
        return cases
    cases = [Case(f"{m}-hybrid-cp4", m, _cp(4, "hybrid", cp=4)) for m in models]
    cases += [Case(f"gpt-{k}-cp4", "gpt", _cp(4, k, cp=4)) for k in KINDS]
    cases += [Case(f"{m}-{k}-dp2-cp2", m, _cp(4, k)) for m in models for k in KINDS]
    cases += [Case(f"{m}-{k}-tp2-cp2", m, _cp(4, k, tp=2)) for m in models for k in KINDS]
    cases += [
        Case("gqa-ring-tp2-sp-cp2", "gpt-swiglu-gqa", _cp(4, "ring", tp=2, sp=True)),
        Case("gpt-striped-tp2-cp2-zero3", "gpt", _cp(4, "striped", tp=2, zero=3)),
        Case("llama-ring-dp2-cp2-zero2", "llama", _cp(4, "ring", zero=2)),
        Case("gpt-hybrid-then-ring-cp4", "gpt", plan_dict(4, [
            {"range": [0, 2], "cp": 4, "cp_kind": "hybrid", "cp_ulysses": 2},
            {"range": [2, 4], "cp": 4, "cp_kind": "ring"}])),
    ]
    return cases


CASES = {world: _cases(world) for world in (2, 4)}


# ------------------------------------------------------------------ labels with ignored positions
IGNORED = {"gpt-ring-cp2": (2, _cp(2, "ring")), "llama-striped-cp2": (2, _cp(2, "striped")),
           "gpt-ring-cp4": (4, _cp(4, "ring", cp=4)), "llama-ulysses-tp2-cp2": (4, _cp(4, "ulysses", tp=2))}


def _ignored_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Targets with the last third of every sample ignored: the cp ranks hold different counts."""
    out = []
    for tokens, targets in harness.batches():
        targets = targets.clone()
        targets[:, -targets.shape[1] // 3:] = -100
        out.append((tokens, targets))
    return out


def _ignored_reference(model: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    net = MODELS[model]()
    opt = torch.optim.SGD(net.parameters(), lr=harness.LR, momentum=harness.MOMENTUM)
    losses = []
    for tokens, targets in _ignored_batches():
        out = net(tokens)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in net.named_parameters()}


def _train_ignored(model_name: str, plan: Plan, exact: bool) -> dict[str, Any]:
    import galvatron

    model = galvatron.wrap(MODELS[model_name](), plan)
    opt = model.optimizer(torch.optim.SGD, lr=harness.LR, momentum=harness.MOMENTUM)

    def loss_fn(out: Any, targets: torch.Tensor) -> torch.Tensor:
        logits = out if isinstance(out, torch.Tensor) else out.logits
        if exact:
            return model.cross_entropy(logits, targets)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    losses = []
    for batch in _ignored_batches():
        losses.append(model.train_step(model.shard_batch(batch), loss_fn).item())
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "params": {n: harness._full(p) for n, p in model.named_parameters()}}


def _ignored_cases(world: int) -> list[tuple[str, str, Plan, bool]]:
    return [(f"{name}-{'exact' if exact else 'plain-mean'}", name.split("-")[0], plan, exact)
            for name, (w, plan) in IGNORED.items() if w == world for exact in (True, False)]


# ------------------------------------------------------------------ one launch per world size
def _rank_main(cases: list[Case], ignored: list[tuple[str, str, Plan, bool]]) -> dict[str, Any]:
    out = {case.name: harness.train(case) for case in cases}
    for name, model, plan, exact in ignored:
        out[name] = _train_ignored(model, plan, exact)
    out["sequence"] = _sequence_layout_facts()
    return out


def _sequence_layout_facts() -> dict[str, Any]:
    """What shard_batch and the position ids give this rank under a striped cp plan."""
    import galvatron

    world = dist.get_world_size()
    model = galvatron.wrap(MODELS["gpt"](), _cp(world, "striped", cp=world))
    tokens = torch.arange(2 * 8).view(2, 8)
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[1][0]))  # rope cos (B, S, 1, D)
    with torch.no_grad():
        model(model.shard_batch(tokens))
    table = model.rope_cos  # row p: position p (rows of one sample's positions are found back in it)
    positions = [[int((table - row).abs().sum(-1).argmin()) for row in sample[:, 0]] for sample in seen[0]]
    return {"tokens": model.shard_batch(tokens).tolist(), "positions": positions}


_RESULTS: dict[tuple[int, str], tuple[dict, dict, list[dict[str, Any]]]] = {}


def results(world: int, backend: str = "gloo") -> tuple[dict, dict, list[dict[str, Any]]]:
    """(references, references with ignored labels, per-rank results): one launch per world size
    (``backend="nccl"``: one GPU per rank, tests/gpu; the references stay single-process CPU runs)."""
    if (world, backend) not in _RESULTS:
        refs = {(c.model, c.adam): harness.reference(c.model, c.adam) for c in CASES[world]}
        ignored = _ignored_cases(world)
        ignored_refs = {model: _ignored_reference(model) for _, model, _, _ in ignored}
        ranks = run_ranks(_rank_main, world, CASES[world], ignored, timeout=600, backend=backend)
        _RESULTS[world, backend] = refs, ignored_refs, ranks
    return _RESULTS[world, backend]


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_context_parallel_matches_single_process(world: int, case: Case) -> None:
    refs, _, ranks = results(world)
    problems = harness.mismatches(refs, ranks, case)
    assert not problems, "\n".join(problems[:20])


def ignored_mismatch(world: int, name: str, model: str, backend: str = "gloo") -> float:
    """Largest deviation of a labels-with-ignored-positions run from one process, over all ranks."""
    _, refs, ranks = results(world, backend)
    ref_losses, ref_params = refs[model]
    worst = 0.0
    for per_rank in ranks:
        got = per_rank[name]
        worst = max(worst, max(abs(a - b) for a, b in zip(got["losses"], ref_losses)))
        worst = max(worst, max((got["params"][n] - p).abs().max().item() for n, p in ref_params.items()))
    return worst


@pytest.mark.parametrize("world,name", [(w, n) for n, (w, _) in IGNORED.items()])
def test_cross_entropy_is_exact_with_uneven_token_counts(world: int, name: str) -> None:
    model = name.split("-")[0]
    assert ignored_mismatch(world, f"{name}-exact", model) < 2e-5
    assert ignored_mismatch(world, f"{name}-plain-mean", model) > 1e-3  # the control


@pytest.mark.parametrize("world", [2, 4])
def test_striped_shards_hold_tokens_and_positions_i_mod_p(world: int) -> None:
    _, _, ranks = results(world)
    for rank, per_rank in enumerate(ranks):
        expected = [list(range(rank, 8, world)), list(range(8 + rank, 16, world))]
        assert per_rank["sequence"]["tokens"] == expected
        assert per_rank["sequence"]["positions"] == [list(range(rank, 8, world))] * 2


# ------------------------------------------------------------------ refused before any process group
REFUSED: dict[str, tuple[Plan, str, str]] = {
    "cp-and-no-cp": (plan_dict(2, [{"range": [0, 2], "cp": 2}, {"range": [2, 4]}]), "gpt",
                     "stages[0].layers[2:4].cp: dp 2 x cp 1 x tp 1 differs from stages[0].layers[0:2]"),
    "striped-and-ring": (plan_dict(2, [{"range": [0, 2], "cp": 2, "cp_kind": "striped"},
                                       {"range": [2, 4], "cp": 2, "cp_kind": "ring"}]), "gpt",
                         "stages[0].layers[2:4].cp_kind: ring and striped lay tokens out differently"),
    "head-without-cp": (Plan.from_dict({**_cp(2, "ring").to_dict(), "head": {"cp": 1}}), "gpt",
                        "head.cp: dp 2 x cp 1 x tp 1 differs"),
    "pipeline": (Plan.uniform(LAYERS, global_batch_size=8, pp=2, cp=2, num_micro_batches=2, dtype="fp32"), "gpt",
                 "stages[0].layers[0:2].cp: context parallelism inside a pipeline is not supported"),
}


class _NoPositions(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MODELS["gpt"]()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(tokens)


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_context_parallel_plans_are_refused(name: str) -> None:
    from galvatron.runtime.apply import check_supported, describe

    plan, model_name, message = REFUSED[name]
    model = MODELS[model_name]()
    with pytest.raises(PlanError) as err:
        check_supported(model, plan, describe(model), None)
    assert message in str(err.value)


def test_a_model_without_position_ids_is_refused() -> None:
    from galvatron.runtime.apply import check_supported, describe

    net = _NoPositions()
    with pytest.raises(PlanError, match="takes no position_ids"):
        check_supported(net, _cp(2, "ring"), describe(net), None)
