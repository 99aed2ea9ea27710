"""The operators' view of per-run usage: an HTML status page and a plain-text table.

Both render the `GET /v1/runs` report (see `teacher_service.run_usage.runs_report`). Run ids
come from clients, so the page escapes every value it shows. The page refreshes itself with
a meta refresh and needs no scripts.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

_PAGE_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}"
    "table{border-collapse:collapse;margin-bottom:1.5em}"
    "th,td{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}"
    ".idle{color:#888}"
)
# Columns of the runs table: heading, period ("lifetime" or "last_minute"), field.
_RUN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("requests", "lifetime", "requests"),
    ("images", "lifetime", "images"),
    ("patches kept", "lifetime", "patches_kept"),
    ("MACs spent", "lifetime", "macs_spent"),
    ("MACs saved", "lifetime", "macs_saved"),
    ("errors", "lifetime", "errors"),
    ("images last min", "last_minute", "images"),
)


def format_count(value: float) -> str:
    """Format a count with an SI prefix (k, M, G, T, P) and three significant digits."""
    magnitude = abs(value)
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if magnitude >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.0f}"


def format_latency(latency: dict[str, float | None] | None) -> str:
    """Format p50/p95/p99 latency in milliseconds, or "-" without requests."""
    if not latency:
        return "-"
    parts = []
    for name in ("p50", "p95", "p99"):
        value = latency.get(name)
        parts.append("-" if value is None else f"{value * 1000:.0f}")
    return "/".join(parts)


def _run_cells(run: dict[str, Any]) -> list[str]:
    cells = [str(run["run_id"]) or "(none)", str(run["images_in_flight"])]
    cells.extend(format_count(run[period][field]) for _, period, field in _RUN_COLUMNS)
    cells.append(format_latency(run["lifetime"]["latency_s"]))
    cells.append(format_latency(run["last_minute"]["latency_s"]))
    return cells


def _headings() -> list[str]:
    return [
        "run",
        "in flight",
        *(heading for heading, _, _ in _RUN_COLUMNS),
        "latency ms p50/p95/p99",
        "last min p50/p95/p99",
    ]


# Run ids wider than this are cut in the text table, so one long id cannot widen every line.
MAX_RUN_ID_WIDTH = 48


def _printable(text: str) -> str:
    """Escape control characters, so that a client's run id cannot drive the terminal."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _shorten(text: str, width: int) -> str:
    """Cut `text` to `width` characters, marking the cut with an ellipsis."""
    return text if len(text) <= width else text[: width - 3] + "..."


def format_runs_table(report: dict[str, Any]) -> str:
    """Format the runs report as a fixed-width text table with a totals line."""
    rows = [_headings()]
    for run in report["runs"]:
        cells = [_printable(cell) for cell in _run_cells(run)]
        cells[0] = _shorten(cells[0], MAX_RUN_ID_WIDTH)
        rows.append(cells)
    totals = report["totals"]
    rows.append(_run_cells({"run_id": "total", **totals}))
    widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
    lines = []
    for row_index, row in enumerate(rows):
        cells = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if row_index == 0 or row_index == len(rows) - 2:
            lines.append("  ".join("-" * width for width in widths))
    lines.append(
        f"{sum(run['active'] for run in report['runs'])} active of {len(report['runs'])} "
        f"run(s), {report['replicas']} replica(s) reporting; the last-minute columns cover "
        f"the last {report['window_s']:.0f} s"
    )
    return "\n".join(lines) + "\n"


def _table(headings: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    head = "".join(f"<th>{html.escape(heading)}</th>" for heading in headings)
    body = "".join(
        f'<tr class="{css_class}">'
        + "".join(f"<td>{html.escape(_printable(cell))}</td>" for cell in cells)
        + "</tr>"
        for css_class, cells in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_status_page(card: dict[str, Any], report: dict[str, Any], refresh_s: int) -> str:
    """Render the status page: the teacher's card, the runs table and the totals.

    Args:
        card: the model card (`GET /v1/teacher`).
        report: the runs report (`GET /v1/runs`).
        refresh_s: seconds between automatic reloads of the page.
    """
    totals = report["totals"]
    lifetime, last_minute = totals["lifetime"], totals["last_minute"]
    card_rows = [
        ("architecture", str(card.get("arch", ""))),
        ("input", "{}x{} px, {} channel(s)".format(*card["img_size"], card["in_chans"])),
        ("patches", "{}x{} grid of {}x{} px".format(*card["grid_size"], *card["patch_size"])),
        ("classes", str(card["num_classes"])),
        ("checkpoint sha256", str(card.get("digest", ""))),
        ("MACs per full image", format_count(card["macs_per_image_full"])),
        ("max images per request", str(card["max_images_per_request"])),
        ("max images per batch", str(card["max_batch_images"])),
    ]
    total_rows = [
        ("teacher MACs spent", format_count(lifetime["macs_spent"])),
        ("teacher MACs saved", format_count(lifetime["macs_saved"])),
        ("images", format_count(lifetime["images"])),
        ("requests", format_count(lifetime["requests"])),
        ("errors", format_count(lifetime["errors"])),
        ("images in the last minute", format_count(last_minute["images"])),
        ("images in flight", str(totals["images_in_flight"])),
        ("replicas reporting", str(report["replicas"])),
    ]
    spent, saved = lifetime["macs_spent"], lifetime["macs_saved"]
    if spent + saved:
        total_rows.insert(2, ("share of teacher compute saved", f"{saved / (spent + saved):.1%}"))
    run_rows = [("" if run["active"] else "idle", _run_cells(run)) for run in report["runs"]]
    runs_html = (
        _table(_headings(), run_rows) if run_rows else "<p>No run has sent a request yet.</p>"
    )
    arch = html.escape(str(card.get("arch", "")))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">'
        f"<title>maskedkd teacher: {arch}</title><style>{_PAGE_STYLE}</style></head><body>"
        f"<h1>maskedkd teacher service</h1><h2>Teacher</h2>"
        f"{_table(('field', 'value'), [('', row) for row in card_rows])}"
        f"<h2>Runs</h2>{runs_html}"
        f"<h2>Totals</h2>{_table(('figure', 'value'), [('', row) for row in total_rows])}"
        f"<p>Refreshes every {int(refresh_s)} s. Grey rows: no request in the last "
        f"{report['window_s']:.0f} s.</p></body></html>\n"
    )
