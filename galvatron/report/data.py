"""What a report shows, as typed data: a plan, what the cost model predicts for it, the
alternatives a search found, and what a training run measured.

The cost model lives in ``galvatron.strategies``, which this package must not import; results are
taken in their dict/JSON form (``PlanCost.to_dict()``, ``galvatron simulate --json``) or as any
object with a ``to_dict()`` method, so the report reads exactly what the command line prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from galvatron.errors import GalvatronError
from galvatron.plan import Plan

MEMORY_PARTS = ("params", "grads", "optimizer", "activations", "buffers")
"""Per-GPU memory parts in drawing order; any other key the cost model reports is drawn as ``other``."""


class ReportError(GalvatronError, ValueError):
    """Input a report cannot be built from: a malformed cost result or measurement."""


class CostResult(Protocol):
    """A cost model result (``strategies.cost.PlanCost``) or anything with the same ``to_dict()``."""

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """One device group (pipeline stage) of a step as the cost model predicts it, per GPU."""

    index: int
    """Device group, ``0 .. pp-1`` (with virtual stages a group runs several stages)."""
    layers: tuple[tuple[int, int], ...]
    """Half-open block ranges the group runs, in model order."""
    devices: int
    compute_s: float
    """Seconds per step spent computing (all micro-batches, recomputation included)."""
    comm_s: Mapping[str, float]
    """Seconds per step of exposed communication by kind (``tp``, ``cp``, ``ep``, ``zero``, ``pp``, ``dp``)."""
    bubble_s: float
    """Seconds per step the group waits on others (pipeline fill and drain)."""
    memory_gib: Mapping[str, float]
    """GiB per GPU by part (:data:`MEMORY_PARTS`, and ``total``)."""

    @property
    def micro_batch_comm_s(self) -> float:
        """Communication inside the micro-batch passes: every kind but the once-per-step ``dp`` sync."""
        return sum(t for kind, t in self.comm_s.items() if kind != "dp")

    @property
    def memory_total_gib(self) -> float:
        return self.memory_gib.get("total", sum(v for k, v in self.memory_gib.items() if k != "total"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str) -> StageCost:
        """From ``StageReport.to_dict()``; ``path`` names it in errors."""
        try:
            return cls(
                index=int(_field(data, "stage", path)),
                layers=tuple((int(a), int(b)) for a, b in _field(data, "layers", path)),
                devices=int(_field(data, "devices", path)),
                compute_s=_number(data, "compute_s", path),
                comm_s={str(k): float(v) for k, v in _field(data, "comm_s", path).items()},
                bubble_s=_number(data, "bubble_s", path),
                memory_gib={str(k): float(v) for k, v in _field(data, "memory_gib", path).items()},
            )
        except ReportError:
            raise
        except (TypeError, ValueError, AttributeError) as err:
            raise ReportError(f"{path}: {err}") from None


@dataclass(frozen=True, kw_only=True)
class CostSummary:
    """A plan with its predicted step time, throughput and per-GPU memory."""

    plan: Plan
    step_time_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    peak_memory_gib: float
    """Memory of the most loaded GPU."""
    memory_limit_gib: float | None = None
    """Usable device memory; None when the result does not say."""
    stages: tuple[StageCost, ...] = ()
    """One per device group, in order; empty when the result has no per-stage breakdown."""

    def __post_init__(self) -> None:
        indices = [s.index for s in self.stages]
        if indices and indices != list(range(self.plan.pp)):
            raise ReportError(f"stages: device groups {indices}, but the plan has groups 0..{self.plan.pp - 1}")

    @property
    def fits(self) -> bool | None:
        if self.memory_limit_gib is None:
            return None
        return self.peak_memory_gib <= self.memory_limit_gib

    @property
    def tokens_per_step(self) -> float:
        return self.tokens_per_s * self.step_time_s

    @classmethod
    def from_result(cls, result: CostResult | Mapping[str, Any]) -> CostSummary:
        """From a ``PlanCost`` (or anything with ``to_dict()``) or its dict/JSON form."""
        data = _as_dict(result, "cost result")
        plan = data.get("plan")
        if isinstance(plan, Plan):
            parsed = plan
        elif isinstance(plan, Mapping):
            parsed = Plan.from_dict(plan)
        else:
            raise ReportError("cost result: 'plan' is missing (expected the plan as a dict)")
        limit = None if data.get("memory_limit_gib") is None else _number(data, "memory_limit_gib", "cost result")
        return cls(
            plan=parsed,
            step_time_s=_number(data, "step_time_s", "cost result"),
            tokens_per_s=_number(data, "tokens_per_s", "cost result"),
            tflops_per_gpu=_number(data, "tflops_per_gpu", "cost result"),
            mfu=_number(data, "mfu", "cost result"),
            peak_memory_gib=_number(data, "peak_memory_gib", "cost result"),
            memory_limit_gib=limit,
            stages=tuple(StageCost.from_dict(s, f"stages[{i}]") for i, s in enumerate(data.get("stages") or ())),
        )


@dataclass(frozen=True, kw_only=True)
class Measured:
    """What a training run measured, to show beside the prediction."""

    step_times_s: tuple[float, ...]
    """Wall time of each optimizer step, in order."""
    stage_times_s: Mapping[int, tuple[float, ...]] = field(default_factory=dict)
    """Per device group (pipeline stage index ``0 .. pp-1``): its busy seconds in each step."""
    warmup_steps: int = 0
    """Leading steps left out of the averages (compilation, allocator warm-up)."""
    label: str = "measured"

    def __post_init__(self) -> None:
        object.__setattr__(self, "step_times_s", _times(self.step_times_s, "step_times_s"))
        stages = {int(k): _times(v, f"stage_times_s[{k}]") for k, v in self.stage_times_s.items()}
        object.__setattr__(self, "stage_times_s", stages)
        if not 0 <= self.warmup_steps < len(self.step_times_s):
            raise ReportError(f"warmup_steps: {self.warmup_steps} leaves none of {len(self.step_times_s)} steps")

    @property
    def steady_step_times_s(self) -> tuple[float, ...]:
        return self.step_times_s[self.warmup_steps:]

    @property
    def mean_step_time_s(self) -> float:
        steady = self.steady_step_times_s
        return sum(steady) / len(steady)

    def mean_stage_time_s(self, stage: int) -> float | None:
        """Mean busy time of a device group over the steady steps, or None when it was not measured."""
        times = self.stage_times_s.get(stage)
        if times is None:
            return None
        steady = times[self.warmup_steps:] or times
        return sum(steady) / len(steady)


@dataclass(frozen=True, kw_only=True)
class Report:
    """Everything one report page shows. Panels whose data is missing say what would fill them."""

    plan: Plan
    cost: CostSummary | None = None
    top: tuple[CostSummary, ...] = ()
    """Alternative plans, best first (the search's top K); may include ``cost`` itself."""
    measured: Measured | None = None
    title: str = "galvatron plan report"
    context: Mapping[str, str] = field(default_factory=dict)
    """Labelled facts for the header, e.g. ``{"model": "llama2-7b", "cluster": "8xA100-80GB"}``."""
    plans_costed: int | None = None
    search_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.cost is not None and self.cost.plan != self.plan:
            raise ReportError("the cost result is for a different plan than the report's")

    @classmethod
    def from_result(cls, result: Any, *, measured: Measured | None = None, title: str | None = None,
                    context: Mapping[str, str] | None = None) -> Report:
        """A report of the best plan of a search or simulation result.

        ``result`` is a ``SearchResult`` (``best``, ``top``, ``plans_costed``, ``search_time_s``), a
        ``PlanCost``, or the JSON of ``galvatron simulate --json`` (a cost dict, optionally with
        ``top``: a list of cost dicts, best first, and ``plans_costed``/``search_time_s``).
        """
        if hasattr(result, "best") and hasattr(result, "top"):
            best, top = CostSummary.from_result(result.best), result.top
            costed, took = getattr(result, "plans_costed", None), getattr(result, "search_time_s", None)
        else:
            data = _as_dict(result, "result")
            best, top = CostSummary.from_result(data), data.get("top") or ()
            costed, took = data.get("plans_costed"), data.get("search_time_s")
        return cls(
            plan=best.plan, cost=best, top=tuple(CostSummary.from_result(t) for t in top), measured=measured,
            title=title or cls.title, context=dict(context or {}),
            plans_costed=None if costed is None else int(costed), search_time_s=None if took is None else float(took),
        )


def _as_dict(result: Any, what: str) -> Mapping[str, Any]:
    if isinstance(result, Mapping):
        return result
    to_dict = getattr(result, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise ReportError(f"{what}: expected a mapping or an object with to_dict(), got {type(result).__name__}")


def _field(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data:
        raise ReportError(f"{path}: {key!r} is missing")
    return data[key]


def _number(data: Mapping[str, Any], key: str, path: str) -> float:
    value = _field(data, key, path)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportError(f"{path}.{key}: {value!r} is not a finite number")
    return float(value)


def _times(values: Sequence[float], path: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out or any(not math.isfinite(v) or v <= 0 for v in out):
        raise ReportError(f"{path}: needs one or more positive, finite seconds")
    return out
