"""Errors raised by galvatron. Every user-facing failure is one of these, never an ``assert``."""

from __future__ import annotations


class GalvatronError(Exception):
    """Base class of every error galvatron raises on purpose."""


class PlanError(GalvatronError, ValueError):
    """A plan that cannot run: the message starts with the field path, e.g.
    ``stages[1].layers[4:8].tp: 3 does not divide 8 devices``."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class ModelSpecError(GalvatronError, ValueError):
    """A model description that is incomplete or inconsistent."""


class ConfigError(GalvatronError, ValueError):
    """A YAML or preset (model, cluster, hardware) that cannot be read."""


class MemoryBudgetError(GalvatronError, ValueError):
    """A plan, or every plan of a search, needs more device memory than the GPUs have."""
