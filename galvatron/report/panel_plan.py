"""Panel 1: the plan as a per-layer diagram. One column per block (plus embedding and head), one
track per strategy dimension, runs of equal values merged and labelled; the layer groups listed below."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from galvatron.plan import CPKind, LayerStrategy, Plan, format_strategy
from galvatron.report.draw import MUTED, Canvas, fit_label
from galvatron.report.style import CP_KINDS, FLAG, NEUTRAL, RECOMPUTE, WIDTH, degree_colour, group_colour, text_on

LABEL_W = 96
EDGE_W = 44
"""Width of the embedding and head columns."""
TRACK_H = 22
ROW_H = 18


@dataclass(frozen=True)
class Cell:
    """One column of the diagram: a block, or the embedding / head."""

    name: str
    stage: int
    strategy: LayerStrategy


def _cp(s: LayerStrategy) -> tuple[str, str]:
    if s.cp == 1:
        return "cp1", NEUTRAL
    kind = f" u{s.ulysses_degree}xr{s.ring_degree}" if s.cp_kind is CPKind.HYBRID else ""
    return f"cp{s.cp} {s.cp_kind.value}{kind}", CP_KINDS[s.cp_kind.value]


TRACKS: tuple[tuple[str, Callable[[LayerStrategy], tuple[str, str]]], ...] = (
    ("dp", lambda s: (f"dp{s.dp}", degree_colour("dp", s.dp))),
    ("tp", lambda s: (f"tp{s.tp}", degree_colour("tp", s.tp))),
    ("sp", lambda s: ("sp" if s.sp else "no sp", FLAG if s.sp else NEUTRAL)),
    ("cp", _cp),
    ("ep", lambda s: (f"ep{s.ep}" + (f" etp{s.etp}" if s.etp else ""), degree_colour("ep", s.ep))),
    ("zero", lambda s: (f"zero{s.zero}", degree_colour("zero", 2**s.zero))),
    ("recompute", lambda s: (s.recompute.value, RECOMPUTE[s.recompute.value])),
    ("offload", lambda s: ("offload" if s.offload else "no offload", FLAG if s.offload else NEUTRAL)),
)
"""(name, strategy -> (label, colour)) for each strategy dimension drawn."""


def cells(plan: Plan) -> list[Cell]:
    """Embedding, every block, head: the columns of the diagram."""
    out = [Cell("emb", 0, plan.embedding_strategy)]
    for j, stage in enumerate(plan.stages):
        out += [Cell(str(i), j, g.strategy) for g in stage.groups for i in range(g.start, g.end)]
    return [*out, Cell("head", len(plan.stages) - 1, plan.head_strategy)]


def draw_plan(plan: Plan) -> Canvas:
    """The plan diagram and its list of layer groups."""
    columns = cells(plan)
    xs = _column_xs(plan.num_layers)
    rows = _group_rows(plan)
    height = 24 + TRACK_H * (len(TRACKS) + 1) + 30 + ROW_H * (len(rows) + 1) + 10
    canvas = Canvas(WIDTH, height)
    y = 24.0
    _stage_track(canvas, plan, columns, xs, y)
    for name, value in TRACKS:
        y += TRACK_H
        canvas.text(LABEL_W - 8, y + TRACK_H / 2, name, anchor="end", size=12)
        _runs(canvas, [value(c.strategy) for c in columns], xs, y, columns)
    _axis(canvas, plan, columns, xs, y + TRACK_H + 10)
    _group_list(canvas, rows, y + TRACK_H + 34)
    canvas.text(0, 10, f"{plan.num_layers} blocks, {len(plan.stages)} stage(s) on {plan.world_size} GPUs; "
                "hover a cell for its full strategy", size=12, color=MUTED)
    return canvas


def _column_xs(num_layers: int) -> list[tuple[float, float]]:
    """(x, width) of the embedding column, each block and the head column."""
    block_w = (WIDTH - LABEL_W - 2 * EDGE_W - 8) / num_layers
    first = LABEL_W + EDGE_W + 4
    blocks = [(first + i * block_w, block_w) for i in range(num_layers)]
    return [(float(LABEL_W), float(EDGE_W)), *blocks, (first + num_layers * block_w + 4, float(EDGE_W))]


def _stage_track(canvas: Canvas, plan: Plan, columns: list[Cell], xs: list[tuple[float, float]], y: float) -> None:
    canvas.text(LABEL_W - 8, y + TRACK_H / 2, "stage", anchor="end", size=12, bold=True)
    values = []
    for cell in columns:
        group = cell.stage % plan.pp
        label = f"S{cell.stage}" + (f" (group {group})" if plan.pipeline.virtual_stages > 1 else "")
        values.append((f"{label} · {plan.stages[cell.stage].devices} GPUs", group_colour(group)))
    _runs(canvas, values, xs, y, columns)


def _runs(canvas: Canvas, values: list[tuple[str, str]], xs: list[tuple[float, float]], y: float,
          columns: list[Cell]) -> None:
    """Merge neighbouring cells of one stage with the same value into one labelled box."""
    start = 0
    for i in range(1, len(values) + 1):
        if i < len(values) and columns[i].stage == columns[start].stage and values[i] == values[start]:
            continue
        x0, x1 = xs[start][0], xs[i - 1][0] + xs[i - 1][1]
        label, fill = values[start]
        span = f"{columns[start].name}..{columns[i - 1].name}" if i - 1 > start else columns[start].name
        canvas.rect(x0, y + 1, x1 - x0, TRACK_H - 2, fill, stroke="#ffffff",
                    title=f"{span}: {label} | {format_strategy(columns[start].strategy)}")
        shown = fit_label(label, x1 - x0, 11)
        if shown:
            canvas.text((x0 + x1) / 2, y + TRACK_H / 2, shown, anchor="middle", size=11, color=text_on(fill))
        start = i


def _axis(canvas: Canvas, plan: Plan, columns: list[Cell], xs: list[tuple[float, float]], y: float) -> None:
    """Block numbers at every group boundary (and the edges)."""
    canvas.text(LABEL_W - 8, y, "block", anchor="end", size=11, color=MUTED)
    marks = {0, plan.num_layers - 1} | {g.start for g in plan.groups()}
    last = -100.0
    for index, cell in enumerate(columns):
        if cell.name in ("emb", "head"):
            canvas.text(xs[index][0] + EDGE_W / 2, y, cell.name, anchor="middle", size=10, color=MUTED)
        elif int(cell.name) in marks and xs[index][0] - last > 18:
            canvas.text(xs[index][0] + xs[index][1] / 2, y, cell.name, anchor="middle", size=10, color=MUTED)
            last = xs[index][0]


def _group_rows(plan: Plan) -> list[tuple[str, str, str, str]]:
    rows = []
    for j, stage in enumerate(plan.stages):
        for g in stage.groups:
            rows.append((f"S{j}", f"layers [{g.start}:{g.end})", f"{stage.devices} GPUs", format_strategy(g.strategy)))
    for name, value, stage in (("embedding", plan.embedding, plan.stages[0]), ("head", plan.head, plan.stages[-1])):
        if value is not None:
            rows.append(("", name, f"{stage.devices} GPUs", format_strategy(value)))
    return rows


def _group_list(canvas: Canvas, rows: list[tuple[str, str, str, str]], y: float) -> None:
    columns = (LABEL_W - 60, LABEL_W, LABEL_W + 150, LABEL_W + 240)
    for x, head in zip(columns, ("stage", "layer group", "devices", "strategy")):
        canvas.text(x, y, head, size=12, bold=True)
    for r, row in enumerate(rows, start=1):
        for x, value in zip(columns, row):
            canvas.text(x, y + r * ROW_H, value, size=12)
