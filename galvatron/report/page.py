"""The page's content, independent of the output format: the headline numbers and the panels, each
either drawn or replaced by a note saying what it needs. :mod:`html` and :mod:`png` lay it out."""

from __future__ import annotations

from dataclasses import dataclass

from galvatron.report.data import CostSummary, Report
from galvatron.report.draw import Canvas
from galvatron.report.panel_measured import draw_measured, relative_error
from galvatron.report.panel_memory import draw_memory
from galvatron.report.panel_plan import draw_plan
from galvatron.report.panel_timeline import draw_timeline
from galvatron.report.panel_top import draw_top
from galvatron.report.schedule import timeline_from_cost
from galvatron.report.style import fmt_gib, fmt_pct, fmt_seconds, fmt_tflops, fmt_tokens

NEEDS_COST = ("Needs the cost model: run galvatron plan show PLAN --model MODEL --cluster CLUSTER --report "
              "report.html, or galvatron simulate ... --report report.html.")
NEEDS_STAGES = "Needs the per-stage breakdown of the cost model, which this cost result does not include."
NEEDS_SEARCH = ("Only this plan was costed. A search lists the best alternatives: galvatron simulate --model MODEL "
                "--cluster CLUSTER --top K --report report.html.")

TIMELINE = "2. Pipeline timeline (predicted)"
MEMORY = "3. Memory per GPU (predicted)"


@dataclass(frozen=True)
class Panel:
    """One section of the page."""

    id: str
    """HTML id, also the anchor tests look for."""
    heading: str
    canvas: Canvas | None
    note: str | None = None
    """Said below the drawing, or instead of it when ``canvas`` is None."""


def summary_items(report: Report) -> list[tuple[str, str]]:
    """(label, value) pairs for the page header."""
    plan, cost, measured = report.plan, report.cost, report.measured
    items = [(k, v) for k, v in report.context.items()]
    items.append(("devices", f"{plan.world_size} GPUs, {len(plan.stages)} stage(s), {plan.dtype.value}"))
    if cost is None:
        return items
    step = fmt_seconds(cost.step_time_s)
    if measured is not None:
        err = fmt_pct(relative_error(cost.step_time_s, measured.mean_step_time_s))
        step += f" (measured {fmt_seconds(measured.mean_step_time_s)}, error {err})"
    items += [("step time", step), ("throughput", fmt_tokens(cost.tokens_per_s)),
              ("per GPU", fmt_tflops(cost.tflops_per_gpu)), ("MFU", fmt_pct(cost.mfu)),
              ("peak memory", fmt_gib(cost.peak_memory_gib) + _capacity(cost))]
    if report.plans_costed is not None:
        items.append(("plans costed", f"{report.plans_costed:,}"))
    if report.search_time_s is not None:
        items.append(("search time", fmt_seconds(report.search_time_s)))
    return items


def _capacity(cost: CostSummary) -> str:
    if cost.memory_limit_gib is None:
        return ""
    return f" of {fmt_gib(cost.memory_limit_gib)}" + ("" if cost.fits else " (does not fit)")


def panels(report: Report) -> list[Panel]:
    """Plan diagram, timeline, memory, top plans, and measured-vs-predicted after a training run."""
    cost = report.cost
    out = [Panel("plan", "1. Plan: strategy per layer and stage", draw_plan(report.plan))]
    if cost is None or not cost.stages:
        why = NEEDS_COST if cost is None else NEEDS_STAGES
        out += [Panel("timeline", TIMELINE, None, why), Panel("memory", MEMORY, None, why)]
    else:
        out += [Panel("timeline", TIMELINE, draw_timeline(timeline_from_cost(cost), cost, report.measured)),
                Panel("memory", MEMORY, draw_memory(cost))]
    out.append(_top_panel(report))
    if report.measured is not None:
        heading = "5. Measured vs predicted"
        if cost is None:
            mean = fmt_seconds(report.measured.mean_step_time_s)
            out.append(Panel("measured", heading, None, f"{report.measured.label}: {mean} per step. {NEEDS_COST}"))
        else:
            out.append(Panel("measured", heading, draw_measured(cost, report.measured)))
    return out


def _top_panel(report: Report) -> Panel:
    heading = "4. Top plans (predicted throughput)"
    if report.top:
        return Panel("top", heading, draw_top(report.top, report.plan))
    if report.cost is not None:
        return Panel("top", heading, draw_top((report.cost,), report.plan), NEEDS_SEARCH)
    return Panel("top", heading, None, NEEDS_COST)
