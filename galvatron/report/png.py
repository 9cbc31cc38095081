"""PNG export through matplotlib (an optional dependency, imported only here and only when called)."""

from __future__ import annotations

from pathlib import Path

from galvatron.report.data import Report, ReportError
from galvatron.report.draw import MUTED, Canvas, draw_on_axes, text_width
from galvatron.report.page import panels, summary_items
from galvatron.report.style import WIDTH

MARGIN = 20
HEADING_H = 34


def save_png(report: Report, path: str | Path, dpi: int = 100) -> Path:
    """Draw every panel of the report, one under the other, into a PNG at ``path``."""
    try:
        from matplotlib.figure import Figure  # a bare Figure: no pyplot, no global backend switch
    except ImportError:
        raise ReportError("PNG export needs matplotlib: pip install matplotlib (or galvatron[dev])") from None
    pieces, height = _layout(report)
    fig = Figure(figsize=((WIDTH + 2 * MARGIN) / 100, height / 100), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-MARGIN, WIDTH + MARGIN)
    ax.set_ylim(height, 0)
    ax.axis("off")
    for canvas, y in pieces:
        draw_on_axes(ax, canvas, y)
    out = Path(path)
    fig.savefig(out, dpi=dpi, facecolor="white")
    return out


def _layout(report: Report) -> tuple[list[tuple[Canvas, float]], float]:
    """(canvas, top y) for the header and each panel, one under the other, and the total height."""
    lines = _wrap([f"{k}: {v}" for k, v in summary_items(report)], "   ", 12)
    header = Canvas(WIDTH, 52 + 18 * len(lines))
    header.text(0, 20, report.title, size=20, bold=True)
    for i, line in enumerate(lines):
        header.text(0, 46 + 18 * i, line, size=12, color=MUTED)
    pieces, y = [(header, 0.0)], header.height
    for panel in panels(report):
        title = Canvas(WIDTH, HEADING_H)
        title.text(0, HEADING_H / 2, panel.heading, size=16, bold=True)
        pieces.append((title, y))
        y += HEADING_H
        if panel.canvas is not None:
            pieces.append((panel.canvas, y))
            y += panel.canvas.height
        if panel.note:
            note = Canvas(WIDTH, 28)
            note.text(0, 12, panel.note, size=12, color="#8a5a00")
            pieces.append((note, y))
            y += note.height
        y += 12
    return pieces, y


def _wrap(items: list[str], sep: str, size: float) -> list[str]:
    """Join ``items`` with ``sep`` into lines no wider than the page."""
    lines = [items[0]]
    for item in items[1:]:
        joined = lines[-1] + sep + item
        if text_width(joined, size) <= WIDTH:
            lines[-1] = joined
        else:
            lines.append(item)
    return lines
