"""HTML pieces every report section uses: escaping, number formatting, sortable tables, column
legends, "what this means" notes and the findings/warnings boxes.

Every string that comes from a checkpoint or a path goes through :func:`esc`: HTML-escaped, control
characters and lone surrogates written as visible escapes (a report must encode as UTF-8), and very
long names shortened.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from spectra.display import display_name, safe_text

#: Where every metric is defined (a file of the spectra repository; the report is read offline).
DEFINITIONS = "docs/definitions.md"
#: Longest name shown in a table cell (characters); longer ones keep their start and end.
CELL_CHARS = 300


def esc(x: object, limit: int | None = CELL_CHARS) -> str:
    """``x`` as safe HTML text: printable (:func:`spectra.display.display_name`), shortened to
    ``limit`` characters (None: any length), HTML-escaped with quotes."""
    return html.escape(display_name(safe_text(str(x)), limit), quote=True)


def fmt(v: object) -> str:
    """A table cell: ``–`` for None, 4 significant digits for floats, NaN/Inf as words, else :func:`esc`."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else ("NaN" if math.isnan(v) else ("∞" if v > 0 else "−∞"))
    return esc(v)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], *, sortable: bool = False, cls: str = "") -> str:
    """A scrollable table; ``sortable`` makes header clicks sort it (the report's inline script)."""
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    attr = f' class="{classes}"' if classes else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<div class="scroll"><table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def note(text_html: str) -> str:
    """A "What this means" box; ``text_html`` is trusted HTML written by spectra (escape names in it)."""
    return f'<div class="note"><b>What this means.</b> {text_html}</div>'


def legend(items: Sequence[tuple[str, str]], *, title: str = "Columns") -> str:
    """A definition list of table columns (names and definitions are spectra's own text, escaped)."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v, None)}</dd>" for k, v in items)
    return (f'<details class="legend" open><summary>{esc(title)} (definitions with formulas and sources: '
            f"{DEFINITIONS} in the spectra repository)</summary><dl>{rows}</dl></details>")


def warnings_box(lines: Sequence[tuple[str, str]]) -> str:
    """The warnings that change how results read: ``(where, text)`` pairs, shown first."""
    if not lines:
        return ""
    items = "".join(f'<li class="warning"><b>{esc(where, 80)}</b>: {esc(text, 2000)}</li>' for where, text in lines)
    return f'<div class="warnings" id="warnings"><b>⚠ Warnings</b><ul>{items}</ul></div>'


def findings_list(heading: str, sentences: Sequence[str]) -> str:
    """One input's findings: a heading (escaped) and its sentences (escaped)."""
    items = "".join(f"<li>{esc(s, 4000)}</li>" for s in sentences)
    return f'<div class="finding-group"><h3>{esc(heading, 160)}</h3><ul>{items}</ul></div>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 1.5em;color:#222}
h1{font-size:1.5em;margin:.3em 0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:.6em 0 .2em}
.note{background:#f4f7fb;border-left:4px solid #6a8fc7;padding:.5em .9em;margin:.6em 0}
.warnings{background:#fff4e5;border-left:4px solid #d9822b;padding:.4em .9em;margin:.5em 0}
.warnings ul{margin:.2em 0;padding-left:1.2em}
#findings{background:#f6fbf4;border-left:4px solid #5a9a4a;padding:.3em .9em;margin:.5em 0}
#findings h2{border:0;margin:.2em 0;font-size:1.25em}
#findings ul{margin:.1em 0 .4em;padding-left:1.2em}
details.legend{font-size:12px;margin:.4em 0}details.legend dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.3em 0}
details.legend dt{font-weight:600}details.legend dd{margin:0}
img.fig{max-width:100%;height:auto;display:block;margin:.5em 0}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}th,td{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f0f0f0;cursor:pointer;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
td{max-width:40em;overflow-wrap:anywhere}li,p{overflow-wrap:anywhere}
.scroll{max-height:520px;overflow:auto}
@media print{.scroll{max-height:none;overflow:visible}th{position:static}}
"""

SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, i){th.addEventListener('click', function(){
 var t=th.closest('table'), b=t.tBodies[0], rows=Array.prototype.slice.call(b.rows), asc=th.dataset.asc!=='1';
 rows.sort(function(x,y){var a=x.cells[i].textContent, c=y.cells[i].textContent, na=parseFloat(a), nc=parseFloat(c);
  var r=(!isNaN(na)&&!isNaN(nc))?na-nc:a.localeCompare(c); return asc?r:-r;});
 rows.forEach(function(r){b.appendChild(r);}); th.dataset.asc=asc?'1':'0';});});
"""

__all__ = ["CELL_CHARS", "CSS", "DEFINITIONS", "SORT_JS", "esc", "findings_list", "fmt", "legend", "note", "table",
           "warnings_box"]
