"""Measure a model and a cluster, and hand the measurements to the cost model.

- :func:`galvatron.profiler.model.profile_model`: per-layer time and memory -> :class:`ModelProfile`
- :func:`galvatron.profiler.cluster.profile_cluster`: collectives, overlap, NVML -> :class:`ClusterProfile`
- :func:`galvatron.profiler.calibrate.profiled_perf`: a cost-model ``Perf`` from either or both

Importing this package is light: the profilers import torch's heavier modules when they run.
"""

from galvatron.profiler.schema import ClusterProfile, ModelProfile, ProfileError, load_profile

__all__ = ["ClusterProfile", "ModelProfile", "ProfileError", "load_profile"]
