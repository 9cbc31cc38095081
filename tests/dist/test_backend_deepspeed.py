"""The DeepSpeed backend on 2 gloo ranks: ZeRO 0-3, CPU offload, gradient accumulation and
recomputation through ``deepspeed.initialize``; every loss and final parameter must equal
single-process training and the native backend under the same plan (one launch for all cases)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_runtime_harness import ADAM_EPS, LR, MODELS, MOMENTUM, Case, batches, loss_fn, mismatches, reference, uniform

from galvatron.plan import Plan
from galvatron.testing import run_ranks

pytestmark = pytest.mark.slow

WORLD = 2


def _micro(plan: Plan, n: int) -> Plan:
    return Plan.from_dict({**plan.to_dict(), "num_micro_batches": n})


CASES = [
    *[Case(f"zero{z}", "gpt", uniform(WORLD, zero=z)) for z in range(4)],
    Case("zero1-offload-adam", "gpt", uniform(WORLD, zero=1, offload=True), adam=True),
    Case("zero2-offload", "gpt", uniform(WORLD, zero=2, offload=True)),
    Case("zero3-offload-adam", "gpt", uniform(WORLD, zero=3, offload=True), adam=True),
    Case("zero2-micro2", "gpt-swiglu-gqa", _micro(uniform(WORLD, zero=2), 2)),
    Case("zero3-recompute-full", "gpt", uniform(WORLD, zero=3, recompute="full")),
    Case("zero1-recompute-selective-tied", "gpt-tied", uniform(WORLD, zero=1, recompute="selective")),
]


def _train(case: Case, backend: str) -> dict[str, Any]:
    import galvatron

    model = galvatron.wrap(MODELS[case.model](), case.plan, backend=backend)
    kwargs = {"lr": 1e-2, "eps": ADAM_EPS} if case.adam else {"lr": LR, "momentum": MOMENTUM}
    opt = model.optimizer(torch.optim.AdamW if case.adam else torch.optim.SGD, **kwargs)
    losses = []
    for tokens, targets in batches():
        losses.append(model.train_step(model.shard_batch((tokens, targets)), loss_fn).item())
        opt.step()
        opt.zero_grad()
    if backend == "native":
        from galvatron.runtime.checkpoint import full_state_dict

        return {"losses": losses, "params": full_state_dict(model)}
    engine = model.engine
    stored = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    return {"losses": losses, "params": model.full_state_dict(), "stage": engine.zero_optimization_stage(),
            "offload": engine.zero_cpu_offload() or bool(engine.zero_offload_param()), "stored": stored,
            "accumulation": engine.gradient_accumulation_steps()}


def _errors() -> dict[str, str]:
    """Misuse that must fail with a clear message (on the live 2-rank world)."""
    import galvatron

    out = {}
    model = galvatron.wrap(MODELS["gpt"](), uniform(WORLD, zero=1), backend="deepspeed")
    try:
        model.train_step(model.shard_batch(batches()[0]), loss_fn)
    except galvatron.GalvatronError as err:
        out["no-optimizer"] = str(err)
    try:
        galvatron.wrap(MODELS["gpt"](), uniform(WORLD, tp=2), backend="deepspeed")
    except galvatron.PlanError as err:
        out["tp"] = str(err)
    return out


def _rank_main(cases: list[Case]) -> dict[str, Any]:
    out: dict[str, Any] = {("deepspeed", c.name): _train(c, "deepspeed") for c in cases}
    out |= {("native", c.name): _train(c, "native") for c in cases}
    out["errors"] = _errors()
    return out


@pytest.fixture(scope="module")
def launched() -> tuple[dict[tuple[str, bool], Any], list[dict[Any, Any]]]:
    refs = {(c.model, c.adam): reference(c.model, c.adam) for c in CASES}
    return refs, run_ranks(_rank_main, WORLD, CASES, timeout=600)


def _by_backend(ranks: list[dict[Any, Any]], backend: str) -> list[dict[str, Any]]:
    return [{k[1]: v for k, v in r.items() if isinstance(k, tuple) and k[0] == backend} for r in ranks]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_deepspeed_matches_single_process_and_native(launched: Any, case: Case) -> None:
    refs, ranks = launched
    ds, native = _by_backend(ranks, "deepspeed"), _by_backend(ranks, "native")
    assert mismatches(refs, ds, case) == []
    assert mismatches(refs, native, case) == []
    for rank in range(WORLD):
        a, b = ds[rank][case.name], native[rank][case.name]
        assert torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=1e-6)
        for name, value in b["params"].items():
            assert torch.allclose(a["params"][name], value, rtol=1e-4, atol=1e-5), name
    s = case.plan.embedding_strategy
    result = ds[0][case.name]
    assert (result["stage"], result["offload"], result["accumulation"]) == (s.zero, s.offload,
                                                                             case.plan.num_micro_batches)
    total = sum(p.numel() for p in MODELS[case.model]().parameters())
    assert result["stored"] < total / WORLD * 1.5 if s.zero == 3 else result["stored"] == total


def test_deepspeed_misuse_fails_clearly(launched: Any) -> None:
    errors = launched[1][0]["errors"]
    assert "call model.optimizer(...) before training" in errors["no-optimizer"]
    assert errors["tp"].startswith("stages[0].layers[0:4].tp: tp is not executed by the deepspeed backend")
