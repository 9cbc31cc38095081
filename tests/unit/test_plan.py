"""The plan contract: round-trips, validation, and the field path of every rejection."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galvatron import LayerStrategy, ModelSpec, Plan, PlanError
from galvatron.plan import CPKind, LayerGroup, Pipeline, Recompute, Schedule, Stage

PLANS = sorted((Path(__file__).parents[2] / "configs" / "plans").glob("*.yaml"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def strategies_for(draw: st.DrawFn, devices: int) -> LayerStrategy:
    tp = draw(st.sampled_from(_divisors(devices)))
    cp = draw(st.sampled_from(_divisors(devices // tp)))
    dp = devices // (tp * cp)
    kind = draw(st.sampled_from(list(CPKind)))
    cp_ulysses = 0
    if kind is CPKind.HYBRID:
        inner = [u for u in _divisors(cp) if 1 < u < cp]
        if inner:
            cp_ulysses = draw(st.sampled_from(inner))
        else:
            kind = CPKind.RING
    zero = draw(st.integers(0, 3))
    etp = draw(st.sampled_from([0, *_divisors(devices)]))  # folding (etp != tp) needs sp when tp > 1
    sp = tp > 1 and (etp not in (0, tp) or draw(st.booleans()))
    return LayerStrategy(
        dp=dp, tp=tp, cp=cp, cp_kind=kind, cp_ulysses=cp_ulysses, sp=sp, etp=etp,
        ep=draw(st.sampled_from(_divisors(devices // (etp or tp)))), zero=zero,
        recompute=draw(st.sampled_from(list(Recompute))), offload=zero > 0 and draw(st.booleans()),
    )


@st.composite
def valid_plans(draw: st.DrawFn) -> Plan:
    pp = draw(st.integers(1, 3))
    vpp = draw(st.integers(1, 2))
    schedule = draw(st.sampled_from(
        [Schedule.INTERLEAVED_1F1B, Schedule.ZERO_BUBBLE] if vpp > 1 else list(Schedule)))
    devices = [draw(st.sampled_from([1, 2, 4, 8])) for _ in range(pp)]
    stages, start = [], 0
    for i in range(pp * vpp):
        groups = []
        for _ in range(draw(st.integers(1, 3))):
            n = draw(st.integers(1, 4))
            groups.append(LayerGroup(start=start, end=start + n, strategy=draw(strategies_for(devices[i % pp]))))
            start += n
        stages.append(Stage(devices=devices[i % pp], groups=tuple(groups)))
    micro_batches = pp * draw(st.integers(1, 3))
    edges = {name: draw(st.none() | strategies_for(devices[0 if name == "embedding" else (pp * vpp - 1) % pp]))
             for name in ("embedding", "head")}
    for name in ("embedding", "head"):
        if edges[name] is not None:
            edges[name] = LayerStrategy(**{**edges[name].__dict__, "ep": 1, "etp": 0})
    return Plan(
        stages=tuple(stages), global_batch_size=8 * micro_batches * draw(st.integers(1, 2)),
        num_micro_batches=micro_batches, pipeline=Pipeline(schedule=schedule, virtual_stages=vpp),
        dtype=draw(st.sampled_from(["bf16", "fp16", "fp32", "fp8"])), **edges,
    )


class TestRoundTrip:
    @settings(max_examples=200, deadline=None)
    @given(valid_plans())
    def test_valid_plans_round_trip_and_validate(self, plan: Plan) -> None:
        assert Plan.from_dict(plan.to_dict()) == plan
        assert Plan.from_yaml(plan.to_yaml()) == plan
        plan.validate(plan.world_size)

    def test_uniform_plan_is_compact(self) -> None:
        plan = Plan.uniform(32, global_batch_size=16, num_micro_batches=4, pp=2, tp=4, sp=True, zero=1)
        data = plan.to_dict()
        assert data["stages"] == [{"devices": 4, "layers": [0, 16]}, {"devices": 4, "layers": [16, 32]}]
        assert data["strategy"]["tp"] == 4 and "dp" not in data["strategy"]
        assert plan.is_uniform and plan.world_size == 8 and plan.pp == 2

    @pytest.mark.parametrize("path", PLANS, ids=[p.name for p in PLANS])
    def test_example_plans_validate(self, path: Path) -> None:
        plan = Plan.load(path).validate()
        assert Plan.from_yaml(plan.to_yaml()) == plan


BASE: dict[str, Any] = {
    "global_batch_size": 16,
    "num_micro_batches": 4,
    "pipeline": {"schedule": "1f1b"},
    "strategy": {"tp": 2, "zero": 1},
    "stages": [
        {"devices": 8, "layers": [0, 4]},
        {"devices": 8, "layers": [{"range": [4, 8], "tp": 4}, {"range": [8, 12]}]},
    ],
}


def _mutated(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


INVALID = [
    # (where to put what, world size, expected field path, words in the message)
    ((["stages", 1, "layers", 0, "tp"], 3), None, "stages[1].layers[4:8].tp", "3 does not divide 8 devices"),
    ((["stages", 0, "layers"], [0, 5]), None, "stages[1].layers[4:8]", "starts at layer 4, expected 5"),
    ((["stages", 1, "layers", 1, "cp"], 3), None, "stages[1].layers[8:12].cp", "does not divide"),
    ((["stages", 1, "layers", 1, "dp"], 3), None, "stages[1].layers[8:12].dp", "not the 8 devices"),
    ((["stages", 1, "layers", 0], {"range": [4, 8], "tp": 1, "sp": True}), None, "stages[1].layers[4:8].sp",
     "needs tp > 1"),
    ((["stages", 1, "layers", 1, "zero"], 4), None, "stages[1].layers[8:12].zero", "not one of 0, 1, 2, 3"),
    ((["stages", 1, "layers", 1, "recompute"], "most"), None, "stages[1].layers[8:12].recompute", "not one of"),
    ((["stages", 1, "layers", 1, "cp_kind"], "spiral"), None, "stages[1].layers[8:12].cp_kind", "not one of"),
    ((["stages", 1, "layers", 1, "ep"], 8), None, "stages[1].layers[8:12].ep", "does not divide dp 4"),
    ((["stages", 1, "layers", 1], {"range": [8, 12], "zero": 0, "offload": True}), None,
     "stages[1].layers[8:12].offload", "needs ZeRO stage 1"),
    ((["stages", 1, "layers", 1, "wat"], 1), None, "stages[1].layers[8:12].wat", "unknown field"),
    ((["stages", 1, "devices"], 0), None, "stages[1].devices", "not a positive integer"),
    ((["num_micro_batches"], 3), None, "num_micro_batches", "does not divide the global batch of 16"),
    ((["global_batch_size"], 0), None, "global_batch_size", "not a positive integer"),
    ((["pipeline", "schedule"], "zigzag"), None, "pipeline.schedule", "not one of"),
    ((["pipeline", "virtual_stages"], 2), None, "pipeline.schedule", "has no virtual stages"),
    ((["dtype"], "int4"), None, "dtype", "not one of"),
    ((["schema_version"], 99), None, "schema_version", "not a known version"),
    ((["extra"], 1), None, "extra", "unknown field"),
    ((["strategy", "tp"], 3), None, "stages[0].layers[0:4].tp", "3 does not divide 8 devices"),
    ((["num_micro_batches"], 16), None, "stages[0].layers[0:4].dp", "does not divide the micro-batch of 1"),
    ((["global_batch_size"], 16), 8, "stages", "needs 16 devices"),
]


def _break(s: LayerStrategy, devices: int, how: str) -> LayerStrategy:
    """One invalid change of a valid strategy; the field it breaks is ``how``."""
    if how == "tp":
        return dataclasses.replace(s, tp=next(t for t in range(2, 2 * devices + 2) if devices % t))
    if how == "sp":
        return dataclasses.replace(s, tp=1, sp=True, dp=devices // s.cp)
    if how == "ep":
        return dataclasses.replace(s, ep=s.dp * s.cp + 1, etp=0)
    return dataclasses.replace(s, zero=0, offload=True)


class TestRejections:
    @settings(max_examples=200, deadline=None)
    @given(valid_plans(), st.data())
    def test_generated_invalid_plans_name_the_field(self, plan: Plan, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(plan.stages) - 1))
        stage = plan.stages[i]
        j = data.draw(st.integers(0, len(stage.groups) - 1))
        how = data.draw(st.sampled_from(["tp", "sp", "ep", "offload"]))
        group = stage.groups[j]
        broken = dataclasses.replace(group, strategy=_break(group.strategy, stage.devices, how))
        stages = list(plan.stages)
        stages[i] = dataclasses.replace(stage, groups=(*stage.groups[:j], broken, *stage.groups[j + 1:]))
        bad = dataclasses.replace(plan, stages=tuple(stages))
        with pytest.raises(PlanError) as err:
            Plan.from_dict(bad.to_dict()).validate()
        assert err.value.path == f"stages[{i}].layers[{group.start}:{group.end}].{how}"

    @pytest.mark.parametrize("change, world, path, words", INVALID)
    def test_field_path(self, change: tuple, world: int | None, path: str, words: str) -> None:
        data = _mutated(*change)
        with pytest.raises(PlanError) as err:
            Plan.from_dict(data).validate(world)
        assert err.value.path == path
        assert words in str(err.value)
        assert str(err.value).startswith(f"{path}: ")

    def test_issue_example_message(self) -> None:
        data = copy.deepcopy(BASE)
        data["stages"][1]["layers"][0]["tp"] = 3
        with pytest.raises(PlanError, match=r"^stages\[1\]\.layers\[4:8\]\.tp: 3 does not divide 8 devices$"):
            Plan.from_dict(data).validate()

    def test_against_model(self) -> None:
        spec = ModelSpec.from_config("llama2-7b")
        plan = Plan.uniform(32, global_batch_size=8, tp=8)
        plan.validate(8, spec)
        with pytest.raises(PlanError, match=r"stages\[0\]\.layers\[0:32\]\.tp: 3 does not divide the 32"):
            Plan.uniform(32, global_batch_size=3, tp=3).validate(3, spec)
        with pytest.raises(PlanError, match=r"covers 30 layers but the model has 32"):
            Plan.uniform(30, global_batch_size=8).validate(1, spec)
        with pytest.raises(PlanError, match=r"\.ep: 2: layer 0 is not a MoE layer"):
            Plan.uniform(32, global_batch_size=8, dp=2, ep=2).validate(2, spec)
        with pytest.raises(PlanError, match=r"\.cp: Ulysses degree 8 does not divide the 4 heads"):
            Plan.uniform(32, global_batch_size=1, tp=8, cp=8).validate(64, spec)
        moe = ModelSpec.from_config("mixtral-8x7b")
        Plan.uniform(32, global_batch_size=8, dp=8, ep=8).validate(8, moe)
        with pytest.raises(PlanError, match=r"\.ep: 16 does not divide the 8 experts"):
            Plan.uniform(32, global_batch_size=16, dp=16, ep=16).validate(16, moe)

    def test_expert_tp(self) -> None:
        """etp: 0 and etp = tp mean the same (stored as 0); other values fold EP over adjacent ranks and
        need etp x ep to divide dp x tp x cp, sp with tp > 1, and MoE layers."""
        moe, dense = ModelSpec.from_config("mixtral-8x7b"), ModelSpec.from_config("llama2-7b")
        assert LayerStrategy(dp=8, tp=2, etp=2) == LayerStrategy(dp=8, tp=2) and LayerStrategy(tp=2, etp=2).etp == 0
        assert LayerStrategy(dp=8, tp=2, etp=1).expert_tp == 1 and LayerStrategy(dp=8, tp=2).expert_tp == 2
        Plan.uniform(32, global_batch_size=8, dp=8, tp=2, sp=True, ep=8, etp=1).validate(16, moe)
        Plan.uniform(32, global_batch_size=8, dp=4, tp=1, ep=2, etp=2).validate(4, moe)  # ETP over DP ranks
        with pytest.raises(PlanError, match=r"\.ep: 8 does not divide dp 4 x cp 1 = 4 ranks"):
            Plan.uniform(32, global_batch_size=8, dp=4, tp=2, sp=True, ep=8).validate(8, moe)
        with pytest.raises(PlanError, match=r"\.etp: etp 2 x ep 8 = 16 does not divide the layer's dp 2 x tp 4 x"):
            Plan.uniform(32, global_batch_size=8, dp=2, tp=4, sp=True, ep=8, etp=2).validate(8, moe)
        with pytest.raises(PlanError, match=r"\.sp: expert TP 1 differs from tp 2: .*\(sp: true"):
            Plan.uniform(32, global_batch_size=8, dp=4, tp=2, ep=8, etp=1).validate(8, moe)
        with pytest.raises(PlanError, match=r"\.etp: 1: layer 0 is not a MoE layer"):
            Plan.uniform(32, global_batch_size=8, dp=4, tp=2, sp=True, etp=1).validate(8, dense)
        with pytest.raises(PlanError, match=r"^etp: -1 is not a non-negative integer"):
            LayerStrategy(etp=-1)
        data = Plan.uniform(32, global_batch_size=8, dp=4, tp=2, sp=True, ep=8, etp=1).to_dict()
        data["embedding"] = {"ep": 1, "etp": 1}
        with pytest.raises(PlanError, match=r"^embedding\.etp: 1: expert tensor parallelism applies to MoE"):
            Plan.from_dict(data).validate(8)

    def test_expert_tp_yaml(self) -> None:
        """etp round-trips, is written only where it differs, and plan files without it keep their meaning."""
        plan = Plan.uniform(32, global_batch_size=8, dp=8, tp=2, sp=True, ep=8, etp=1)
        text = plan.to_yaml()
        assert "etp: 1" in text and Plan.from_yaml(text) == plan
        assert "ep8 etp1" in plan.describe()
        old = Plan.from_yaml(text.replace("etp: 1", "etp: 0"))
        assert old.stages[0].groups[0].strategy.expert_tp == 2
        mixed = Plan.from_dict({"global_batch_size": 8, "strategy": {"tp": 2, "sp": True, "ep": 8}, "stages": [
            {"devices": 16, "layers": [{"range": [0, 1], "etp": 1}, {"range": [1, 3]}]}]})
        assert [g.strategy.etp for g in mixed.groups()] == [1, 0]
        assert Plan.from_dict(mixed.to_dict()) == mixed
        assert mixed.to_dict()["stages"][0]["layers"] == [{"range": [0, 1], "etp": 1}, {"range": [1, 3]}]

    def test_pipeline_rules(self) -> None:
        Plan.uniform(8, global_batch_size=8, num_micro_batches=4, pp=2, virtual_stages=2,
                     schedule="interleaved-1f1b").validate(2)
        with pytest.raises(PlanError, match=r"^num_micro_batches: 3 is not a multiple of the 2 pipeline stages"):
            Plan.uniform(8, global_batch_size=3, num_micro_batches=3, pp=2, virtual_stages=2,
                         schedule="interleaved-1f1b").validate(2)
        data = Plan.uniform(8, global_batch_size=8, num_micro_batches=4, pp=2, virtual_stages=2,
                            schedule="interleaved-1f1b").to_dict()
        data["stages"][2]["devices"] = 2
        data["stages"][2]["layers"] = [{"range": [4, 6], "dp": 2}]
        with pytest.raises(PlanError, match=r"^stages\[2\]\.devices: 2 differs from stage 0"):
            Plan.from_dict(data).validate()

    def test_hybrid_needs_inner_degree(self) -> None:
        with pytest.raises(PlanError, match=r"\.cp_ulysses: 0: hybrid needs"):
            Plan.uniform(4, global_batch_size=1, cp=4, cp_kind="hybrid").validate(4)
        Plan.uniform(4, global_batch_size=1, cp=4, cp_kind="hybrid", cp_ulysses=2).validate(4)

    def test_queries(self) -> None:
        plan = Plan.load(next(p for p in PLANS if p.name == "llama2-7b-8gpu-mixed.yaml"))
        assert plan.strategy_of(15).tp == 1 and plan.strategy_of(25).recompute is Recompute.FULL
        assert plan.stage_of(13) == 0 and plan.stage_of(14) == 1
        assert plan.head_strategy.tp == 4 and plan.embedding_strategy.tp == 2
        assert not plan.is_uniform
        assert "stage 1 layers [14:20) on 4: dp4 tp1 zero3" in plan.describe()
