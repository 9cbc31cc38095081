"""Runtime adaptation on 2 gloo ranks: a phase change (the global batch doubles) re-plans through a
checkpoint, to a given plan and to the search's plan; the model and optimizer state cross over
unchanged and training goes on as in one process that never switched."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from galvatron.launch.adapt import Phase, replan
from galvatron.launch.demo import TrainConfig, full_state, global_batch, gpt_config, lm_loss
from galvatron.launch.launcher import local_cpu_cluster

from galvatron import wrap
from galvatron.models.gpt import GPT
from galvatron.plan import Plan
from galvatron.spec import ModelSpec
from galvatron.testing import run_ranks

BEFORE = TrainConfig(model="gpt-tiny", global_batch=4)
AFTER = TrainConfig(model="gpt-tiny", global_batch=8)
GPT_CONFIG = gpt_config(BEFORE.model)


def _plan(world: int, batch: int, **strategy: int) -> Plan:
    return Plan.uniform(GPT_CONFIG.layers, global_batch_size=batch, dtype="fp32", dp=world, **strategy)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT(GPT_CONFIG)


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, config: TrainConfig) -> None:
    for step in steps:
        inputs, targets = global_batch(step, config, GPT_CONFIG)
        model.train_step(model.shard_batch((inputs, targets)), lm_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _run(checkpoint_dir: str, switch_to: Plan | None, search: bool, zero: int = 0) -> dict:
    world = int(os.environ["WORLD_SIZE"])
    model = wrap(_model(), plan=_plan(world, BEFORE.global_batch, **({"zero": zero} if zero else {})))
    optimizer = model.optimizer(torch.optim.AdamW, lr=1e-3)
    _steps(model, optimizer, range(3), BEFORE)
    before = full_state(model, optimizer)
    new = replan(model, optimizer, Phase(global_batch=AFTER.global_batch), step=3, model_fn=_model,
                 checkpoint_dir=checkpoint_dir, plan=None if search else switch_to,
                 spec=ModelSpec.from_config(BEFORE.model), cluster=local_cpu_cluster(world, tflops=0.02))
    crossed = full_state(new.model, new.optimizer)
    _steps(new.model, new.optimizer, range(3, 5), AFTER)
    return {"before": before, "crossed": crossed, "after": full_state(new.model, new.optimizer),
            "plan": new.choice.plan, "source": new.choice.source}


def _close(actual: tuple, expected: tuple, exact: bool) -> None:
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 2e-5}  # Adam amplifies reduction-order noise
    for name, value in expected[0].items():
        torch.testing.assert_close(actual[0][name], value, **tol, msg=_named(name))
    for name, state in expected[1]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(actual[1]["state"][name][key], value, **tol, msg=_named(f"{name}.{key}"))


TP2 = Plan.uniform(GPT_CONFIG.layers, global_batch_size=AFTER.global_batch, dtype="fp32", tp=2)
SWITCHES = [pytest.param(TP2, False, 0, id="given-plan"),
            pytest.param(TP2, False, 1, id="given-plan-from-zero1"),
            pytest.param(None, True, 0, id="searched-plan")]


@pytest.mark.parametrize(("switch_to", "search", "zero"), SWITCHES)
def test_phase_change_replans_through_a_checkpoint(tmp_path: Path, switch_to: Plan | None, search: bool,
                                                   zero: int) -> None:
    ranks = run_ranks(_run, 2, str(tmp_path / "ckpt"), switch_to, search, zero, timeout=300)
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["plan"].global_batch_size == AFTER.global_batch
    assert ranks[0]["source"] == ("search" if search else "given")
    if not search:
        assert ranks[0]["plan"] == switch_to
    _close(ranks[0]["crossed"], ranks[0]["before"], exact=True)
    single = run_ranks(_run, 1, str(tmp_path / "single"), _plan(1, AFTER.global_batch), False, timeout=300)[0]
    _close(ranks[0]["after"], single["after"], exact=False)


def _named(name: str) -> Callable[[str], str]:
    return lambda message: f"{name}: {message}"
