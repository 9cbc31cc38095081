"""What ``wrap(plan="auto")`` tells the user, without processes."""

from __future__ import annotations

import dataclasses

import pytest

from galvatron.plan import Plan
from galvatron.runtime.apply import _announce
from galvatron.spec import ModelSpec


def test_the_announcement_names_what_the_model_description_missed(capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 0's line names the pick and its prediction, then the notes ``from_module`` left about
    the model (what it could not recognise makes the prediction rougher); without notes, no more."""
    spec = ModelSpec.from_config("gpt-tiny")
    plan = Plan.uniform(spec.num_blocks, global_batch_size=2, dp=1)
    _announce(plan, spec, None, "native")
    plain = capsys.readouterr().err
    assert plain.startswith("galvatron: plan='auto' picked (predicted step ") and "note:" not in plain
    noted = dataclasses.replace(spec, notes=("layers.0: attention found but its head count is unknown (0)",))
    _announce(plan, noted, None, "native")
    err = capsys.readouterr().err
    assert err.startswith(plain.rstrip("\n"))
    assert err.endswith("galvatron: describing the model:\n  note: layers.0: attention found but its head count "
                        "is unknown (0)\n")
