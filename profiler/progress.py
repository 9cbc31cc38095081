"""Console output of the profilers: a progress bar on stderr and plain-text summary tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO


class Progress:
    """``[#####.....] 12/48 attention mb=2 s=1024 (3.1 s)`` on stderr, redrawn in place on a terminal;
    elsewhere (logs, CI) one line per tenth of the work. ``enabled=False`` prints nothing."""

    def __init__(self, total: int, title: str, *, enabled: bool = True, stream: TextIO | None = None,
                 width: int = 24) -> None:
        self.total, self.title, self.enabled, self.width = max(total, 1), title, enabled, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth = -1

    def step(self, label: str = "") -> None:
        """One unit of work finished."""
        self.done = min(self.done + 1, self.total)
        if not self.enabled:
            return
        tenth = 10 * self.done // self.total
        if not self._tty and tenth == self._last_tenth and self.done < self.total:
            return
        self._last_tenth = tenth
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.title} [{bar}] {self.done}/{self.total} {label} ({time.perf_counter() - self.start:.1f} s)"
        if self._tty:
            self.stream.write("\r\033[K" + line)
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width text table, numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def human_bytes(n: float) -> str:
    """``1.5 MiB`` style."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    """``12.3 ms`` style."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"
