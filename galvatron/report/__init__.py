"""Plan reports: one self-contained HTML page (or a PNG) that shows a plan per layer and stage, its
predicted pipeline timeline, memory per GPU against capacity, the top-K alternative plans, and, after
a training run, measured step times beside the predicted ones.

```python
from galvatron.report import Measured, Report, save_report
report = Report.from_result(search_result)                   # or a PlanCost, or simulate --json's dict
save_report(report, "report.html")                           # .png needs matplotlib
save_report(Report(plan=plan), "plan.html")                  # a plan alone: the diagram panel only
save_report(Report.from_result(cost, measured=Measured(step_times_s=times)), "after-run.html")
```

Not imported by ``import galvatron``; it needs nothing beyond the standard library (and matplotlib
for PNG). Cost results are read in their dict form, so this package does not import the cost model.
"""

from __future__ import annotations

from pathlib import Path

from galvatron.report.data import MEMORY_PARTS, CostResult, CostSummary, Measured, Report, ReportError, StageCost
from galvatron.report.html import render_html
from galvatron.report.png import save_png
from galvatron.report.schedule import Op, OpKind, PassTimes, Timeline, pass_order, simulate, timeline_from_cost

__all__ = [
    "MEMORY_PARTS", "CostResult", "CostSummary", "Measured", "Op", "OpKind", "PassTimes", "Report", "ReportError",
    "StageCost", "Timeline", "pass_order", "render_html", "save_png", "save_report", "simulate", "timeline_from_cost",
]


def save_report(report: Report, path: str | Path) -> Path:
    """Write the report as HTML (``.html``/``.htm``) or PNG (``.png``), chosen by the file suffix."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix == ".png":
        return save_png(report, out)
    if suffix not in (".html", ".htm"):
        raise ReportError(f"{out}: a report is written as .html or .png, not {suffix or 'a file without suffix'}")
    out.write_text(render_html(report), encoding="utf-8")
    return out
