"""``galvatron demo``'s closing lines: the loss verdict and the measured step against the prediction."""

from __future__ import annotations

import argparse

import pytest
from galvatron.launch import demo
from galvatron.launch.launcher import PlanChoice

from galvatron.plan import Plan


def test_the_demo_reports_its_measured_step_against_the_prediction(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    choice = PlanChoice(plan=Plan.uniform(8, global_batch_size=16, dp=4), source="search", predicted_step_s=0.2)
    result = demo.DemoResult(choice=choice, losses=[(20, 5.6), (300, 2.0)], wall_s=100.0, restarts=0,
                             step_seconds=[0.24, 0.25, 0.26, 0.5])
    monkeypatch.setattr(demo, "run_demo", lambda config, **kw: result)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args([])) == 0
    out = capsys.readouterr().out
    assert "loss 5.600 -> 2.000 over 300 steps (decreased)" in out
    assert "median step 0.255 s after the warm-up, 0.200 s predicted (-21.6%)" in out
