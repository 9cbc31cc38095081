"""The galvatron command: subcommands listed, plan validate/show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from galvatron.launch.cli import SUBCOMMANDS, main

PLANS = sorted((Path(__file__).parents[2] / "configs" / "plans").glob("*.yaml"))


def test_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "galvatron.launch", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("simulate", "search", "profile", "launch", "plan"):
        assert name in out
    assert set(SUBCOMMANDS) == {"simulate", "search", "profile", "launch", "plan", "demo"}


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        assert "usage: galvatron " + name in capsys.readouterr().out


def test_plan_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "validate", *map(str, PLANS)]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK") == len(PLANS) > 0


def test_plan_validate_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("global_batch_size: 8\nstrategy: {tp: 3}\nstages:\n  - {devices: 8, layers: [0, 4]}\n")
    assert main(["plan", "validate", str(bad)]) == 1
    assert "stages[0].layers[0:4].tp: 3 does not divide 8 devices" in capsys.readouterr().err


def test_plan_validate_against_model_and_world(capsys: pytest.CaptureFixture[str]) -> None:
    plan = next(str(p) for p in PLANS if p.name == "llama2-7b-8gpu-tp4-pp2.yaml")
    assert main(["plan", "validate", "--model", "llama2-7b", "--world-size", "8", plan]) == 0
    assert main(["plan", "validate", "--world-size", "4", plan]) == 1
    assert "needs 8 devices" in capsys.readouterr().err


def test_plan_show(capsys: pytest.CaptureFixture[str]) -> None:
    plan = next(str(p) for p in PLANS if p.name == "llama2-7b-8gpu-mixed.yaml")
    assert main(["plan", "show", plan]) == 0
    assert "stage 1 layers [20:32) on 4: dp2 tp2 zero1 recompute=full" in capsys.readouterr().out


def test_profile_memory_replays_a_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import pickle

    gib = 1 << 30
    # a 3 GiB block freed and split by a 0.25 GiB one: the 4 GiB request then needs a segment of its
    # own with the default allocator (10 GiB reserved, all needed: the split segment cannot be
    # released), while expandable segments can unmap the free 2.75 GiB
    trace = [{"action": a, "addr": addr, "size": int(size), "stream": 0} for a, addr, size in (
        ("alloc", 1, 3 * gib), ("alloc", 2, 3 * gib), ("free_requested", 1, 3 * gib),
        ("free_completed", 1, 3 * gib), ("alloc", 3, gib / 4), ("alloc", 4, 4 * gib))]
    snapshot = tmp_path / "snap.pickle"
    snapshot.write_bytes(pickle.dumps({"segments": [], "device_traces": [trace]}))
    assert main(["profile", "memory", str(snapshot), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["events"] == 5 and out["frees_of_earlier_blocks"] == 0
    default, expandable = out["default"], out["expandable_segments"]
    assert (default["allocated_peak_gib"], default["reserved_peak_gib"]) == pytest.approx((7.25, 10))
    assert default["least_memory_gib"] == pytest.approx(10, abs=0.07)
    assert expandable["least_memory_gib"] == pytest.approx(7.25, abs=0.1)
    assert main(["profile", "memory", str(tmp_path / "missing.pickle")]) == 1
    assert "not a CUDA memory snapshot" in capsys.readouterr().err
