"""Every plan shape the strategy search emits for the native runtime runs on it and trains exactly
like one process (see test_runtime_harness).

The search runs on ``wrap(plan="auto")``'s nominal CPU cluster, costed as the native runtime runs
plans (no profiling: the same plans every run), for the harness's global batch. It is asked for
its best plans in corners of its space: as it is; pipelines pinned at several micro-batch counts
(fewer than the stages included) and with each schedule; tensor parallelism; each ZeRO stage;
each recompute level; memory too tight for plain data parallelism; and ``plan="auto"``'s second
search (one-stage context and expert parallelism, kept where ``check_supported`` accepts them, as
``search_plan`` keeps them).

Two tiers: without processes, the runtime must accept every plan found; then distinct plans, up
to a cap per world size taken in turns from every corner (new combinations of features first,
then new shapes), train in one launch per world size, each case named after its model and plan
shape.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from galvatron.launch.launcher import CPU_FIXED, native_cost_options, search_runnable
from galvatron.strategies.cost.model import as_perf
from galvatron.strategies.search import search
from galvatron.strategies.search.brute import with_memory

from galvatron.errors import MemoryBudgetError, ModelSpecError, PlanError
from galvatron.plan import Plan, Recompute, format_strategy
from galvatron.runtime.apply import auto_searches, check_supported, describe, local_cluster
from galvatron.spec import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_runtime_ep as ep
from test_runtime_harness import BATCH, MODELS, Case, batches, mismatches, results, train_each

pytestmark = pytest.mark.slow

SEARCHED = ("gpt", "gpt-swiglu-gqa", "gpt-moe", "gpt-tied")
WORLDS = (2, 4)
TOP_K = 12
PER_WORLD = {2: 40, 4: 40}
"""Plans trained per world size: what keeps the file near a minute and a half on two cores."""


@dataclass(frozen=True)
class Corner:
    """One search: ``fixed`` values pinned (besides the CPU workers' ``CPU_FIXED``), ``exclude``
    capabilities left out; ``memory``: usable memory per device as a fraction of the peak of the
    best plan without a limit; ``wide``: ``plan="auto"``'s one-stage context/expert-parallel search,
    of which only plans that use either are kept (the rest is the default corner's space)."""

    name: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    memory: float | None = None
    wide: bool = False


def corners(world: int) -> list[Corner]:
    """The option sets searched on ``world`` ranks."""
    out = [Corner("default"), Corner("cp-ep", wide=True)]
    for pp in sorted({2, world}):
        out += [Corner(f"pp{pp}-m{m}", {"pp": pp, "num_micro_batches": m}) for m in (1, 2, 4, 8)]
    out += [
        Corner("zero-bubble", {"pp": 2}, ("schedule:1f1b", "schedule:interleaved-1f1b")),
        Corner("interleaved", {"pp": 2}, ("schedule:1f1b", "schedule:zero-bubble")),
        Corner("tp2", {"tp": 2}),
        Corner("sp", {"sp": True}),
        *(Corner(f"zero{z}", {"zero": z}) for z in (1, 2, 3)),
        *(Corner(f"recompute-{r}", {"recompute": r}) for r in ("selective", "full")),
        Corner("memory-60%", memory=0.6),
        Corner("memory-45%", memory=0.45),
    ]
    if world == 4:
        out += [Corner("tp4", {"tp": 4}), Corner("tp2-pp2", {"tp": 2, "pp": 2})]
    return out


@functools.cache
def described(model: str) -> tuple[torch.nn.Module, ModelSpec]:
    """The harness's ``model`` and its spec on the harness's batch, as ``wrap`` describes it."""
    net = MODELS[model]()
    return net, describe(net, batches()[0][0])


@functools.cache
def searched(model: str, world: int) -> dict[str, tuple[Plan, ...]]:
    """Per corner, the search's best plans for ``model`` on ``world`` ranks (none where nothing fits
    or applies: a pinned tp the heads do not divide, memory below the leanest plan's)."""
    return {corner.name: tuple(_search(model, world, corner)) for corner in corners(world)}


def _search(model: str, world: int, corner: Corner) -> list[Plan]:
    spec = described(model)[1]
    cluster = local_cluster(world)
    try:
        if corner.wide:
            options = dataclasses.replace(auto_searches(BATCH, gpu=False)[1], top_k=TOP_K)
            found = search(spec, cluster, options, native_cost_options(cluster), world_size=world).top
            return [c.plan for c in found if any(g.strategy.cp > 1 or g.strategy.ep > 1 for g in c.plan.groups())
                    and refusal(model, c.plan) is None]
        if corner.memory is not None:
            best = search_runnable(spec, world, cluster=cluster, global_batch=BATCH, fixed=CPU_FIXED).best
            cluster = with_memory(as_perf(cluster), corner.memory * best.peak_memory_gib)
        found = search_runnable(spec, world, cluster=cluster, global_batch=BATCH, fixed={**CPU_FIXED, **corner.fixed},
                                exclude=corner.exclude, top_k=TOP_K).top
    except MemoryBudgetError:
        return []
    return [c.plan for c in found]


def refusal(model: str, plan: Plan) -> str | None:
    """Why the runtime refuses ``plan`` for ``model`` before any collective (None: it accepts it)."""
    net, spec = described(model)
    try:
        plan.validate(plan.world_size, spec)
        check_supported(net, plan, spec, None)
    except (PlanError, ModelSpecError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def shape(plan: Plan) -> str:
    """``pp2-1f1b-m4/[0:2]dp2.tp1.zero0/[2:4]dp2.tp1.zero2``: the pipeline and micro-batches, then
    each stage's layer groups (and the embedding and head where the plan sets them)."""
    p = plan.pipeline
    parts = [(f"pp{plan.pp}" + (f"x{p.virtual_stages}" if p.virtual_stages > 1 else "") + f"-{p.schedule.value}-"
              if plan.pp > 1 else "") + f"m{plan.num_micro_batches}"]
    parts += ["+".join(f"[{g.start}:{g.end}]{_strategy(g.strategy)}" for g in stage.groups) for stage in plan.stages]
    parts += [f"{edge}={_strategy(getattr(plan, edge))}" for edge in ("embedding", "head") if getattr(plan, edge)]
    return "/".join(parts)


def _strategy(s: Any) -> str:
    return format_strategy(s).replace(" ", ".")


def features(plan: Plan) -> frozenset[str]:
    """What of the runtime a plan exercises, coarsely: the pipeline (schedule, fewer micro-batches
    than stages), each degree, ZeRO stage and recompute level used, strategies that differ between
    layer groups, and a stage only partly recomputed."""
    out = {f"pp{plan.pp}-{plan.pipeline.schedule.value}" if plan.pp > 1 else "pp1"}
    out |= {"m<pp"} if plan.num_micro_batches < plan.pp else set()
    for s in (g.strategy for g in plan.groups()):
        out |= {f"tp{s.tp}", f"zero{s.zero}", f"recompute-{s.recompute.value}", *(["sp"] if s.sp else []),
                *([f"cp-{s.cp_kind.value}"] if s.cp > 1 else []), *(["ep"] if s.ep > 1 else [])}
    if len({dataclasses.replace(g.strategy, recompute=Recompute.NONE) for g in plan.groups()}) > 1:
        out.add("mixed-strategies")
    if any(len({g.strategy.recompute for g in stage.groups}) > 1 for stage in plan.stages):
        out.add("partly-recomputed")
    return frozenset(out)


def _turns(lists: list[list[Any]]) -> Iterator[Any]:
    """The first item of each list, then the second of each, and so on."""
    for i in range(max(map(len, lists), default=0)):
        yield from (items[i] for items in lists if i < len(items))


def _key(model: str, plan: Plan) -> tuple[str, str]:
    return model, json.dumps(plan.to_dict(), sort_keys=True)


def _cases(world: int) -> list[Case]:
    """Up to ``PER_WORLD[world]`` distinct runnable plans: corner after corner, each taking its best
    plan not taken yet (its models in turns, a different one first in each corner); first only
    plans whose :func:`features` no plan taken has, then only shapes not taken, then any."""
    rotations = [SEARCHED[i:] + SEARCHED[:i] for i in range(len(SEARCHED))]
    per_corner = [list(_turns([[(m, p) for p in searched(m, world)[c.name] if refusal(m, p) is None]
                               for m in rotations[i % len(SEARCHED)]])) for i, c in enumerate(corners(world))]
    taken: dict[tuple[str, str], Case] = {}  # by model and plan dict
    for novelty in (lambda m, p: features(p), lambda m, p: shape(p), _key):
        queues = [iter(found) for found in per_corner]
        while queues and len(taken) < PER_WORLD[world]:
            for queue in list(queues):
                seen = {novelty(c.model, c.plan) for c in taken.values()}
                pick = next(((m, p) for m, p in queue if novelty(m, p) not in seen and _key(m, p) not in taken), None)
                if pick is None:
                    queues.remove(queue)
                elif len(taken) < PER_WORLD[world]:
                    taken[_key(*pick)] = Case(f"{pick[0]}/{shape(pick[1])}", *pick)
    cases = list(taken.values())
    assert len({c.name for c in cases}) == len(cases), "two plans share a name"
    return cases


CASES = {world: _cases(world) for world in WORLDS}


def _rank_main(cases: list[Case]) -> dict[str, Any]:
    """``test_runtime_ep.train`` of every case (the harness's training, and where expert-parallel
    ranks keep their experts), each named on stderr first: a rank that aborts names none."""
    import torch.distributed as dist

    def announced(case: Case) -> dict[str, Any]:
        print(f"rank {dist.get_rank()}: {case.name}", file=sys.stderr, flush=True)
        return ep.train(case)

    return train_each(cases, announced)


@pytest.mark.parametrize("model,world", [(m, w) for m in SEARCHED for w in WORLDS])
def test_the_runtime_accepts_every_searched_plan(model: str, world: int) -> None:
    refused = [f"{corner}: {shape(p)}: {why}" for corner, plans in searched(model, world).items() for p in plans
               if (why := refusal(model, p)) is not None]
    assert not refused, "\n".join(refused[:10])


@pytest.mark.parametrize("world,case", [(w, c) for w, cs in CASES.items() for c in cs],
                         ids=[f"{w}ranks-{c.name}" for w, cs in CASES.items() for c in cs])
def test_searched_plans_match_single_process(world: int, case: Case) -> None:
    refs, ranks = results("searched", world, CASES[world], rank_main=_rank_main)
    expert_parallel = any(g.strategy.ep > 1 for g in case.plan.groups())
    problems = ep.compare(refs, ranks, case) if expert_parallel else mismatches(refs, ranks, case)
    assert not problems, "\n".join(problems[:20])
