"""The report as one self-contained HTML page: inline CSS and SVG, no script, no external resource,
so it opens offline and can be mailed or attached to an issue as a single file."""

from __future__ import annotations

from html import escape

from galvatron import __version__
from galvatron.report.data import Report
from galvatron.report.draw import to_svg
from galvatron.report.page import panels, summary_items

CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; color: #222; background: #f4f5f7; margin: 0; }
main { width: 1360px; margin: 0 auto; padding: 16px 0 32px; }
header, section { background: #fff; border: 1px solid #dcdfe4; border-radius: 6px; padding: 12px 20px 16px;
  margin-bottom: 14px; }
h1 { font-size: 22px; margin: 4px 0 6px; }
h2 { font-size: 17px; margin: 4px 0 10px; }
.describe { font-family: "DejaVu Sans Mono", Menlo, monospace; font-size: 12px; color: #444; margin: 0 0 10px;
  white-space: pre-wrap; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid #e3e6ea; border-radius: 5px; padding: 6px 10px; background: #fafbfc; }
.card b { display: block; font-size: 11px; color: #666; font-weight: normal; text-transform: uppercase; }
.card span { font-size: 15px; }
.note { color: #8a5a00; background: #fff8e6; border: 1px solid #f0d9a8; border-radius: 4px; padding: 8px 12px;
  font-size: 13px; }
footer { color: #888; font-size: 11px; text-align: center; }
"""


def render_html(report: Report) -> str:
    """The whole page as a string."""
    cards = "".join(f'<div class="card"><b>{escape(k)}</b><span>{escape(v)}</span></div>'
                    for k, v in summary_items(report))
    body = [f"<header><h1>{escape(report.title)}</h1>",
            f'<p class="describe">{escape(report.plan.describe())}</p>',
            f'<div class="cards">{cards}</div></header>']
    for panel in panels(report):
        body.append(f'<section id="{panel.id}"><h2>{escape(panel.heading)}</h2>')
        if panel.canvas is not None:
            body.append(to_svg(panel.canvas, panel.heading))
        if panel.note:
            body.append(f'<p class="note">{escape(panel.note)}</p>')
        body.append("</section>")
    body.append(f"<footer>galvatron {escape(__version__)} plan report</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{escape(report.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")
