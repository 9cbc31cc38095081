"""Checks of a :class:`~galvatron.plan.Plan` against itself, a world size and a model.

Every check raises :class:`~galvatron.errors.PlanError` whose path names the field, so the
search, the runtime and ``galvatron plan validate`` report the same message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from galvatron.errors import PlanError
from galvatron.plan import CPKind, LayerStrategy, Plan, Schedule

if TYPE_CHECKING:
    from galvatron.spec import ModelSpec

_VIRTUAL_SCHEDULES = (Schedule.INTERLEAVED_1F1B, Schedule.ZERO_BUBBLE)


def validate_plan(plan: Plan, world_size: int | None = None, model_spec: ModelSpec | None = None) -> None:
    """Raise :class:`PlanError` for the first problem found; return None when the plan can run."""
    _check_layout(plan, model_spec)
    _check_pipeline(plan)
    for i, stage in enumerate(plan.stages):
        for g in stage.groups:
            path = f"stages[{i}].layers[{g.start}:{g.end}]"
            _check_strategy(g.strategy, stage.devices, plan, path)
            if model_spec is not None:
                _check_against_model(g.strategy, model_spec, range(g.start, g.end), path)
    for name, stage in (("embedding", plan.stages[0]), ("head", plan.stages[-1])):
        strategy = getattr(plan, name)
        if strategy is not None:
            _check_strategy(strategy, stage.devices, plan, name)
            if strategy.ep > 1:
                raise PlanError(f"{name}.ep", f"{strategy.ep}: expert parallelism applies to MoE layers only")
            if strategy.etp:
                raise PlanError(f"{name}.etp", f"{strategy.etp}: expert tensor parallelism applies to MoE layers only")
    if world_size is not None and plan.world_size != world_size:
        raise PlanError(
            "stages",
            f"the plan needs {plan.world_size} devices ({' + '.join(str(s.devices) for s in plan.stages[: plan.pp])}"
            f" over {plan.pp} pipeline stage(s)) but the world size is {world_size}",
        )


def _check_layout(plan: Plan, model_spec: ModelSpec | None) -> None:
    expected, last = 0, len(plan.stages) - 1
    for i, stage in enumerate(plan.stages):
        if stage.devices < 1:
            raise PlanError(f"stages[{i}].devices", f"{stage.devices} is not a positive integer")
        for g in stage.groups:
            path = f"stages[{i}].layers[{g.start}:{g.end}]"
            if g.start != expected:
                raise PlanError(path, f"starts at layer {g.start}, expected {expected} (ranges must be contiguous)")
            if g.end < g.start or (g.end == g.start and not (last > 0 and i in (0, last) and len(stage.groups) == 1)):
                raise PlanError(path, "is empty: end must be greater than start (only the first or the last "
                                      "stage of a pipeline may hold no blocks: the embedding, or the norm and "
                                      "head, alone)")
            expected = g.end
    if expected == 0:
        raise PlanError("stages", "no stage holds a block")
    if model_spec is not None and expected != model_spec.num_blocks:
        raise PlanError(
            f"stages[{len(plan.stages) - 1}].layers",
            f"the plan covers {expected} layers but the model has {model_spec.num_blocks} blocks",
        )


def _check_pipeline(plan: Plan) -> None:
    v = plan.pipeline.virtual_stages
    if len(plan.stages) % v:
        raise PlanError("pipeline.virtual_stages", f"{v} does not divide the {len(plan.stages)} stages")
    if v > 1 and plan.pipeline.schedule not in _VIRTUAL_SCHEDULES:
        raise PlanError(
            "pipeline.schedule",
            f"{plan.pipeline.schedule.value} has no virtual stages; use interleaved-1f1b or zero-bubble",
        )
    pp = plan.pp
    for i in range(pp, len(plan.stages)):
        if plan.stages[i].devices != plan.stages[i % pp].devices:
            raise PlanError(
                f"stages[{i}].devices",
                f"{plan.stages[i].devices} differs from stage {i % pp} ({plan.stages[i % pp].devices}), "
                "which runs on the same devices",
            )
    if plan.global_batch_size % plan.num_micro_batches:
        raise PlanError(
            "num_micro_batches",
            f"{plan.num_micro_batches} does not divide the global batch of {plan.global_batch_size}",
        )
    if pp > 1 and plan.pipeline.schedule in _VIRTUAL_SCHEDULES and plan.num_micro_batches % pp:
        raise PlanError(
            "num_micro_batches",
            f"{plan.num_micro_batches} is not a multiple of the {pp} pipeline stages, "
            f"which {plan.pipeline.schedule.value} needs",
        )


def _check_strategy(s: LayerStrategy, devices: int, plan: Plan, path: str) -> None:
    if devices % s.tp:
        raise PlanError(f"{path}.tp", f"{s.tp} does not divide {devices} devices")
    if (devices // s.tp) % s.cp:
        raise PlanError(f"{path}.cp", f"{s.cp} does not divide the {devices // s.tp} devices left after tp {s.tp}")
    if s.devices != devices:
        raise PlanError(f"{path}.dp", f"dp {s.dp} x tp {s.tp} x cp {s.cp} = {s.devices}, not the {devices} devices")
    if s.sp and s.tp == 1:
        raise PlanError(f"{path}.sp", "Megatron sequence parallelism needs tp > 1")
    if s.cp_kind is CPKind.HYBRID and s.cp > 1:
        if s.cp_ulysses < 2 or s.cp % s.cp_ulysses or s.cp == s.cp_ulysses:
            raise PlanError(
                f"{path}.cp_ulysses",
                f"{s.cp_ulysses}: hybrid needs a Ulysses degree > 1 that divides cp {s.cp} and leaves a ring > 1",
            )
    elif s.cp_ulysses:
        raise PlanError(f"{path}.cp_ulysses", "is only used with cp_kind: hybrid and cp > 1")
    _check_expert_layout(s, path)
    if s.offload and s.zero == 0:
        raise PlanError(f"{path}.offload", "CPU offload needs ZeRO stage 1 or higher")
    if plan.micro_batch_size % s.dp:
        raise PlanError(f"{path}.dp", f"{s.dp} does not divide the micro-batch of {plan.micro_batch_size} samples")


def _check_expert_layout(s: LayerStrategy, path: str) -> None:
    """EP folds over ``dp * cp`` (``etp`` 0), or ``etp x ep`` re-partitions all ``dp * tp * cp`` ranks
    (MoE Parallel Folding), where each rank must route tokens of its own: Megatron-Core requires
    sequence parallelism with expert and tensor parallelism."""
    if not s.etp:
        if (s.dp * s.cp) % s.ep:
            raise PlanError(f"{path}.ep", f"{s.ep} does not divide dp {s.dp} x cp {s.cp} = {s.dp * s.cp} ranks")
        return
    if s.devices % (s.etp * s.ep):
        raise PlanError(f"{path}.etp", f"etp {s.etp} x ep {s.ep} = {s.etp * s.ep} does not divide the layer's "
                        f"dp {s.dp} x tp {s.tp} x cp {s.cp} = {s.devices} ranks")
    if s.tp > 1 and not s.sp:
        raise PlanError(f"{path}.sp", f"expert TP {s.etp} differs from tp {s.tp}: the MoE layout folds over the "
                        "TP ranks, which must hold different tokens (sp: true, as Megatron-Core requires)")


def _check_against_model(s: LayerStrategy, spec: ModelSpec, layers: range, path: str) -> None:
    for index in layers:
        layer = spec.blocks[index]
        if layer.heads:
            if layer.heads % s.tp:
                raise PlanError(f"{path}.tp", f"{s.tp} does not divide the {layer.heads} attention heads")
            if layer.kv_heads % s.tp:
                raise PlanError(f"{path}.tp", f"{s.tp} does not divide the {layer.kv_heads} key/value heads")
            u = s.ulysses_degree
            if (layer.heads // s.tp) % u:
                raise PlanError(
                    f"{path}.cp", f"Ulysses degree {u} does not divide the {layer.heads // s.tp} heads per TP rank"
                )
        if s.cp > 1 and spec.seq_len % s.cp:
            raise PlanError(f"{path}.cp", f"{s.cp} does not divide the sequence length {spec.seq_len}")
        if s.sp and spec.seq_len % (s.tp * s.cp):
            raise PlanError(f"{path}.sp", f"tp {s.tp} x cp {s.cp} does not divide the sequence length {spec.seq_len}")
        if s.etp and not layer.experts:
            raise PlanError(f"{path}.etp", f"{s.etp}: layer {index} is not a MoE layer")
        if s.ep > 1:
            if not layer.experts:
                raise PlanError(f"{path}.ep", f"{s.ep}: layer {index} is not a MoE layer")
            if layer.experts % s.ep:
                raise PlanError(f"{path}.ep", f"{s.ep} does not divide the {layer.experts} experts of layer {index}")
