"""Panel 2: the predicted pipeline timeline, one row per device group: forward and backward passes
per micro-batch (communication inside them hatched), idle time (bubble), gradient sync, optimizer."""

from __future__ import annotations

from galvatron.plan import Schedule
from galvatron.report.data import CostSummary, Measured
from galvatron.report.draw import MUTED, Canvas, fit_label, legend, nice_ticks
from galvatron.report.schedule import Op, OpKind, Timeline
from galvatron.report.style import (
    BUBBLE,
    MEASURED,
    PASS_COLOURS,
    PREDICTED,
    WIDTH,
    fmt_pct,
    fmt_seconds,
    group_colour,
    text_on,
)

LABEL_W = 120
ROW_H = 34
GAP = 10
TOP = 36

# lighter shades for odd virtual chunks, so interleaved chunks can be told apart
CHUNK_SHADES = {"F": "#9ecae9", "B": "#ffbf79", "W": "#f6e39b"}


def draw_timeline(timeline: Timeline, cost: CostSummary, measured: Measured | None = None) -> Canvas:
    """The timeline of ``cost``'s plan with the predicted (and measured) step time marked."""
    end = max(timeline.makespan, cost.step_time_s, measured.mean_step_time_s if measured else 0.0)
    scale = (WIDTH - LABEL_W - 30) / end
    rows_h = timeline.pp * (ROW_H + GAP)
    canvas = Canvas(WIDTH, TOP + rows_h + 76)
    canvas.text(0, 10, _headline(timeline, cost), size=12, color=MUTED)
    for g in range(timeline.pp):
        _row(canvas, timeline, cost, g, TOP + g * (ROW_H + GAP), scale)
    axis_y = TOP + rows_h
    for tick in nice_ticks(end):
        x = LABEL_W + tick * scale
        canvas.line(x, axis_y - 4, x, axis_y + 2, color="#999999")
        canvas.text(x, axis_y + 11, fmt_seconds(tick) if tick else "0", anchor="middle", size=10, color=MUTED)
    _marker(canvas, LABEL_W + cost.step_time_s * scale, axis_y, 0,
            f"predicted step {fmt_seconds(cost.step_time_s)}", PREDICTED)
    if measured is not None:
        _marker(canvas, LABEL_W + measured.mean_step_time_s * scale, axis_y, 1,
                f"{measured.label} step {fmt_seconds(measured.mean_step_time_s)}", MEASURED)
    split = timeline.schedule is Schedule.ZERO_BUBBLE
    entries = [(PASS_COLOURS["F"], "forward", False),
               (PASS_COLOURS["B"], "backward (input grads)" if split else "backward", False)]
    if split:
        entries.append((PASS_COLOURS["W"], "weight grads", False))
    entries += [("#ffffff", "communication inside a pass", True), (PASS_COLOURS["sync"], "DP gradient sync", False),
                (PASS_COLOURS["optimizer"], "optimizer", False), (BUBBLE, "idle (bubble)", False)]
    legend(canvas, LABEL_W, axis_y + 34, entries)
    if timeline.virtual_stages > 1:
        canvas.text(LABEL_W, axis_y + 56, "lighter boxes: odd virtual chunks; labels are micro-batch.chunk",
                    size=11, color=MUTED)
    return canvas


def _headline(timeline: Timeline, cost: CostSummary) -> str:
    plan = cost.plan
    return (f"{timeline.schedule.value} · pp {timeline.pp} x vpp {timeline.virtual_stages} · "
            f"{timeline.num_micro_batches} micro-batch(es) of {plan.micro_batch_size} sample(s) · "
            f"predicted step {fmt_seconds(cost.step_time_s)} (this replay of the schedule: "
            f"{fmt_seconds(timeline.makespan)})")


def _row(canvas: Canvas, timeline: Timeline, cost: CostSummary, g: int, y: float, scale: float) -> None:
    stages = [j for j in range(len(cost.plan.stages)) if j % timeline.pp == g]
    canvas.rect(0, y, 6, ROW_H, group_colour(g))
    canvas.text(12, y + 9, f"group {g}", size=12, bold=True)
    canvas.text(12, y + 25, f"S{','.join(map(str, stages))} · {cost.plan.stages[g].devices} GPUs", size=10,
                color=MUTED)
    bubble = cost.stages[g].bubble_s / cost.step_time_s if g < len(cost.stages) else 0.0
    canvas.rect(LABEL_W, y, timeline.makespan * scale, ROW_H, BUBBLE,
                title=f"group {g}: idle {fmt_pct(bubble)} of the predicted step")
    for op in timeline.group_ops(g):
        _op(canvas, op, timeline, LABEL_W + op.start * scale, y, op.duration * scale)


def _op(canvas: Canvas, op: Op, timeline: Timeline, x: float, y: float, w: float) -> None:
    chunk = op.stage // timeline.pp if op.stage >= 0 else 0
    fill = CHUNK_SHADES[op.kind.value] if chunk % 2 and op.kind.value in CHUNK_SHADES else PASS_COLOURS[op.kind.value]
    what = {OpKind.FORWARD: "forward", OpKind.BACKWARD: "backward", OpKind.WEIGHT: "weight grads",
            OpKind.SYNC: "DP gradient sync", OpKind.OPTIMIZER: "optimizer"}[op.kind]
    where = f" micro-batch {op.micro_batch}, stage S{op.stage}" if op.micro_batch >= 0 else ""
    canvas.rect(x, y + 2, w, ROW_H - 4, fill, stroke="#ffffff",
                title=f"{what}{where}: {fmt_seconds(op.start)} to {fmt_seconds(op.end)}")
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


def _marker(canvas: Canvas, x: float, bottom: float, level: int, label: str, colour: str) -> None:
    """A dashed vertical line at ``x`` with its label above the rows, ``level`` lines up."""
    canvas.line(x, TOP - 6 - 14 * level, x, bottom, color=colour, width=1.5, dashed=True)
    canvas.text(x - 4, TOP - 12 - 14 * level, label, anchor="end", size=11, color=colour, bold=True)
