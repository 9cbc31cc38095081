"""The native runtime on GPUs with NCCL (skipped without CUDA; multi-GPU cases need 2+ GPUs):
the same plans as the gloo tests, against single-process CPU training, and bf16 training."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from test_runtime_harness import BATCH, LAYERS, MODELS, Case, batches, check, loss_fn, plan_dict, uniform
from test_runtime_pp import pipeline

from galvatron.plan import Plan
from galvatron.testing import run_ranks

pytestmark = pytest.mark.gpu

WORLD = 2
CASES = [
    Case("gpt-dp", "gpt", uniform(WORLD)),
    Case("gpt-zero1-adam", "gpt", uniform(WORLD, zero=1), adam=True),
    Case("gpt-zero3", "gpt", uniform(WORLD, zero=3)),
    Case("gqa-tp-sp-selective", "gpt-swiglu-gqa", uniform(WORLD, tp=2, sp=True, recompute="selective")),
    Case("gpt-dp-then-tp", "gpt", plan_dict(WORLD, [{"range": [0, 2]}, {"range": [2, 4], "tp": 2, "sp": True}])),
    Case("llama-tp-zero2", "llama", uniform(WORLD, tp=2, zero=2)),
    Case("gpt-pipeline", "gpt", pipeline(WORLD, v=2, schedule="interleaved-1f1b")),
]


def _multi_gpu() -> None:
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_nccl_plans_match_single_process(case: Case) -> None:
    _multi_gpu()
    check("gpu", WORLD, CASES, case, backend="nccl")


def _bf16(plan: Plan) -> list[float]:
    import galvatron

    model = galvatron.wrap(MODELS["gpt"](), plan)
    opt = model.optimizer(torch.optim.AdamW, lr=1e-2)
    losses = []
    for _ in range(4):
        for tokens, targets in batches():
            losses.append(model.train_step(model.shard_batch((tokens, targets)), loss_fn).item())
            opt.step()
            opt.zero_grad()
    return losses


@pytest.mark.parametrize("world", [1, WORLD])
def test_bf16_trains(world: int) -> None:
    if world > 1:
        _multi_gpu()
    plan = Plan.uniform(LAYERS, global_batch_size=BATCH, dp=world, zero=3 if world > 1 else 0, dtype="bf16")
    losses: Any = run_ranks(_bf16, world, plan, backend="nccl", timeout=300)[0]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
