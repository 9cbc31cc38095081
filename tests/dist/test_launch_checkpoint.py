"""Checkpoints move between plans and world sizes: saved by 4 ranks under ZeRO-3, loaded by 2 ranks
under another plan and by one process, parameters and optimizer state are equal to what was saved,
and training resumed from it ends where an uninterrupted single-process run ends."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from galvatron.launch import checkpoints
from galvatron.launch.demo import TrainConfig, TrainResult, full_state, gpt_config, train
from galvatron.launch.launcher import ENV_CHECKPOINT_DIR, ENV_PLAN

from galvatron import wrap
from galvatron.models.gpt import GPT
from galvatron.plan import Plan
from galvatron.testing import run_ranks

CONFIG = TrainConfig(model="gpt-tiny", steps=4, global_batch=8, print_every=100, checkpoint_interval=4,
                     keep_checkpoints=None, return_state=True)
LAYERS = gpt_config(CONFIG.model).layers


def _plan_file(tmp: Path, name: str, **strategy: int) -> str:
    path = tmp / f"{name}.yaml"
    Plan.uniform(LAYERS, global_batch_size=CONFIG.global_batch, dtype="fp32", **strategy).save(path)
    return str(path)


def _train(plan_path: str, checkpoint_dir: str, config: TrainConfig) -> TrainResult:
    os.environ.update({ENV_PLAN: plan_path, ENV_CHECKPOINT_DIR: checkpoint_dir})
    return train(config)


def _load(plan_path: str, checkpoint: str) -> tuple[dict | None, dict | None]:
    torch.manual_seed(123)  # other initial weights than the saved run: all must come from the checkpoint
    model = wrap(GPT(gpt_config(CONFIG.model)), plan=plan_path)
    optimizer = model.optimizer(torch.optim.AdamW, lr=0.5)
    checkpoints.load(checkpoint, model, optimizer)
    return full_state(model, optimizer)


def _assert_states(actual: tuple, expected: tuple, exact: bool) -> None:
    (model_a, optim_a), (model_e, optim_e) = actual, expected
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 2e-5}  # Adam amplifies reduction-order noise
    assert model_a.keys() == model_e.keys()
    for name in model_e:
        torch.testing.assert_close(model_a[name], model_e[name], **tol, msg=_named(name))
    assert optim_a["state"].keys() == optim_e["state"].keys()
    for name, state in optim_e["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(optim_a["state"][name][key], value, **tol, msg=_named(f"{name}.{key}"))
    assert [g["lr"] for g in optim_a["param_groups"]] == [g["lr"] for g in optim_e["param_groups"]]


TARGETS = [pytest.param({"dp": 2}, id="dp2-ddp"),
           pytest.param({"dp": 2, "zero": 1}, id="dp2-zero1"),
           pytest.param({"tp": 2}, id="tp2")]


@pytest.mark.parametrize("target", TARGETS)
def test_zero3_on_4_loads_elsewhere(tmp_path: Path, target: dict) -> None:
    ckpt = tmp_path / "ckpt"
    saved = run_ranks(_train, 4, _plan_file(tmp_path, "zero3", dp=4, zero=3), str(ckpt), CONFIG, timeout=300)[0]
    step4 = checkpoints.checkpoint_path(ckpt, 4)
    assert checkpoints.latest(ckpt) == (4, step4)
    expected = (saved.model_state, saved.optimizer_state)
    target_plan = _plan_file(tmp_path, "target", **target)
    _assert_states(run_ranks(_load, 2, target_plan, str(step4), timeout=300)[0], expected, exact=True)
    _assert_states(run_ranks(_load, 1, _plan_file(tmp_path, "one", dp=1), str(step4), timeout=300)[0], expected,
                   exact=True)

    longer = TrainConfig(**{**CONFIG.__dict__, "steps": 6})
    resumed = run_ranks(_train, 2, target_plan, str(ckpt), longer, timeout=300)[0]
    assert resumed.start_step == 4
    single = run_ranks(_train, 1, _plan_file(tmp_path, "one", dp=1), str(tmp_path / "single"), longer, timeout=300)[0]
    assert single.start_step == 0
    _assert_states((resumed.model_state, resumed.optimizer_state), (single.model_state, single.optimizer_state),
                   exact=False)


def _named(name: str) -> Callable[[str], str]:
    return lambda message: f"{name}: {message}"
