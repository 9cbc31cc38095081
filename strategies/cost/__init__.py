"""The cost model: pure functions from (plan, model, cluster) to step time and memory per GPU.

``cost_plan(plan, spec, cluster)`` is the entry point; :class:`Perf` is the interface to the
machine (datasheet numbers by default, a measured profile later).
"""

from galvatron.strategies.cost.layer import LayerContext, LayerCost, layer_cost
from galvatron.strategies.cost.model import PlanCost, StageReport, as_perf, cost_plan
from galvatron.strategies.cost.options import CostOptions
from galvatron.strategies.cost.perf import AttentionShape, Collective, DatasheetPerf, Group, Perf

__all__ = [
    "AttentionShape", "Collective", "CostOptions", "DatasheetPerf", "Group", "LayerContext", "LayerCost", "Perf",
    "PlanCost", "StageReport", "as_perf", "cost_plan", "layer_cost",
]
