"""Panel 4: the top-K plans of a search, best first, with predicted throughput, time, memory and
a strip of each plan's per-block strategies (one colour per distinct strategy in that plan)."""

from __future__ import annotations

from collections.abc import Sequence

from galvatron.plan import Plan, format_strategy
from galvatron.report.data import CostSummary
from galvatron.report.draw import MUTED, Canvas, text_width
from galvatron.report.style import (
    GROUPS,
    MEASURED,
    PREDICTED,
    WIDTH,
    fmt_gib,
    fmt_pct,
    fmt_seconds,
    fmt_tflops,
    fmt_tokens,
)

ROW_H = 26
TOP = 30
BAR_W = 140
STRIP = (846.0, 150.0)
"""x and width of the per-block strip."""
COLUMNS = (("#", 0), ("throughput (vs #1)", 28), ("step", 306), ("per GPU", 380), ("MFU", 476), ("peak memory", 528),
           ("layout", 630), ("blocks", STRIP[0]), ("strategy (most blocks)", STRIP[0] + STRIP[1] + 12))


def layout_text(plan: Plan) -> str:
    """``pp2 vpp1 1f1b m8``: pipeline shape, schedule and micro-batch count."""
    return f"pp{plan.pp} vpp{plan.pipeline.virtual_stages} {plan.pipeline.schedule.value} m{plan.num_micro_batches}"


def strategy_text(plan: Plan) -> str:
    """The most common block strategy, and how many layer groups differ from it."""
    default = plan.default_strategy()
    others = sum(1 for g in plan.groups() if g.strategy != default)
    return format_strategy(default) + (f" + {others} other group(s)" if others else "")


def draw_top(top: Sequence[CostSummary], current: Plan) -> Canvas:
    """The ranked plans; the report's own plan is highlighted."""
    canvas = Canvas(WIDTH, TOP + ROW_H * (len(top) + 1) + 8)
    best = max(c.tokens_per_s for c in top)
    canvas.text(0, 10, f"{len(top)} plan(s), best first; bars: predicted throughput relative to the best",
                size=12, color=MUTED)
    for title, x in COLUMNS:
        canvas.text(x, TOP, title, size=12, bold=True)
    for rank, cost in enumerate(top, start=1):
        _row(canvas, rank, cost, TOP + rank * ROW_H, best, top[0].tokens_per_s, cost.plan == current)
    return canvas


def _row(canvas: Canvas, rank: int, cost: CostSummary, y: float, best: float, first: float, current: bool) -> None:
    if current:
        canvas.rect(0, y - ROW_H / 2, WIDTH, ROW_H, "#fff6d5", title="the plan this report shows")
    canvas.text(0, y, str(rank), size=12, bold=current)
    w = BAR_W * cost.tokens_per_s / best
    canvas.rect(28, y - 8, w, 16, PREDICTED, title=f"{fmt_pct(cost.tokens_per_s / best)} of the best")
    versus = "" if rank == 1 else f" ({(cost.tokens_per_s / first - 1) * 100:+.1f}%)"
    canvas.text(28 + w + 6, y, fmt_tokens(cost.tokens_per_s) + versus, size=11)
    fits = cost.fits is not False
    values = (fmt_seconds(cost.step_time_s), fmt_tflops(cost.tflops_per_gpu), fmt_pct(cost.mfu),
              fmt_gib(cost.peak_memory_gib) + ("" if fits else " ✗"), layout_text(cost.plan))
    for (_, x), value in zip(COLUMNS[2:7], values):
        canvas.text(x, y, value, size=11, color=MEASURED if value.endswith("✗") else "#222222")
    _strip(canvas, cost.plan, y)
    text = strategy_text(cost.plan)
    room = WIDTH - COLUMNS[-1][1]
    while text_width(text, 11) > room and len(text) > 4:
        text = text[:-2] + "…"
    canvas.text(COLUMNS[-1][1], y, text, size=11, color="#222222" if fits else MUTED)


def _strip(canvas: Canvas, plan: Plan, y: float) -> None:
    x0, width = STRIP
    colours: dict[object, str] = {}
    per_block = width / plan.num_layers
    for g in plan.groups():
        fill = colours.setdefault(g.strategy, GROUPS[len(colours) % len(GROUPS)])
        canvas.rect(x0 + g.start * per_block, y - 8, g.num_layers * per_block, 16, fill,
                    title=f"blocks [{g.start}:{g.end}): {format_strategy(g.strategy)}")
    for stage in plan.stages[1:]:
        x = x0 + stage.start * per_block
        canvas.line(x, y - 11, x, y + 11, color="#222222", width=1.5)
