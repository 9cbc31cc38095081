"""``model.optimizer(...)`` over parameters that mix plain tensors and DTensors (tensor parallelism
shards linear weights, not norm weights): PyTorch's multi-tensor and fused paths refuse such lists
(on CUDA they are the default), so the optimizer takes its per-parameter path; a requested
``foreach=True`` falls back with a warning and gives the same numbers."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from galvatron.testing import run_ranks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import MODELS, batches, loss_fn, uniform

pytestmark = pytest.mark.slow


def _train(plan_kw: dict[str, Any], opt_kw: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
    import galvatron

    model = galvatron.wrap(MODELS["gpt"](), uniform(2, **plan_kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = model.optimizer(torch.optim.SGD, lr=0.1, momentum=0.9, **opt_kw)
    losses = []
    for tokens, targets in batches()[:2]:
        losses.append(model.train_step(model.shard_batch((tokens, targets)), loss_fn).item())
        opt.step()
        opt.zero_grad()
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    return losses, params, [str(w.message) for w in caught]


def _rank(_: None) -> dict[str, Any]:
    out = {}
    for name, plan_kw in (("tp2", {"tp": 2}), ("dp2", {})):
        out[name] = {"default": _train(plan_kw, {}), "foreach": _train(plan_kw, {"foreach": True})}
    return out


def test_mixed_parameters_take_the_per_parameter_path() -> None:
    ranks = run_ranks(_rank, 2, None, timeout=180)
    for result in ranks:
        tp_default, tp_foreach = result["tp2"]["default"], result["tp2"]["foreach"]
        assert tp_foreach[0] == tp_default[0]
        for name, value in tp_default[1].items():
            torch.testing.assert_close(tp_foreach[1][name], value, rtol=0, atol=0)
        assert any("per-parameter path" in w for w in tp_foreach[2])
        assert not tp_default[2]
        dp_default, dp_foreach = result["dp2"]["default"], result["dp2"]["foreach"]  # one kind: foreach kept
        assert not dp_foreach[2] and dp_foreach[0] == dp_default[0]
