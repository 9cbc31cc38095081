"""``galvatron launch`` under torchrun, end to end with examples/launch_gpt.py: 2 workers under a
ZeRO-3 plan file checkpoint after 4 steps; the job is relaunched on 1 worker with a searched plan
and resumes there (the CLI flow of a worker-count change). The losses of both launches are those
of one uninterrupted single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from galvatron.launch.cli import main
from galvatron.launch.demo import TrainConfig, gpt_config, train

from galvatron.plan import Plan
from galvatron.testing import run_ranks

EXAMPLE = Path(__file__).parents[2] / "examples" / "launch_gpt.py"
MODEL, BATCH, LR = "gpt-tiny", 4, 1e-3


def _launch(tmp: Path, name: str, *launch_args: str, steps: int) -> dict:
    out = tmp / f"{name}.json"
    code = main(["launch", "--workers", *launch_args, "--checkpoint-dir", str(tmp / "ckpt"),
                 "--checkpoint-interval", "2", str(EXAMPLE), "--model", MODEL, "--steps", str(steps),
                 "--global-batch", str(BATCH), "--lr", str(LR), "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def test_launch_then_relaunch_on_fewer_workers(tmp_path: Path) -> None:
    plan = tmp_path / "zero3.yaml"
    Plan.uniform(gpt_config(MODEL).layers, global_batch_size=BATCH, dtype="fp32", dp=2, zero=3).save(plan)
    first = _launch(tmp_path, "first", "2", "--plan", str(plan), steps=4)
    assert first["world"] == 2 and first["start"] == 0 and len(first["losses"]) == 4
    second = _launch(tmp_path, "second", "1", "--search", "--model", MODEL, "--global-batch", str(BATCH), steps=6)
    assert second["world"] == 1 and second["start"] == 4 and len(second["losses"]) == 2

    reference = TrainConfig(model=MODEL, steps=6, global_batch=BATCH, lr=LR, warmup=1, print_every=1)
    expected = [loss for _, loss in run_ranks(train, 1, reference, timeout=300)[0].losses]
    assert first["losses"] + second["losses"] == pytest.approx(expected, rel=1e-4)
