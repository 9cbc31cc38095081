"""Plan reports: every example plan renders, panels carry the plan's stages and groups and the cost
model's numbers, the page is self-contained, and bad input is refused with a clear error."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from galvatron.plan import Plan
from galvatron.report import CostSummary, Measured, Report, ReportError, render_html, save_report, timeline_from_cost
from galvatron.report.page import NEEDS_COST, NEEDS_SEARCH, NEEDS_STAGES
from galvatron.report.style import fmt_gib, fmt_pct, fmt_seconds, fmt_tokens

PLANS = sorted((Path(__file__).parents[2] / "configs" / "plans").glob("*.yaml"))
PANELS = ("plan", "timeline", "memory", "top")


def fake_cost(plan: Plan, step_scale: float = 1.0) -> dict[str, Any]:
    """A cost result in the form ``PlanCost.to_dict()`` prints, with made-up but consistent numbers."""
    pp, m = plan.pp, plan.num_micro_batches
    stages, busy = [], []
    for g in range(pp):
        layers = [(s.start, s.end) for s in plan.stages[g::pp]]
        n = sum(b - a for a, b in layers)
        comm = {"tp": 0.002 * n * m, "cp": 0.0, "ep": 0.0, "zero": 0.0, "pp": 0.001 * m, "dp": 0.03}
        compute = 0.01 * n * m * step_scale
        busy.append(compute + sum(comm.values()) + 0.01)
        memory = {"params": 1.5 + g, "grads": 3.0, "optimizer": 9.25, "activations": 8.5 - g, "buffers": 0.25}
        stages.append({"stage": g, "layers": [list(r) for r in layers], "devices": plan.stages[g].devices,
                       "compute_s": compute, "comm_s": comm, "memory_gib": {**memory, "total": sum(memory.values())}})
    step = max(busy) * 1.1
    for stage, b in zip(stages, busy):
        stage["bubble_s"] = step - b
    tokens = plan.global_batch_size * 4096
    return {"step_time_s": step, "tokens_per_s": tokens / step, "tflops_per_gpu": 123.4 / step_scale,
            "mfu": 0.4 / step_scale, "peak_memory_gib": max(s["memory_gib"]["total"] for s in stages),
            "memory_limit_gib": 79.0, "fits": True, "plan": plan.to_dict(), "stages": stages}


def external_references(html: str) -> list[str]:
    """Anything that would make the browser fetch: URLs, src/href attributes, CSS imports, non-local url()."""
    found = re.findall(r"[a-z][a-z0-9+.-]*://", html, flags=re.I)
    found += re.findall(r"\s(?:src|href|xlink:href)\s*=", html, flags=re.I)
    found += re.findall(r"@import|url\((?!#)", html, flags=re.I)
    return found


def section(html: str, panel: str) -> str:
    start = html.index(f'<section id="{panel}">')
    return html[start:html.index("</section>", start)]


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_plan_alone_draws_the_diagram_and_says_what_else_is_needed(path: Path) -> None:
    plan = Plan.load(path)
    html = render_html(Report(plan=plan))
    for panel in PANELS:
        assert f'<section id="{panel}">' in html
    diagram = section(html, "plan")
    assert "<svg" in diagram
    for j, stage in enumerate(plan.stages):
        assert f">S{j}" in diagram
        for g in stage.groups:
            assert f">layers [{g.start}:{g.end})<" in diagram
    for panel in ("timeline", "memory", "top"):
        assert "<svg" not in section(html, panel) and NEEDS_COST in section(html, panel)
    assert '<section id="measured">' not in html
    for g in plan.groups():
        if g.strategy.cp > 1:
            assert f">cp{g.strategy.cp} {g.strategy.cp_kind.value}" in diagram
        if g.strategy.ep > 1:
            assert f">ep{g.strategy.ep}<" in diagram
    assert external_references(html) == []


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_costed_plan_shows_the_cost_models_numbers(path: Path) -> None:
    plan = Plan.load(path)
    data = fake_cost(plan)
    html = render_html(Report.from_result(data, context={"model": "test-model"}))
    header = html[:html.index("</header>")]
    for text in (fmt_seconds(data["step_time_s"]), fmt_tokens(data["tokens_per_s"]), fmt_pct(data["mfu"]),
                 fmt_gib(data["peak_memory_gib"]), "test-model"):
        assert text in header
    timeline, memory = section(html, "timeline"), section(html, "memory")
    assert NEEDS_COST not in html
    assert f"predicted step {fmt_seconds(data['step_time_s'])}" in timeline
    assert timeline.count("<title>forward micro-batch") == len(plan.stages) * plan.num_micro_batches
    assert timeline.count("<title>backward micro-batch") == len(plan.stages) * plan.num_micro_batches
    for stage in data["stages"]:
        assert f">group {stage['stage']}<" in timeline and f">group {stage['stage']}<" in memory
        assert fmt_gib(stage["memory_gib"]["total"]) in memory
    assert "capacity 79.00 GiB" in memory
    assert NEEDS_SEARCH in section(html, "top")
    assert external_references(html) == []


def test_timeline_busy_time_is_the_cost_models() -> None:
    plan = Plan.load(next(p for p in PLANS if p.stem == "llama2-7b-8gpu-mixed"))
    cost = CostSummary.from_result(fake_cost(plan))
    timeline = timeline_from_cost(cost)
    for stage in cost.stages:
        predicted = cost.step_time_s - stage.bubble_s
        assert timeline.busy_s(stage.index) == pytest.approx(predicted)


def test_stages_without_blocks_draw_and_keep_the_busy_time() -> None:
    """The embedding, and the norm and head, on interleaved chunks of their own: the report draws them
    (no blocks: no time of the group's split by block count) and each group's busy time stays the
    cost model's."""
    from galvatron.plan import even_split

    plan = Plan.uniform(32, global_batch_size=8, num_micro_batches=8, pp=4, schedule="interleaved-1f1b",
                        virtual_stages=2, layer_split=[0, *even_split(32, 6), 0], dp=2, recompute="full")
    cost = CostSummary.from_result(fake_cost(plan))
    timeline = timeline_from_cost(cost)
    for stage in cost.stages:
        assert timeline.busy_s(stage.index) == pytest.approx(cost.step_time_s - stage.bubble_s)
    assert all(op.duration == 0 for op in timeline.ops if op.stage in (0, 7) and op.kind.value in "FBW")
    html = render_html(Report.from_result(fake_cost(plan)))
    assert external_references(html) == [] and ">emb<" in html and ">head<" in html


def test_top_plans_ranked_with_the_current_one_highlighted() -> None:
    plan = Plan.load(next(p for p in PLANS if p.stem == "llama2-7b-8gpu-tp4-pp2"))
    other = Plan.uniform(32, global_batch_size=16, num_micro_batches=4, pp=2, tp=2, dp=2, zero=1)
    best, second = fake_cost(plan), fake_cost(other, step_scale=5.0)
    assert second["tokens_per_s"] < best["tokens_per_s"]
    html = render_html(Report.from_result({**best, "top": [best, second], "plans_costed": 12345,
                                           "search_time_s": 0.25}))
    top = section(html, "top")
    assert NEEDS_SEARCH not in top
    assert top.index(fmt_tokens(best["tokens_per_s"])) < top.index(fmt_tokens(second["tokens_per_s"]))
    assert "pp2 vpp1 1f1b m8" in top and "pp2 vpp1 1f1b m4" in top and "dp2 tp2 zero1" in top
    assert top.count("the plan this report shows") == 1
    assert f"({(second['tokens_per_s'] / best['tokens_per_s'] - 1) * 100:+.1f}%)" in top
    assert "12,345" in html and fmt_seconds(0.25) in html


def test_measured_beside_predicted() -> None:
    plan = Plan.load(next(p for p in PLANS if p.stem == "llama2-7b-8gpu-tp4-pp2"))
    data = fake_cost(plan)
    step = data["step_time_s"]
    measured = Measured(step_times_s=(3 * step, 1.1 * step, 1.1 * step), stage_times_s={0: (0.5, 0.5, 0.5)},
                        warmup_steps=1)
    html = render_html(Report.from_result(data, measured=measured))
    panel = section(html, "measured")
    assert f"measured: {fmt_seconds(1.1 * step)} per step (mean of 2 step(s)" in panel
    assert "error -9.1%" in panel and f"measured {fmt_seconds(1.1 * step)}, error -9.1%" in html
    assert f"measured step {fmt_seconds(1.1 * step)}" in section(html, "timeline")
    assert "(warm-up, not averaged)" in panel and ">500.0 ms<" in panel


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"step_times_s": ()}, "step_times_s: needs one or more"),
    ({"step_times_s": (1.0, -2.0)}, "step_times_s: needs one or more positive"),
    ({"step_times_s": (1.0,), "stage_times_s": {0: (float("nan"),)}}, r"stage_times_s\[0\]"),
    ({"step_times_s": (1.0, 1.0), "warmup_steps": 2}, "warmup_steps: 2 leaves none of 2 steps"),
])
def test_bad_measurements(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ReportError, match=message):
        Measured(**kwargs)


def test_bad_cost_results() -> None:
    plan = Plan.load(next(p for p in PLANS if p.stem == "llama2-7b-8gpu-tp4-pp2"))
    data = fake_cost(plan)
    with pytest.raises(ReportError, match="'step_time_s' is missing"):
        CostSummary.from_result({k: v for k, v in data.items() if k != "step_time_s"})
    with pytest.raises(ReportError, match="mfu: 'high' is not a finite number"):
        CostSummary.from_result({**data, "mfu": "high"})
    with pytest.raises(ReportError, match=r"stages: device groups \[0\], but the plan has groups 0..1"):
        CostSummary.from_result({**data, "stages": data["stages"][:1]})
    with pytest.raises(ReportError, match=r"stages\[1\]: could not convert"):
        CostSummary.from_result({**data, "stages": [data["stages"][0], {**data["stages"][1], "comm_s": {"tp": "x"}}]})
    with pytest.raises(ReportError, match="memory_limit_gib: 'lots' is not a finite number"):
        CostSummary.from_result({**data, "memory_limit_gib": "lots"})
    with pytest.raises(ReportError, match="'plan' is missing"):
        CostSummary.from_result({**data, "plan": None})
    with pytest.raises(ReportError, match="expected a mapping or an object with to_dict"):
        CostSummary.from_result(42)
    other = Plan.load(next(p for p in PLANS if p.stem == "llama2-7b-8gpu-fsdp"))
    with pytest.raises(ReportError, match="different plan"):
        Report(plan=other, cost=CostSummary.from_result(data))


def test_result_objects_and_json_read_alike() -> None:
    plan = Plan.load(PLANS[0])
    data = fake_cost(plan)

    class Cost:
        def to_dict(self) -> dict[str, Any]:
            return data

    class Search:
        best, top, plans_costed, search_time_s = Cost(), (Cost(),), 7, 0.5

    from_json = Report.from_result(json.loads(json.dumps(data)))
    from_search = Report.from_result(Search())
    assert from_json.cost == from_search.cost == CostSummary.from_result(Cost())
    assert (from_search.plans_costed, from_search.search_time_s, len(from_search.top)) == (7, 0.5, 1)


def test_save_report_html_png_and_bad_suffix(tmp_path: Path) -> None:
    report = Report.from_result(fake_cost(Plan.load(PLANS[0])))
    html = save_report(report, tmp_path / "r.html")
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(ReportError, match=r"as \.html or \.png, not \.pdf"):
        save_report(report, tmp_path / "r.pdf")
    pytest.importorskip("matplotlib")
    png = save_report(report, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ReportError, match="PNG export needs matplotlib: pip install matplotlib"):
        save_report(Report(plan=Plan.load(PLANS[0])), tmp_path / "r.png")


def test_import_galvatron_does_not_load_the_report() -> None:
    code = "import sys, galvatron; print(any(m.startswith('galvatron.report') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_many_micro_batches_break_the_time_axis() -> None:
    """Only warm-up and drain are drawn; the steady state between them is left out and said so."""
    plan = Plan.uniform(32, global_batch_size=256, num_micro_batches=128, pp=2, dp=4, zero=1)
    html = render_html(Report.from_result(fake_cost(plan)))
    timeline = section(html, "timeline")
    assert "not drawn" in timeline
    for i in (0, 1, 126, 127):
        assert f"<title>forward micro-batch {i}, stage S0:" in timeline
    assert "<title>forward micro-batch 64, stage S0:" not in timeline
    assert "predicted step" in timeline


def test_missing_breakdown_or_prediction_is_said() -> None:
    plan = Plan.load(PLANS[0])
    html = render_html(Report.from_result({**fake_cost(plan), "stages": []}))
    assert NEEDS_STAGES in section(html, "timeline") and NEEDS_STAGES in section(html, "memory")
    html = render_html(Report(plan=plan, measured=Measured(step_times_s=(2.0, 4.0))))
    assert f"measured: {fmt_seconds(3.0)} per step. {NEEDS_COST}" in section(html, "measured")
