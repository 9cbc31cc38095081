"""A tiny vector canvas (rectangles, text, lines) with two back ends: inline SVG for the HTML page
and matplotlib for PNG export. Panels draw once onto a :class:`Canvas`; both outputs show the same.

Coordinates are pixels, y downwards; a text's ``y`` is its vertical centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Any

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
INK = "#222222"
MUTED = "#666666"


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str
    stroke: str | None = None
    hatch: bool = False
    """Diagonal hatching over the fill (communication inside a pass, bubbles)."""
    title: str | None = None
    """Hover text in the HTML page."""


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    size: float = 12
    anchor: str = "start"
    """``start``, ``middle`` or ``end``."""
    bold: bool = False
    color: str = INK


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    color: str = INK
    width: float = 1.0
    dashed: bool = False


@dataclass
class Canvas:
    """A drawing of ``width`` x ``height`` pixels."""

    width: float
    height: float
    items: list[Rect | Text | Line] = field(default_factory=list)

    def rect(self, x: float, y: float, w: float, h: float, fill: str, **kw: Any) -> None:
        self.items.append(Rect(x, y, w, h, fill, **kw))

    def text(self, x: float, y: float, text: str, **kw: Any) -> None:
        self.items.append(Text(x, y, text, **kw))

    def line(self, x1: float, y1: float, x2: float, y2: float, **kw: Any) -> None:
        self.items.append(Line(x1, y1, x2, y2, **kw))


def text_width(text: str, size: float) -> float:
    """Approximate rendered width of ``text`` in pixels (sans-serif average advance)."""
    return 0.58 * size * len(text)


def fit_label(text: str, width: float, size: float) -> str:
    """``text`` when it fits in ``width`` pixels, else an empty string."""
    return text if text_width(text, size) <= width - 4 else ""


# ------------------------------------------------------------------------------------------------ SVG
_HATCH = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
          'patternTransform="rotate(45)"><rect width="2.2" height="6" fill="#000" fill-opacity="0.28"/>'
          '</pattern></defs>')
_ANCHORS = {"start", "middle", "end"}


def to_svg(canvas: Canvas, label: str) -> str:
    """Inline SVG (no namespace URL needed inside HTML5); ``label`` is its accessible name."""
    parts = [f'<svg role="img" aria-label="{escape(label)}" width="{canvas.width:.0f}" height="{canvas.height:.0f}" '
             f'viewBox="0 0 {canvas.width:.0f} {canvas.height:.0f}" font-family="{FONT}">', _HATCH]
    parts += [_svg_item(item) for item in canvas.items]
    parts.append("</svg>")
    return "\n".join(parts)


def _svg_item(item: Rect | Text | Line) -> str:
    if isinstance(item, Rect):
        box = f'x="{item.x:.1f}" y="{item.y:.1f}" width="{max(item.w, 0):.1f}" height="{item.h:.1f}"'
        stroke = f' stroke="{item.stroke}" stroke-width="0.8"' if item.stroke else ""
        title = f"<title>{escape(item.title)}</title>" if item.title else ""
        out = f'<rect {box} fill="{item.fill}"{stroke}>{title}</rect>'
        if item.hatch:
            out += f'<rect {box} fill="url(#hatch)" pointer-events="none"/>'
        return out
    if isinstance(item, Text):
        if item.anchor not in _ANCHORS:
            raise ValueError(f"text anchor {item.anchor!r} is not one of {sorted(_ANCHORS)}")
        weight = ' font-weight="bold"' if item.bold else ""
        return (f'<text x="{item.x:.1f}" y="{item.y:.1f}" font-size="{item.size:g}" text-anchor="{item.anchor}" '
                f'dominant-baseline="central" fill="{item.color}"{weight}>{escape(item.text)}</text>')
    dash = ' stroke-dasharray="5,4"' if item.dashed else ""
    return (f'<line x1="{item.x1:.1f}" y1="{item.y1:.1f}" x2="{item.x2:.1f}" y2="{item.y2:.1f}" '
            f'stroke="{item.color}" stroke-width="{item.width:g}"{dash}/>')


# ----------------------------------------------------------------------------------------- matplotlib
_HA = {"start": "left", "middle": "center", "end": "right"}


def draw_on_axes(ax: Any, canvas: Canvas, dy: float = 0.0) -> None:
    """Draw ``canvas`` onto a matplotlib axes whose data units are pixels (y downwards), ``dy`` lower."""
    from matplotlib.patches import Rectangle

    for item in canvas.items:
        if isinstance(item, Rect):
            ax.add_patch(Rectangle((item.x, item.y + dy), max(item.w, 0), item.h, facecolor=item.fill,
                                   edgecolor=item.stroke or "none", linewidth=0.6))
            if item.hatch:
                ax.add_patch(Rectangle((item.x, item.y + dy), max(item.w, 0), item.h, fill=False, hatch="///",
                                       edgecolor="#00000055", linewidth=0))
        elif isinstance(item, Text):
            ax.text(item.x, item.y + dy, item.text, fontsize=item.size * 0.72, ha=_HA[item.anchor], va="center",
                    color=item.color, fontweight="bold" if item.bold else "normal")
        else:
            ax.plot([item.x1, item.x2], [item.y1 + dy, item.y2 + dy], color=item.color, linewidth=item.width * 0.72,
                    linestyle="--" if item.dashed else "-")


def nice_step(span: float, count: int = 8) -> float:
    """A round step (1, 2 or 5 times a power of ten) that cuts ``span`` into about ``count`` parts."""
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def nice_ticks(limit: float, count: int = 8) -> list[float]:
    """Round tick values ``0, step, 2 step, ...`` up to ``limit`` with about ``count`` of them."""
    if limit <= 0:
        return [0.0]
    step = nice_step(limit, count)
    return [i * step for i in range(int(limit / step + 1e-9) + 1)]


def legend(canvas: Canvas, x: float, y: float, entries: list[tuple[str, str, bool]]) -> None:
    """A row of (colour, label, hatched) swatches starting at ``(x, y)``."""
    for fill, label, hatch in entries:
        canvas.rect(x, y - 6, 14, 12, fill, stroke="#999999", hatch=hatch)
        canvas.text(x + 19, y, label, size=11)
        x += 19 + text_width(label, 11) + 18
