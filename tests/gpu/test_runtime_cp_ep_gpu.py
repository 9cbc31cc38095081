"""Context and expert parallelism under ``galvatron.wrap`` on GPUs with NCCL (skipped without
CUDA; a world size is skipped without as many GPUs): the cases of tests/dist/test_runtime_cp.py
and tests/dist/test_runtime_ep.py, one GPU per rank, against single-process CPU training with
the float32 tolerances widened tenfold (GPU kernels against CPU ones)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
import test_runtime_cp as cp
import test_runtime_ep as ep
import test_runtime_harness as harness

pytestmark = pytest.mark.gpu

SCALE = 10.0


def _gpus(world: int) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_on_nccl(world: int) -> None:
    _gpus(world)
    refs, _, ranks = cp.results(world, "nccl")
    bad = {c.name: p for c in cp.CASES[world] if (p := harness.mismatches(refs, ranks, c, scale=SCALE))}
    assert not bad, "\n".join(f"{name}: {p[:3]}" for name, p in bad.items())
    for name, (w, _) in cp.IGNORED.items():
        if w == world:
            assert cp.ignored_mismatch(world, f"{name}-exact", name.split("-")[0], "nccl") < 2e-5 * SCALE


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_on_nccl(world: int) -> None:
    _gpus(world)
    bad = {c.name: p for c in ep.CASES[world] if (p := ep.mismatches(world, c, "nccl", scale=SCALE))}
    assert not bad, "\n".join(f"{name}: {p[:3]}" for name, p in bad.items())
