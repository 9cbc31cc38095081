"""Panel 2: the predicted pipeline timeline, one row per device group: forward and backward passes
per micro-batch (communication inside them hatched), idle time (bubble), gradient sync, optimizer.

With many micro-batches the steady state repeats itself: the axis is then broken, and only the
warm-up and the drain (where bubbles are) are drawn, at a scale where single passes are visible."""

from __future__ import annotations

from dataclasses import dataclass

from galvatron.plan import Schedule
from galvatron.report.data import CostSummary, Measured
from galvatron.report.draw import MUTED, Canvas, fit_label, legend, nice_step
from galvatron.report.schedule import PASSES, Op, OpKind, Timeline
from galvatron.report.style import (
    BUBBLE,
    MEASURED,
    PASS_COLOURS,
    PREDICTED,
    WIDTH,
    fmt_pct,
    fmt_seconds,
    fmt_tick,
    group_colour,
    text_on,
)

LABEL_W = 120
ROW_H = 34
GAP = 10
TOP = 50
BREAK_W = 40
"""Pixels between the two windows of a broken axis."""
WINDOW_PERIODS = 6
"""Micro-batch periods of the bottleneck group drawn around the warm-up and around the drain, past the
pipeline depth."""

# lighter shades for odd virtual chunks, so interleaved chunks can be told apart
CHUNK_SHADES = {"F": "#9ecae9", "B": "#ffbf79", "W": "#f6e39b"}
WHAT = {OpKind.FORWARD: "forward", OpKind.BACKWARD: "backward", OpKind.WEIGHT: "weight grads",
        OpKind.SYNC: "DP gradient sync", OpKind.OPTIMIZER: "optimizer"}


@dataclass(frozen=True)
class TimeAxis:
    """Seconds to pixels. Unbroken when ``left == right``; otherwise ``(left, right)`` is not drawn."""

    x0: float
    scale: float
    left: float
    right: float
    end: float

    @classmethod
    def fit(cls, timeline: Timeline, marks: list[float], width: float) -> TimeAxis:
        """Break the axis when the warm-up and drain windows cover less than 70% of the step."""
        end = max(timeline.makespan, *marks)
        period = max(timeline.busy_s(g) for g in range(timeline.pp)) / timeline.num_micro_batches
        window = (timeline.pp + WINDOW_PERIODS) * period
        last_pass = min(max(op.end for op in timeline.group_ops(g) if op.kind in PASSES) for g in range(timeline.pp))
        right = min(last_pass, *marks) - window
        if window + end - right >= 0.7 * end:
            return cls(LABEL_W, width / end, end, end, end)
        return cls(LABEL_W, (width - BREAK_W) / (window + end - right), window, right, end)

    @property
    def broken(self) -> bool:
        return self.left < self.right

    def x(self, t: float) -> float:
        """x of time ``t`` (in the gap of a broken axis: the gap's middle)."""
        if t <= self.left:
            return self.x0 + t * self.scale
        if t >= self.right:
            return self.x0 + self.left * self.scale + BREAK_W + (t - self.right) * self.scale
        return self.x0 + self.left * self.scale + BREAK_W / 2

    def pieces(self, start: float, end: float) -> list[tuple[float, float]]:
        """(x, width) of the drawn parts of ``[start, end]``."""
        spans = [(start, min(end, self.left))] if start < self.left else []
        if self.broken and end > self.right:
            spans.append((max(start, self.right), end))
        return [(self.x(a), (b - a) * self.scale) for a, b in spans]

    def ticks(self) -> list[float]:
        step = nice_step((self.left + self.end - self.right) or 1.0)
        ticks = [i * step for i in range(int(self.left / step + 1e-9) + 1)]
        if self.broken:
            first = int(self.right / step) + 1
            ticks += [i * step for i in range(first, int(self.end / step + 1e-9) + 1)]
        return ticks


def draw_timeline(timeline: Timeline, cost: CostSummary, measured: Measured | None = None) -> Canvas:
    """The timeline of ``cost``'s plan with the predicted (and measured) step time marked."""
    marks = [cost.step_time_s] + ([measured.mean_step_time_s] if measured else [])
    axis = TimeAxis.fit(timeline, marks, WIDTH - LABEL_W - 30)
    rows_h = timeline.pp * (ROW_H + GAP)
    canvas = Canvas(WIDTH, TOP + rows_h + 76)
    canvas.text(0, 10, _headline(timeline, cost, axis), size=12, color=MUTED)
    for g in range(timeline.pp):
        _row(canvas, timeline, cost, g, TOP + g * (ROW_H + GAP), axis)
    axis_y = TOP + rows_h
    for tick in axis.ticks():
        x = axis.x(tick)
        canvas.line(x, axis_y - 4, x, axis_y + 2, color="#999999")
        canvas.text(x, axis_y + 11, fmt_tick(tick), anchor="middle", size=10, color=MUTED)
    if axis.broken:
        _break(canvas, axis, axis_y)
    _marker(canvas, axis.x(cost.step_time_s), axis_y, 0, f"predicted step {fmt_seconds(cost.step_time_s)}",
            PREDICTED)
    if measured is not None:
        _marker(canvas, axis.x(measured.mean_step_time_s), axis_y, 1,
                f"{measured.label} step {fmt_seconds(measured.mean_step_time_s)}", MEASURED)
    _legend(canvas, timeline, axis_y)
    return canvas


def _headline(timeline: Timeline, cost: CostSummary, axis: TimeAxis) -> str:
    plan = cost.plan
    text = (f"{timeline.schedule.value} · pp {timeline.pp} x vpp {timeline.virtual_stages} · "
            f"{timeline.num_micro_batches} micro-batch(es) of {plan.micro_batch_size} sample(s) · "
            f"predicted step {fmt_seconds(cost.step_time_s)} (replay of the schedule: "
            f"{fmt_seconds(timeline.makespan)})")
    if axis.broken:
        text += f" · steady state {fmt_seconds(axis.left)} to {fmt_seconds(axis.right)} not drawn"
    return text


def _row(canvas: Canvas, timeline: Timeline, cost: CostSummary, g: int, y: float, axis: TimeAxis) -> None:
    stages = [j for j in range(len(cost.plan.stages)) if j % timeline.pp == g]
    canvas.rect(0, y, 6, ROW_H, group_colour(g))
    canvas.text(12, y + 9, f"group {g}", size=12, bold=True)
    canvas.text(12, y + 25, f"S{','.join(map(str, stages))} · {cost.plan.stages[g].devices} GPUs", size=10,
                color=MUTED)
    bubble = cost.stages[g].bubble_s / cost.step_time_s
    for x, w in axis.pieces(0.0, timeline.makespan):
        canvas.rect(x, y, w, ROW_H, BUBBLE, title=f"group {g}: idle {fmt_pct(bubble)} of the predicted step")
    for op in timeline.group_ops(g):
        for x, w in axis.pieces(op.start, op.end):
            _op(canvas, op, timeline, x, y, w)


def _op(canvas: Canvas, op: Op, timeline: Timeline, x: float, y: float, w: float) -> None:
    chunk = op.stage // timeline.pp if op.stage >= 0 else 0
    fill = CHUNK_SHADES[op.kind.value] if chunk % 2 and op.kind.value in CHUNK_SHADES else PASS_COLOURS[op.kind.value]
    where = f" micro-batch {op.micro_batch}, stage S{op.stage}" if op.micro_batch >= 0 else ""
    canvas.rect(x, y + 2, w, ROW_H - 4, fill, stroke="#ffffff",
                title=f"{WHAT[op.kind]}{where}: {fmt_seconds(op.start)} to {fmt_seconds(op.end)}")
    comm = op.comm_s / op.duration * w if op.duration else 0.0
    if op.kind is not OpKind.SYNC and comm > 0.5:
        canvas.rect(x + w - comm, y + 2, comm, ROW_H - 4, fill, hatch=True)
    if op.micro_batch >= 0:
        label = str(op.micro_batch) + (f".{chunk}" if timeline.virtual_stages > 1 else "")
    else:
        label = {OpKind.SYNC: "sync", OpKind.OPTIMIZER: "optim"}[op.kind]
    shown = fit_label(label, w, 10)
    if shown:
        canvas.text(x + w / 2, y + ROW_H / 2, shown, anchor="middle", size=10, color=text_on(fill))


def _break(canvas: Canvas, axis: TimeAxis, axis_y: float) -> None:
    """Slanted double lines across the rows where the steady state is left out."""
    x = axis.x0 + axis.left * axis.scale + BREAK_W / 2
    for dx in (-4, 4):
        canvas.line(x + dx - 5, axis_y + 4, x + dx + 5, TOP - 4, color="#888888", width=1.2)
    canvas.text(x, axis_y + 24, f"{fmt_seconds(axis.right - axis.left)} not drawn", anchor="middle", size=10,
                color=MUTED)


def _marker(canvas: Canvas, x: float, bottom: float, level: int, label: str, colour: str) -> None:
    """A dashed vertical line at ``x`` with its label above the rows, ``level`` lines up."""
    canvas.line(x, TOP - 6 - 14 * level, x, bottom, color=colour, width=1.5, dashed=True)
    canvas.text(x - 4, TOP - 12 - 14 * level, label, anchor="end", size=11, color=colour, bold=True)


def _legend(canvas: Canvas, timeline: Timeline, axis_y: float) -> None:
    split = timeline.schedule is Schedule.ZERO_BUBBLE
    entries = [(PASS_COLOURS["F"], "forward", False),
               (PASS_COLOURS["B"], "backward (input grads)" if split else "backward", False)]
    if split:
        entries.append((PASS_COLOURS["W"], "weight grads", False))
    entries += [("#ffffff", "communication inside a pass", True), (PASS_COLOURS["sync"], "DP gradient sync", False),
                (PASS_COLOURS["optimizer"], "optimizer", False), (BUBBLE, "idle (bubble)", False)]
    legend(canvas, LABEL_W, axis_y + 42, entries)
    if timeline.virtual_stages > 1:
        canvas.text(LABEL_W, axis_y + 62, "lighter boxes: odd virtual chunks; labels are micro-batch.chunk",
                    size=11, color=MUTED)
