"""MoE Parallel Folding (``etp``: an expert TP other than the attention TP) under ``galvatron.wrap`` on 4
gloo ranks: the reference MoE GPT (ModuleList experts, a shared expert) and a tiny Hugging Face Mixtral
(fused experts) with attention TP 2 + SP and expert TP 1, EP 2 (over each TP group's ranks) and EP 4
(over dp 2 x tp 2), under ZeRO-1 and ZeRO-3, EP 1 (the experts whole on every rank, each routing its
own tokens) under ZeRO-0, and expert TP 2 inside attention TP 4 (EP 2), dropless, against
single-process training (the checks of test_runtime_ep: losses, every held parameter slice, every
expert parameter held by some rank, 1/(ep x etp) of the experts per rank).

Any partition of the ranks into EP groups gives the same numbers, so the groups themselves are checked
too, against Megatron-Core's expert rank order computed here: ETP innermost on adjacent ranks, EP ranks
``etp`` apart, expert data parallelism (the experts' gradient groups) ``etp * ep`` apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runtime_ep as ep
from test_runtime_harness import Case

pytestmark = pytest.mark.slow

WORLD = 4


def _cases() -> list[Case]:
    out = []
    for model in ("gpt-moe", "mixtral"):
        for degree in (2, 4):
            for zero in (1, 3):
                plan = ep._ep_plan(WORLD, model, degree, etp=1, tp=2, sp=True, zero=zero)
                out.append(Case(f"{model}-tp2-sp-ep{degree}-etp1-zero{zero}", model, plan, adam=zero == 1))
    plan = ep._ep_plan(WORLD, "gpt-moe", 1, etp=1, tp=2, sp=True)  # no EP: every rank holds every expert
    etp2 = ep._ep_plan(WORLD, "gpt-moe", 2, etp=2, tp=4, sp=True, zero=1)  # ETP groups of 2 inside TP 4
    return [*out, Case("gpt-moe-tp2-sp-ep1-etp1", "gpt-moe", plan), Case("gpt-moe-tp4-sp-ep2-etp2", "gpt-moe", etp2)]


CASES = _cases()


def _megatron_groups(rank: int, world: int, etp: int, ep_degree: int) -> dict[str, tuple[int, ...]]:
    """Megatron-Core's expert groups of ``rank`` (one stage over all ranks, ranks in (d, c, t) order)."""
    block = etp * ep_degree
    return {"etp": tuple(r for r in range(world) if r // etp == rank // etp),
            "ep": tuple(r for r in range(world) if r // block == rank // block and r % etp == rank % etp),
            "edp": tuple(r for r in range(world) if r % block == rank % block)}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_folded_experts_match_single_process(case: Case) -> None:
    problems = ep.mismatches(WORLD, case, cases=CASES)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_folded_groups_follow_megatron_order(case: Case) -> None:
    _, ranks = ep.results(WORLD, cases=CASES)
    degree, etp = ep._degrees(case)
    for rank, per_rank in enumerate(ranks):
        groups = per_rank[case.name]["groups"]
        assert groups, f"rank {rank}: no expert-parallel layer"
        for path, got in groups.items():
            assert got == _megatron_groups(rank, WORLD, etp, degree), f"rank {rank} {path}"
