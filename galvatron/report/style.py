"""Colours, number formats and the page width shared by every panel, so the HTML page, the PNG and
the tests agree on how a number is written."""

from __future__ import annotations

WIDTH = 1320
"""Width of every panel, pixels."""

NEUTRAL = "#ececec"
"""A strategy dimension that is off (degree 1, no recomputation, ...)."""

# sequential scales, light to dark, for degrees 2, 4, 8, 16, 32+
SCALES = {
    "dp": ("#c6dbef", "#9ecae1", "#6baed6", "#3182bd", "#08519c"),
    "tp": ("#fdd0a2", "#fdae6b", "#fd8d3c", "#e6550d", "#a63603"),
    "ep": ("#c7e9c0", "#a1d99b", "#74c476", "#31a354", "#006d2c"),
    "zero": ("#dadaeb", "#bcbddc", "#9e9ac8", "#756bb1"),
}
CP_KINDS = {"ulysses": "#1f9e89", "ring": "#d6604d", "striped": "#b2182b", "hybrid": "#8e5ea2"}
RECOMPUTE = {"none": NEUTRAL, "selective": "#fee08b", "full": "#f46d43"}
FLAG = "#35978f"
"""sp and offload when on."""

GROUPS = ("#4c78a8", "#72b7b2", "#54a24b", "#b279a2", "#9d755d", "#e45756", "#eeca3b", "#ff9da6")
"""Device groups (pipeline stages), cycled."""

PASS_COLOURS = {"F": "#4c78a8", "B": "#f58518", "W": "#eeca3b", "sync": "#e45756", "optimizer": "#9d9d9d"}
BUBBLE = "#fbe3e3"
MEMORY_COLOURS = {"params": "#4c78a8", "grads": "#72b7b2", "optimizer": "#b279a2", "activations": "#f58518",
                  "buffers": "#9d755d", "other": "#bab0ac"}
MEASURED = "#d62728"
PREDICTED = "#1f77b4"


def degree_colour(kind: str, degree: int) -> str:
    """Colour of a parallel degree (1 is neutral) on the scale of ``kind``."""
    if degree <= 1:
        return NEUTRAL
    scale = SCALES[kind]
    return scale[min(degree.bit_length() - 2, len(scale) - 1)]


def text_on(fill: str) -> str:
    """Black or white, whichever reads better on ``fill`` (``#rrggbb``)."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#111111" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


def group_colour(group: int) -> str:
    return GROUPS[group % len(GROUPS)]


def fmt_seconds(seconds: float) -> str:
    """``1.869 s``, ``12.4 ms`` or ``85 µs``."""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_tick(seconds: float) -> str:
    """A short axis label: ``0``, ``2 s``, ``500 ms``."""
    if seconds == 0:
        return "0"
    if seconds >= 1:
        return f"{seconds:g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g} ms"
    return f"{seconds * 1e6:g} µs"


def fmt_gib(gib: float) -> str:
    return f"{gib:.2f} GiB"


def fmt_tokens(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f} tok/s"


def fmt_pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def fmt_tflops(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s"
