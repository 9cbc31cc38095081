"""``model.optimizer(...)`` over parameters that mix plain tensors and DTensors (tensor parallelism
shards linear weights, not norm weights): PyTorch's multi-tensor and fused paths run one kernel per
list and refuse lists that mix them, so each step runs every kind of tensor apart; a requested
``foreach=True`` is kept (its multi-tensor kernels run), gives the per-parameter path's numbers, and
leaves the optimizer's parameter groups as built."""

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


def _train(plan_kw: dict[str, Any], opt_kw: dict[str, Any]) -> dict[str, Any]:
    import torch.optim.sgd as sgd

    import galvatron
    from galvatron.runtime.optim import _tensor_kind

    model = galvatron.wrap(MODELS["gpt"](), uniform(2, **plan_kw))
    calls = {"multi": 0}
    multi = sgd._multi_tensor_sgd

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["multi"] += 1
        return multi(*args, **kwargs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = model.optimizer(torch.optim.SGD, lr=0.1, momentum=0.9, **opt_kw)
        sgd._multi_tensor_sgd = counted
        try:
            losses = []
            for tokens, targets in batches()[:2]:
                losses.append(model.train_step(model.shard_batch((tokens, targets)), loss_fn).item())
                opt.step()
                opt.zero_grad()
        finally:
            sgd._multi_tensor_sgd = multi
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    return {"losses": losses, "params": params, "warnings": [str(w.message) for w in caught],
            "multi_tensor_calls": calls["multi"], "groups": len(opt.param_groups),
            "types": len({type(p).__name__ for g in opt.param_groups for p in g["params"]}),
            "kinds": len({_tensor_kind(p) for g in opt.param_groups for p in g["params"]})}


def _rank(_: None) -> dict[str, Any]:
    out = {}
    for name, plan_kw in (("tp2", {"tp": 2}), ("dp2", {})):
        out[name] = {"default": _train(plan_kw, {}), "foreach": _train(plan_kw, {"foreach": True})}
    return out


def test_mixed_parameters_keep_the_requested_path() -> None:
    ranks = run_ranks(_rank, 2, None, timeout=180)
    for result in ranks:
        tp_default, tp_foreach = result["tp2"]["default"], result["tp2"]["foreach"]
        assert tp_foreach["losses"] == tp_default["losses"]
        for name, value in tp_default["params"].items():
            torch.testing.assert_close(tp_foreach["params"][name], value, rtol=0, atol=0)
        assert not tp_foreach["warnings"] and not tp_default["warnings"]
        # two steps, each over every kind apart (plain; DTensors by placement); the CPU default runs per parameter
        assert tp_foreach["kinds"] >= 2 and tp_default["multi_tensor_calls"] == 0
        assert tp_foreach["multi_tensor_calls"] == 2 * tp_foreach["kinds"]
        assert (tp_foreach["groups"], tp_foreach["types"]) == (1, 2)  # the groups as built: one, of both types
        dp_default, dp_foreach = result["dp2"]["default"], result["dp2"]["foreach"]  # one kind
        assert not dp_foreach["warnings"] and dp_foreach["losses"] == dp_default["losses"]
        assert dp_foreach["multi_tensor_calls"] == 2
