"""Panel 5 (after a training run): measured step times beside the predicted one, and each device
group's measured busy time beside its prediction."""

from __future__ import annotations

import itertools

from galvatron.report.data import CostSummary, Measured, StageCost
from galvatron.report.draw import MUTED, Canvas, legend, nice_ticks
from galvatron.report.style import MEASURED, PREDICTED, WIDTH, fmt_pct, fmt_seconds, fmt_tick, fmt_tokens

CHART = (70.0, 40.0, 620.0, 160.0)
"""x, y, width, height of the step-time chart."""
BARS_X = 780.0
BAR_H = 12


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: positive when the model is pessimistic."""
    return (predicted - measured) / measured


def summary_text(cost: CostSummary, measured: Measured) -> str:
    """One line: measured mean step and throughput against the prediction."""
    mean = measured.mean_step_time_s
    steps = len(measured.steady_step_times_s)
    return (f"{measured.label}: {fmt_seconds(mean)} per step (mean of {steps} step(s), "
            f"{fmt_tokens(cost.tokens_per_step / mean)}); predicted {fmt_seconds(cost.step_time_s)} "
            f"({fmt_tokens(cost.tokens_per_s)}), error {fmt_pct(relative_error(cost.step_time_s, mean))}")


def draw_measured(cost: CostSummary, measured: Measured) -> Canvas:
    """Step times of the run against the predicted step, and busy time per device group."""
    groups = [s for s in cost.stages if measured.mean_stage_time_s(s.index) is not None]
    canvas = Canvas(WIDTH, max(CHART[1] + CHART[3] + 60, 60 + len(groups) * (2 * BAR_H + 14)))
    canvas.text(0, 10, summary_text(cost, measured), size=12, color=MUTED)
    _chart(canvas, cost, measured)
    if groups:
        _stage_bars(canvas, cost, measured, groups)
    else:
        canvas.text(BARS_X, CHART[1] + 10, "no per-stage times measured", size=12, color=MUTED)
    return canvas


def _chart(canvas: Canvas, cost: CostSummary, measured: Measured) -> None:
    x0, y0, w, h = CHART
    times = measured.step_times_s
    top = max(*times, cost.step_time_s) * 1.1
    for tick in nice_ticks(top, 4):
        y = y0 + h - tick / top * h
        canvas.line(x0, y, x0 + w, y, color="#e5e5e5")
        canvas.text(x0 - 6, y, fmt_tick(tick), anchor="end", size=10, color=MUTED)
    dx = w / max(len(times) - 1, 1)
    points = [(x0 + i * dx, y0 + h - t / top * h) for i, t in enumerate(times)]
    for (xa, ya), (xb, yb) in itertools.pairwise(points):
        canvas.line(xa, ya, xb, yb, color=MEASURED, width=1.5)
    for i, (x, y) in enumerate(points):
        muted = i < measured.warmup_steps
        canvas.rect(x - 2.5, y - 2.5, 5, 5, "#bbbbbb" if muted else MEASURED,
                    title=f"step {i}: {fmt_seconds(times[i])}" + (" (warm-up, not averaged)" if muted else ""))
    y = y0 + h - cost.step_time_s / top * h
    canvas.line(x0, y, x0 + w, y, color=PREDICTED, width=1.5, dashed=True)
    canvas.line(x0, y0 + h, x0 + w, y0 + h, color="#999999")
    canvas.text(x0 + w / 2, y0 + h + 14, f"step (0..{len(times) - 1})", anchor="middle", size=10, color=MUTED)
    legend(canvas, x0, y0 + h + 36, [(MEASURED, f"{measured.label} step time", False),
                                     (PREDICTED, "predicted step time", False)])


def _stage_bars(canvas: Canvas, cost: CostSummary, measured: Measured, groups: list[StageCost]) -> None:
    """Busy time per device group: predicted (step minus bubble) over measured."""
    pairs = [(s.index, cost.step_time_s - s.bubble_s, measured.mean_stage_time_s(s.index) or 0.0) for s in groups]
    top = max(max(p, m) for _, p, m in pairs) * 1.15
    scale = (WIDTH - BARS_X - 150) / top
    canvas.text(BARS_X, CHART[1] - 10, "busy time per device group (predicted / measured)", size=12, bold=True)
    for row, (g, predicted, actual) in enumerate(pairs):
        y = CHART[1] + 10 + row * (2 * BAR_H + 14)
        canvas.text(BARS_X - 8, y + BAR_H, f"group {g}", anchor="end", size=11)
        for k, (value, colour) in enumerate(((predicted, PREDICTED), (actual, MEASURED))):
            canvas.rect(BARS_X, y + k * BAR_H, value * scale, BAR_H - 1, colour)
            canvas.text(BARS_X + value * scale + 5, y + k * BAR_H + BAR_H / 2, fmt_seconds(value), size=10)
