"""Panel 3: predicted memory per GPU of each device group, by part, against the device capacity."""

from __future__ import annotations

from galvatron.report.data import MEMORY_PARTS, CostSummary, StageCost
from galvatron.report.draw import MUTED, Canvas, fit_label, legend, nice_ticks
from galvatron.report.style import MEASURED, MEMORY_COLOURS, WIDTH, fmt_gib, group_colour, text_on

LABEL_W = 120
ROW_H = 30
GAP = 10
TOP = 30


def memory_parts(stage: StageCost) -> list[tuple[str, float]]:
    """(part, GiB) in drawing order; parts the cost model names beyond :data:`MEMORY_PARTS` add up to ``other``."""
    parts = [(name, stage.memory_gib.get(name, 0.0)) for name in MEMORY_PARTS]
    other = sum(v for k, v in stage.memory_gib.items() if k not in MEMORY_PARTS and k != "total")
    return parts + ([("other", other)] if other > 0 else [])


def draw_memory(cost: CostSummary) -> Canvas:
    """One stacked bar per device group, with the capacity line."""
    limit = cost.memory_limit_gib
    end = max([s.memory_total_gib for s in cost.stages] + [limit or 0.0]) * 1.08
    scale = (WIDTH - LABEL_W - 150) / end
    rows_h = len(cost.stages) * (ROW_H + GAP)
    canvas = Canvas(WIDTH, TOP + rows_h + 52)
    capacity = f"usable capacity {fmt_gib(limit)} per GPU" if limit is not None else "capacity not given"
    canvas.text(0, 10, f"peak {fmt_gib(cost.peak_memory_gib)} per GPU (most loaded group); {capacity}",
                size=12, color=MUTED)
    for stage in cost.stages:
        _bar(canvas, stage, TOP + stage.index * (ROW_H + GAP), scale, limit)
    axis_y = TOP + rows_h
    for tick in nice_ticks(end):
        x = LABEL_W + tick * scale
        canvas.line(x, axis_y - 4, x, axis_y + 2, color="#999999")
        canvas.text(x, axis_y + 10, f"{tick:g}", anchor="middle", size=10, color=MUTED)
    canvas.text(LABEL_W + end * scale + 6, axis_y + 10, "GiB", size=10, color=MUTED)
    if limit is not None:
        x = LABEL_W + limit * scale
        canvas.line(x, TOP - 6, x, axis_y, color=MEASURED, width=1.5, dashed=True)
        canvas.text(x - 4, TOP - 12, f"capacity {fmt_gib(limit)}", anchor="end", size=11, color=MEASURED, bold=True)
    legend(canvas, LABEL_W, axis_y + 34, [(MEMORY_COLOURS[name], name, False) for name in (*MEMORY_PARTS, "other")])
    return canvas


def _bar(canvas: Canvas, stage: StageCost, y: float, scale: float, limit: float | None) -> None:
    canvas.rect(0, y, 6, ROW_H, group_colour(stage.index))
    canvas.text(12, y + 9, f"group {stage.index}", size=12, bold=True)
    canvas.text(12, y + 23, f"{stage.devices} GPUs", size=10, color=MUTED)
    x = float(LABEL_W)
    for name, gib in memory_parts(stage):
        w = gib * scale
        canvas.rect(x, y, w, ROW_H, MEMORY_COLOURS[name], stroke="#ffffff",
                    title=f"group {stage.index} {name}: {fmt_gib(gib)}")
        shown = fit_label(f"{name} {gib:.1f}", w, 10) or fit_label(f"{gib:.1f}", w, 10)
        if shown:
            canvas.text(x + w / 2, y + ROW_H / 2, shown, anchor="middle", size=10, color=text_on(MEMORY_COLOURS[name]))
        x += w
    total = stage.memory_total_gib
    over = f" (over by {fmt_gib(total - limit)})" if limit is not None and total > limit else ""
    canvas.text(x + 6, y + ROW_H / 2, fmt_gib(total) + over, size=11, bold=True, color=MEASURED if over else "#222222")
