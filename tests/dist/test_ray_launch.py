"""Ray launcher on 2 local CPU workers (one Ray session for the module, bound to 127.0.0.1):

- a worker killed mid-training is replaced, training resumes from the newest checkpoint, and the
  run ends with exactly the parameters and optimizer state of an uninterrupted run resumed from
  that same checkpoint;
- a lost worker that cannot be replaced (its CPU taken) leaves the run on one worker under a new
  plan, ending as a one-worker run resumed from the same checkpoint does;
- ``galvatron launch --ray`` runs a script on every worker with the plan exported to it;
- an error in the training code is raised with its traceback, not retried.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from galvatron.launch import checkpoints
from galvatron.launch.cli import main
from galvatron.launch.demo import TrainConfig, TrainResult, gpt_config, train
from galvatron.launch.launcher import LaunchError, worker_env
from galvatron.launch.ray_launcher import RayConfig, RayLauncher

from galvatron.plan import Plan

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported: bind Ray to 127.0.0.1
os.environ["RAY_worker_niceness"] = "0"
ray = pytest.importorskip("ray")

CONFIG = TrainConfig(model="gpt-tiny", steps=12, global_batch=4, print_every=100, checkpoint_interval=3,
                     keep_checkpoints=None, return_state=True, step_delay_s=0.3)
def _plan(world: int) -> Plan:
    return Plan.uniform(gpt_config(CONFIG.model).layers, global_batch_size=CONFIG.global_batch, dtype="fp32", dp=world)


PLAN = _plan(2)


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Iterator[None]:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield
    ray.shutdown()


def _launcher(checkpoint_dir: Path, workers: int = 2, **config: Any) -> RayLauncher:
    return RayLauncher(RayConfig(workers=workers, plan=_plan(workers), max_restarts=2,
                                 env=worker_env(None, checkpoint_dir=checkpoint_dir), **config))


def _kill_after_first_checkpoint(launcher: RayLauncher, checkpoint_dir: Path, before_kill: Callable[[], Any] = list,
                                 timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while checkpoints.latest(checkpoint_dir) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    before_kill()
    launcher.kill_worker(1)


def _run_killed(launcher: RayLauncher, checkpoint_dir: Path, before_kill: Callable[[], Any] = list) -> TrainResult:
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(launcher, checkpoint_dir, before_kill))
    killer.start()
    result = launcher.run(train, CONFIG)[0]
    killer.join()
    assert launcher.restarts == 1 and result.start_step in (3, 6, 9)
    return result


def _resumed_reference(checkpoint_dir: Path, step: int, tmp: Path, workers: int) -> TrainResult:
    """An uninterrupted run on ``workers`` workers resumed from the checkpoint of ``step``."""
    reference_dir = tmp / f"reference-{workers}"
    shutil.copytree(checkpoints.checkpoint_path(checkpoint_dir, step), checkpoints.checkpoint_path(reference_dir, step))
    reference = _launcher(reference_dir, workers)
    result = reference.run(train, CONFIG)[0]
    assert reference.restarts == 0 and result.start_step == step
    return result


def _assert_equal(actual: TrainResult, expected: TrainResult) -> None:
    for name, value in expected.model_state.items():
        assert torch.equal(actual.model_state[name], value), name
    for name, state in expected.optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(actual.optimizer_state["state"][name][key], value), f"{name}.{key}"


def test_killed_worker_is_replaced_and_resumes(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path / "run")
    result = _run_killed(launcher, tmp_path / "run")
    assert launcher.world_size == 2
    _assert_equal(result, _resumed_reference(tmp_path / "run", result.start_step, tmp_path, 2))


class _Blocker:
    def ready(self) -> bool:
        return True


def test_lost_worker_without_a_replacement_continues_on_fewer(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path / "run", min_workers=1, replan=_plan)
    blockers = []
    # queued while both CPUs are busy, it takes the lost worker's CPU before the workers are placed again
    result = _run_killed(launcher, tmp_path / "run",
                         before_kill=lambda: blockers.append(ray.remote(num_cpus=1)(_Blocker).remote()))
    assert launcher.world_size == 1 and launcher.plan == _plan(1)
    assert ray.get(blockers[0].ready.remote())
    ray.kill(blockers[0])
    _assert_equal(result, _resumed_reference(tmp_path / "run", result.start_step, tmp_path, 1))


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from galvatron.launch.launcher import plan_from_env
    from galvatron.runtime.apply import init_distributed
    init_distributed()
    rank = dist.get_rank()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    plan = plan_from_env()
    out = {"world": dist.get_world_size(), "sum": total.item(), "plan_world": plan.world_size,
           "argv": sys.argv[1:], "interval": os.environ.get("GALVATRON_CHECKPOINT_INTERVAL")}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
""")


def test_launch_cli_runs_a_script_with_the_plan(tmp_path: Path) -> None:
    script, plan = tmp_path / "script.py", tmp_path / "plan.yaml"
    script.write_text(SCRIPT)
    PLAN.save(plan)
    code = main(["launch", "--ray", "--workers", "2", "--plan", str(plan), "--checkpoint-interval", "7",
                 str(script), str(tmp_path), "--flag"])
    assert code == 0
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out == {"world": 2, "sum": 3.0, "plan_world": 2, "argv": [str(tmp_path), "--flag"], "interval": "7"}


def _fail_on_rank_1() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("bad batch on rank 1")


def test_training_error_is_raised_not_retried() -> None:
    launcher = RayLauncher(RayConfig(workers=2, max_restarts=2))
    with pytest.raises(LaunchError, match="bad batch on rank 1"):
        launcher.run(_fail_on_rank_1)
    assert launcher.restarts == 0
