"""galvatron: automatic hybrid parallelism for PyTorch training.

``model = galvatron.wrap(model)`` profiles or looks up the model and cluster, searches the fastest
plan that fits in memory, and runs the unmodified module under it. Importing this package is
light: torch is imported, nothing else heavy, and no process group is started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from galvatron.errors import ConfigError, GalvatronError, ModelSpecError, PlanError
from galvatron.plan import CPKind, DType, LayerGroup, LayerStrategy, Pipeline, Plan, Recompute, Schedule, Stage
from galvatron.spec import LayerKind, LayerSpec, ModelSpec

if TYPE_CHECKING:
    from galvatron.runtime.apply import wrap

__version__ = "0.1.0"

__all__ = [
    "CPKind",
    "ConfigError",
    "DType",
    "GalvatronError",
    "LayerGroup",
    "LayerKind",
    "LayerSpec",
    "LayerStrategy",
    "ModelSpec",
    "ModelSpecError",
    "Pipeline",
    "Plan",
    "PlanError",
    "Recompute",
    "Schedule",
    "Stage",
    "__version__",
    "wrap",
]


def __getattr__(name: str) -> Any:
    if name == "wrap":
        from galvatron.runtime.apply import wrap

        return wrap
    raise AttributeError(f"module 'galvatron' has no attribute {name!r}")
