"""The launchers' process-free parts: torchrun command lines, the launch CLI's checks, the plan's way
to the workers, the search fallback, progress lines and checkpoint bookkeeping."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from galvatron.launch import checkpoints
from galvatron.launch.cli import main
from galvatron.launch.launcher import (
    ENV_CHECKPOINT_DIR,
    ENV_CHECKPOINT_INTERVAL,
    ENV_PEAK_FLOPS,
    ENV_PLAN,
    ENV_PREDICTED_STEP,
    PlanChoice,
    local_cpu_cluster,
    search_plan,
    worker_env,
)
from galvatron.launch.metrics import StepMeter
from galvatron.launch.ray_launcher import RayConfig
from galvatron.launch.torchrun_launcher import TorchrunConfig, torchrun_command

from galvatron.plan import Plan
from galvatron.spec import ModelSpec

SPEC = ModelSpec.from_config("gpt-tiny")


def dp_plan(world: int, batch: int) -> Plan:
    return Plan.uniform(SPEC.num_blocks, global_batch_size=batch, dp=world)


def test_torchrun_one_node_binds_loopback() -> None:
    cmd = torchrun_command(TorchrunConfig(nproc_per_node=4, max_restarts=2), "train.py", ["--lr", "1e-3"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in cmd and "--nnodes=1" in cmd and "--max-restarts=2" in cmd
    assert "--master-addr=127.0.0.1" in cmd
    assert cmd[-3:] == ["train.py", "--lr", "1e-3"]


def test_torchrun_several_nodes_pass_through() -> None:
    config = TorchrunConfig(nproc_per_node=8, nnodes="2:4", rdzv_backend="c10d", rdzv_endpoint="head:29400",
                            rdzv_id="job7")
    cmd = torchrun_command(config, "train.py")
    assert {"--nnodes=2:4", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--rdzv-id=job7"} <= set(cmd)
    assert not any(arg.startswith("--master-addr") for arg in cmd)


def test_launch_search_needs_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--workers", "2", "--search", "train.py"]) == 1
    assert "--search needs --model" in capsys.readouterr().err


def test_launch_search_with_profiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--model-profile / --cluster-profile reach the search on --cluster; without --cluster they are refused."""
    import argparse

    from galvatron.launch import cmd_launch
    from galvatron.profiler.schema import ClusterProfile, CollectiveProfile, CommPoint, Overlap

    points = tuple(CommPoint(bytes=b, time_s=1e-3 + b / 1e9) for b in (1 << 10, 1 << 20))
    curves = tuple(CollectiveProfile(op=op, group_size=8, placement="intra", points=points)
                   for op in ("all_reduce", "all_gather"))
    profile = ClusterProfile(backend="nccl", world_size=8, nodes=1, ranks_per_node=8, collectives=curves,
        overlap=Overlap(compute_slowdown=1.5, comm_slowdown=1.5, matmul_size=8192, message_bytes=1 << 28,
                        group_size=8, interference=0.5))
    path = profile.save(tmp_path / "cluster.yaml")
    parser = argparse.ArgumentParser()
    cmd_launch.add_arguments(parser)
    args = parser.parse_args(["--workers", "8", "--search", "--model", "gpt-tiny", "--cluster", "8xH100",
                              "--cluster-profile", str(path), "train.py"])
    target = cmd_launch._search_target(args, 8)
    assert target["cluster"].cluster == profile  # the profiled Perf over the preset
    choice = search_plan(ModelSpec.from_config("gpt-tiny"), 8, **target)
    choice.plan.validate(8)
    assert main(["launch", "--workers", "2", "--search", "--model", "gpt-tiny", "--cluster-profile", str(path),
                 "train.py"]) == 1
    assert "go with --cluster" in capsys.readouterr().err


def test_launch_rejects_plan_of_other_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.yaml"
    dp_plan( 4, 8).save(plan)
    assert main(["launch", "--workers", "2", "--plan", str(plan), "train.py"]) == 1
    assert "needs 4 devices" in capsys.readouterr().err


def test_plan_variable_is_the_runtimes() -> None:
    from galvatron.runtime.apply import PLAN_ENV

    assert ENV_PLAN == PLAN_ENV


def test_worker_env() -> None:
    choice = PlanChoice(plan=dp_plan( 2, 4), source="search", predicted_step_s=0.25)
    env = worker_env(choice, peak_flops=1e10, checkpoint_dir="ckpt", checkpoint_interval=5)
    assert float(env[ENV_PREDICTED_STEP]) == 0.25 and float(env[ENV_PEAK_FLOPS]) == 1e10
    assert Path(env[ENV_CHECKPOINT_DIR]).is_absolute()


def test_worker_env_allocator(monkeypatch) -> None:
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert worker_env(None) == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's choice stands
    assert worker_env(None) == {}


def test_search_on_local_cpus() -> None:
    cluster = local_cpu_cluster(4)
    assert cluster.world_size == 4 and cluster.gpu.peak_flops("fp32") > 0
    choice = search_plan(SPEC, 4, cluster=cluster, global_batch=8)
    assert choice.source == "search" and choice.predicted_step_s > 0
    choice.plan.validate(4, SPEC)
    no_zero1 = search_plan(SPEC, 4, cluster=local_cpu_cluster(4, tflops=0.02), global_batch=8, exclude=("zero1",))
    assert all(g.strategy.zero != 1 for g in no_zero1.plan.groups())


def test_step_meter_lines() -> None:
    out = io.StringIO()
    meter = StepMeter(tokens_per_step=1000, flops_per_token=6e6, total_steps=5, every=2, peak_flops=1e10,
                      plan=dp_plan( 1, 4), stream=out)
    printed = [meter.step(step, 2.0 - step / 10) for step in range(5)]
    assert [(s.step, round(s.loss, 4)) for s in printed if s is not None] == [(1, 2.0), (2, 1.9), (4, 1.75), (5, 1.6)]
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("plan: 1 stage(s)")
    last = printed[-1]
    assert last.mfu == pytest.approx(6e6 * last.tokens_per_s / 1e10)
    assert lines[-1].startswith("step 5/5  loss 1.6000") and "tok/s  MFU" in lines[-1] and "MiB" in lines[-1]


def test_checkpoints_without_metadata_are_ignored(tmp_path: Path) -> None:
    assert checkpoints.latest(tmp_path / "none") is None
    for step in (3, 6, 9):
        checkpoints.checkpoint_path(tmp_path, step).mkdir()
    for step in (3, 6):
        (checkpoints.checkpoint_path(tmp_path, step) / ".metadata").touch()
    assert checkpoints.latest(tmp_path) == (6, checkpoints.checkpoint_path(tmp_path, 6))


def test_checkpointer_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_CHECKPOINT_DIR, raising=False)
    assert checkpoints.Checkpointer.from_env(5) is None
    monkeypatch.setenv(ENV_CHECKPOINT_DIR, str(tmp_path))
    assert checkpoints.Checkpointer.from_env(5).interval == 5
    monkeypatch.setenv(ENV_CHECKPOINT_INTERVAL, "7")
    assert checkpoints.Checkpointer.from_env(5).interval == 7


def test_ray_config_checks() -> None:
    with pytest.raises(ValueError, match="min_workers"):
        RayConfig(workers=2, min_workers=3)
    with pytest.raises(ValueError, match="at least 1"):
        RayConfig(workers=0)
