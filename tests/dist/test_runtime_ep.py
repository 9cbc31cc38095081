"""Expert parallelism (dropless) under ``galvatron.wrap`` on 2 and 4 gloo ranks: the reference MoE
GPT (ModuleList experts, a shared expert, MoE every other block) and a tiny Hugging Face Mixtral
(fused experts), EP alone, folded over DP and CP, with attention TP + expert TP (+SP), and
under ZeRO-1/2/3, against single-process training (see test_runtime_harness).

Every rank holds only its experts: ModuleList experts keep their global names (each rank a
subset), fused expert tensors keep their names and hold the rank's experts (and, with TP, its
slice of each). Each held parameter must equal the same slice of the single-process parameter,
and every reference parameter must be held by some rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from galvatron.errors import PlanError
from galvatron.plan import Plan
from galvatron.testing import run_ranks

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runtime_harness as harness
from test_runtime_harness import LAYERS, MODELS, Case, plan_dict

pytestmark = pytest.mark.slow


def _ep_plan(world: int, model: str, ep: int, etp: int = 0, **strategy: Any) -> Plan:
    """EP (and expert TP ``etp``) on the MoE blocks (every other block of the reference GPT, all of Mixtral's)."""
    moe = range(0, LAYERS, 2) if model == "gpt-moe" else range(LAYERS)
    layers = [{"range": [i, i + 1], **strategy, **({"ep": ep, "etp": etp} if i in moe else {})} for i in range(LAYERS)]
    return plan_dict(world, layers)


def _cases(world: int) -> list[Case]:
    models = ("gpt-moe", "mixtral")
    if world == 2:
        return [
            *(Case(f"{m}-ep2", m, _ep_plan(2, m, 2)) for m in models),
            Case("gpt-moe-ep2-plain-backward", "gpt-moe", _ep_plan(2, "gpt-moe", 2), plain=True),
            Case("gpt-moe-ep2-zero1-adam", "gpt-moe", _ep_plan(2, "gpt-moe", 2, zero=1), adam=True),
            Case("mixtral-ep2-zero3", "mixtral", _ep_plan(2, "mixtral", 2, zero=3)),
            *(Case(f"{m}-cp2-ep2", m, _ep_plan(2, m, 2, cp=2, cp_kind="ring")) for m in models),
        ]
    return [
        *(Case(f"{m}-ep4", m, _ep_plan(4, m, 4)) for m in models),
        *(Case(f"{m}-dp4-ep2", m, _ep_plan(4, m, 2)) for m in models),
        *(Case(f"{m}-tp2-ep2", m, _ep_plan(4, m, 2, tp=2)) for m in models),
        Case("gpt-moe-tp2-sp-ep2", "gpt-moe", _ep_plan(4, "gpt-moe", 2, tp=2, sp=True)),
        Case("gpt-moe-dp4-ep2-zero2", "gpt-moe", _ep_plan(4, "gpt-moe", 2, zero=2)),
        Case("mixtral-tp2-ep2-zero3", "mixtral", _ep_plan(4, "mixtral", 2, tp=2, zero=3)),
        Case("gpt-moe-dp2-cp2-ep4", "gpt-moe", _ep_plan(4, "gpt-moe", 4, cp=2, cp_kind="striped")),
        Case("mixtral-dp2-cp2-ep2", "mixtral", _ep_plan(4, "mixtral", 2, cp=2, cp_kind="ulysses")),
    ]


CASES = {world: _cases(world) for world in (2, 4)}


def train(case: Case) -> dict[str, Any]:
    """``harness.train`` plus where each expert parameter's slice lies in the full parameter, and the
    ranks of each MoE layer's EP, expert TP and expert-gradient groups."""
    import torch.distributed as dist

    import galvatron
    from galvatron.runtime.expert_wrap import expert_modules, expert_parallel_state

    captured: list[torch.nn.Module] = []
    wrap = galvatron.wrap
    galvatron.wrap = lambda *a, **k: captured.append(wrap(*a, **k)) or captured[-1]
    try:
        result = harness.train(case)
    finally:
        galvatron.wrap = wrap
    slices, groups = {}, {}
    model = captured[0]

    def ranks(group: Any) -> tuple[int, ...]:
        return (dist.get_rank(),) if group is None else tuple(dist.get_process_group_ranks(group))

    buckets = {id(p): b.group for b in model._galvatron.sync.buckets for p in b.params}
    for path, module in model.named_modules():
        state = expert_parallel_state(module)
        if state is not None:
            tp = (state.tp_group.rank(), state.tp_group.size()) if state.tp_group is not None else (0, 1)
            for name, _ in module.experts.named_parameters():
                slices[f"{path}.experts.{name}"] = (state.local_experts.start, state.local_experts.stop, *tp)
            grad = next(buckets[id(p)] for _, e in expert_modules(module) for p in e.parameters())
            groups[path] = {"ep": ranks(state.ep_group), "etp": ranks(state.tp_group), "edp": ranks(grad)}
    result["slices"], result["groups"] = slices, groups
    return result


def rank_main(cases: list[Case]) -> dict[str, Any]:
    """Every case on this rank: ``harness.train``'s results plus where expert parameters lie."""
    return harness.train_each(cases, train)


def _expected(name: str, full: torch.Tensor, where: tuple[int, int, int, int] | None) -> torch.Tensor:
    """The slice of a single-process parameter a rank holds (computed independently of the runtime)."""
    if where is None:
        return full
    start, stop, tp_rank, tp = where
    if full.dim() == 2:  # a ModuleList expert's Linear weight: only expert TP splits it
        return full.chunk(tp, dim=1 if ".down_proj." in name else 0)[tp_rank]
    full = full[start:stop]
    if name.endswith("down_proj"):
        return full.chunk(tp, dim=2)[tp_rank]
    gate, up = full.chunk(2, dim=1)
    return torch.cat([gate.chunk(tp, dim=1)[tp_rank], up.chunk(tp, dim=1)[tp_rank]], dim=1)


_RESULTS: dict[tuple[int, str, tuple[str, ...]], tuple[dict, list[dict[str, Any]]]] = {}


def results(world: int, backend: str = "gloo", cases: list[Case] | None = None) -> tuple[dict, list[dict[str, Any]]]:
    """(references, per-rank results): one launch per world size and case list (default ``CASES[world]``;
    ``backend="nccl"``: one GPU per rank, tests/gpu; the references stay single-process CPU runs)."""
    cases = CASES[world] if cases is None else cases
    key = (world, backend, tuple(c.name for c in cases))
    if key not in _RESULTS:
        refs = {(c.model, c.adam): harness.reference(c.model, c.adam) for c in cases}
        _RESULTS[key] = refs, run_ranks(rank_main, world, cases, timeout=600, backend=backend)
    return _RESULTS[key]


def mismatches(world: int, case: Case, backend: str = "gloo", scale: float = 1.0,
               cases: list[Case] | None = None) -> list[str]:
    """What differs from single-process training on any rank (``scale`` widens the tolerances)."""
    refs, ranks = results(world, backend, cases)
    return compare(refs, ranks, case, scale)


def compare(refs: dict, ranks: list[dict[str, Any]], case: Case, scale: float = 1.0) -> list[str]:
    """:func:`mismatches` of per-rank results from :func:`rank_main` (``ranks``) against ``refs``."""
    ref_losses, ref_params = refs[case.model, case.adam]
    problems, held = [], set()
    atol = (1e-5 if case.adam else 1e-6) * scale
    for rank, per_rank in enumerate(ranks):
        got = per_rank[case.name]
        if not torch.allclose(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-5 * scale,
                              atol=1e-6 * scale):
            problems.append(f"rank {rank} losses {got['losses']} != {ref_losses}")
        for name, value in got["params"].items():
            expected = _expected(name, ref_params[name], got["slices"].get(name))
            if value.shape != expected.shape or not torch.allclose(value, expected, rtol=1e-4 * scale, atol=atol):
                problems.append(f"rank {rank} {name} differs")
        held |= set(got["params"])
        experts = sum(got["params"][n].numel() for n in got["slices"])
        total = sum(p.numel() for n, p in ref_params.items() if ".experts." in n)
        ep, tp = _degrees(case)
        if experts * ep * tp != total:
            problems.append(f"rank {rank} holds {experts} of {total} expert parameters, not 1/(ep x tp)")
    if held != set(ref_params):
        problems.append(f"no rank holds {sorted(set(ref_params) - held)}")
    return problems


def _degrees(case: Case) -> tuple[int, int]:
    """(ep, expert TP) of the case's MoE layers."""
    moe = [g.strategy for g in case.plan.groups() if g.strategy.ep > 1 or g.strategy.etp]
    return moe[0].ep, moe[0].expert_tp


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_expert_parallel_matches_single_process(world: int, case: Case) -> None:
    problems = mismatches(world, case)
    assert not problems, "\n".join(problems[:20])


def test_ep_needs_recognised_moe_blocks_and_no_pipeline() -> None:
    """Backstops behind Plan.validate (whose model description may not know a block's experts)."""
    from galvatron.runtime.apply import check_supported, describe

    dense = MODELS["gpt"]()
    with pytest.raises(PlanError, match=r"stages\[0\].layers\[0:1\].ep: no MoE layer recognised in block 0"):
        check_supported(dense, _ep_plan(2, "gpt-moe", 2), describe(dense), None)
    moe = MODELS["gpt-moe"]()
    piped = Plan.from_dict({"global_batch_size": 8, "num_micro_batches": 2, "dtype": "fp32", "stages": [
        {"devices": 2, "layers": [{"range": [0, 1], "ep": 2}, {"range": [1, 2]}]},
        {"devices": 2, "layers": [{"range": [2, 4]}]}]})
    with pytest.raises(PlanError, match=r"layers\[0:1\].ep: expert parallelism inside a pipeline is not supported"):
        check_supported(moe, piped, describe(moe), None)
