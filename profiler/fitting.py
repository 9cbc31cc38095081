"""Non-negative least squares on relative error: the fits of profiles and the calibration of rates."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def relative_nnls(rows: Sequence[Sequence[float]], targets: Sequence[float],
                  weights: Sequence[float] | None = None) -> tuple[list[float], float]:
    """Non-negative ``x`` minimising the weighted squared relative errors ``sum(w * ((row . x - y) / y)^2)``.

    Every subset of the columns is solved by least squares and the best solution with no negative
    entry is kept, so a column the data cannot pin down (a term the points do not vary) gets 0.
    Points with ``y <= 0`` are left out. Returns ``x`` and the largest relative error; all zeros when
    nothing can be fitted.
    """
    w = weights if weights is not None else [1.0] * len(targets)
    kept = [(row, y, wi) for row, y, wi in zip(rows, targets, w) if y > 0 and wi > 0]
    width = len(rows[0]) if rows else 0
    best: tuple[float, list[float]] | None = None
    for size in range(width, 0, -1):
        for cols in itertools.combinations(range(width), size):
            x = _solve(kept, cols, width)
            if x is None or min(x) < 0:
                continue
            error = _sse(kept, x)
            if best is None or error < best[0] * (1 - 1e-9):
                best = (error, x)
    if best is None:
        return [0.0] * width, 0.0
    x = best[1]
    return x, max((abs(_dot(row, x) - y) / y for row, y, _ in kept), default=0.0)


def _solve(points: Sequence[tuple[Sequence[float], float, float]], cols: tuple[int, ...],
           width: int) -> list[float] | None:
    if len(points) < len(cols):
        return None
    a = torch.tensor([[row[c] * w**0.5 / y for c in cols] for row, y, w in points], dtype=torch.float64)
    scale = a.abs().amax(dim=0)
    if bool((scale == 0).any()):
        return None
    b = torch.tensor([[w**0.5] for _, _, w in points], dtype=torch.float64)
    result = torch.linalg.lstsq(a / scale, b, driver="gelsd")
    if int(result.rank) < len(cols):
        return None
    solution = (result.solution[:, 0] / scale).tolist()
    x = [0.0] * width
    for c, value in zip(cols, solution):
        x[c] = value
    return x


def _dot(row: Sequence[float], x: Sequence[float]) -> float:
    return sum(r * v for r, v in zip(row, x))


def _sse(points: Sequence[tuple[Sequence[float], float, float]], x: Sequence[float]) -> float:
    return sum(w * ((_dot(row, x) - y) / y) ** 2 for row, y, w in points)
