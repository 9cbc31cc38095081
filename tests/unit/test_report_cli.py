"""Reports from the real cost model, and ``galvatron plan show FILE --report``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from galvatron.launch.cli import main

from galvatron.plan import Plan
from galvatron.report import Report, render_html
from galvatron.report.page import NEEDS_COST
from galvatron.report.style import fmt_gib, fmt_seconds, fmt_tokens
from galvatron.spec import ModelSpec

PLANS = sorted((Path(__file__).parents[2] / "configs" / "plans").glob("*.yaml"))


def _model(path: Path) -> str:
    return "-".join(path.stem.split("-")[:2])


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_report_of_the_cost_models_result(path: Path) -> None:
    from galvatron.strategies.cost import cost_plan
    from galvatron.strategies.hardware import load_cluster

    plan = Plan.load(path)
    cost = cost_plan(plan, ModelSpec.from_config(_model(path)), load_cluster("8xA100-80GB", nodes=plan.world_size // 8))
    html = render_html(Report.from_result(cost))
    for text in (fmt_seconds(cost.step_time_s), fmt_tokens(cost.tokens_per_s), fmt_gib(cost.peak_memory_gib)):
        assert text in html
    for stage in cost.stages:
        assert fmt_gib(stage.memory_gib["total"]) in html
    assert NEEDS_COST not in html


def test_plan_show_report_alone_and_costed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = str(next(p for p in PLANS if p.stem == "llama2-7b-8gpu-mixed"))
    alone, costed = tmp_path / "alone.html", tmp_path / "costed.html"
    assert main(["plan", "show", plan, "--report", str(alone)]) == 0
    out = capsys.readouterr().out
    assert "stage 1 layers [20:32) on 4: dp2 tp2 zero1 recompute=full" in out and f"report: {alone}" in out
    assert NEEDS_COST in alone.read_text()
    assert main(["plan", "show", plan, "--model", "llama2-7b", "--cluster", "8xA100-80GB", "--report",
                 str(costed)]) == 0
    html = costed.read_text()
    assert NEEDS_COST not in html and "predicted step" in html and "8xA100-80GB" in html


def test_plan_show_report_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "r.html")
    assert main(["plan", "show", *map(str, PLANS[:2]), "--report", out]) == 2
    assert "--report describes one plan" in capsys.readouterr().err
    assert main(["plan", "show", str(PLANS[0]), "--cluster", "8xA100-80GB", "--report", out]) == 2
    assert "--cluster needs --model" in capsys.readouterr().err
    assert main(["plan", "show", str(PLANS[0]), "--report", str(tmp_path / "r.txt")]) == 1
    assert "written as .html or .png" in capsys.readouterr().err


def test_simulate_report_of_a_plan_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = str(next(p for p in PLANS if p.stem == "llama2-7b-8gpu-tp4-pp2"))
    out = tmp_path / "sim.html"
    assert main(["simulate", "--model", "llama2-7b", "--cluster", "8xA100-80GB", "--plan", plan, "--json",
                 "--report", str(out)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert f"report: {out}" in captured.err
    html = out.read_text()
    assert fmt_seconds(data["step_time_s"]) in html and "8xA100-80GB" in html and NEEDS_COST not in html
