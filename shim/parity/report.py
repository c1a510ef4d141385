"""`shim parity report`: the figures of SQL `parity_report(assistant, since)` as a table, Markdown,
JSON or a self-contained HTML page with inline SVG plots (no network, no plotting library).

Every figure comes from SQL (migration 0006), so what the report says and what a user queries
(`SELECT * FROM parity_report(...)`) cannot disagree; this module only formats.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from decimal import Decimal
from typing import Any

KEYS = ("scenario", "stack", "runs", "modal_tools", "agreement", "drift", "latency_p50_ms", "latency_p95_ms",
        "cost_per_minute_usd")
EXTRA = ("partial", "failed", "duration_p50_s", "ended_reasons")


def _plain(key: str, value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if key == "ended_reasons" and isinstance(value, str):  # jsonb arrives as text
        return json.loads(value)
    return value


async def fetch_report(conn: Any, *, assistant: str | None, since: dt.datetime | None) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM parity_report($1, $2)", assistant, since)
    out = []
    for r in rows:
        item = {k: _plain(k, r[k]) for k in KEYS + EXTRA}
        item["modal_tools"] = list(item["modal_tools"]) if item["modal_tools"] is not None else None
        out.append(item)
    return out


async def fetch_latencies(conn: Any, *, assistant: str | None, since: dt.datetime | None) -> dict[tuple[str, str], list[int]]:
    rows = await conn.fetch(
        """SELECT scenario, stack, array_agg(l ORDER BY l) AS ls
             FROM parity_observations o, unnest(o.latencies_ms) AS l
            WHERE o.status = 'ok' AND ($1::text IS NULL OR o.assistant_id = $1) AND ($2::timestamptz IS NULL OR o.started_at >= $2)
            GROUP BY 1, 2""", assistant, since)
    return {(r["scenario"], r["stack"]): list(r["ls"]) for r in rows}


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value * 100:.0f}%"
    if kind == "ms":
        return f"{value:.0f}"
    if kind == "s":
        return f"{value:.1f}"
    if kind == "reasons":
        return ", ".join(f"{k} x{v}" for k, v in sorted(value.items(), key=lambda kv: -kv[1])) or "-"
    if kind == "usd":
        return f"${value:.4f}"
    if isinstance(value, list):
        return " > ".join(value) if value else "(none)"
    if isinstance(value, bool):
        return "DRIFT" if value else "ok"
    return str(value)


_COLUMNS = (("scenario", "scenario", ""), ("stack", "stack", ""), ("runs", "runs", ""), ("tools (modal)", "modal_tools", ""),
            ("agreement", "agreement", "pct"), ("drift", "drift", ""), ("p50 ms", "latency_p50_ms", "ms"),
            ("p95 ms", "latency_p95_ms", "ms"), ("$/min", "cost_per_minute_usd", "usd"),
            ("dur s", "duration_p50_s", "s"), ("partial", "partial", ""), ("failed", "failed", ""),
            ("ended", "ended_reasons", "reasons"))


def _cells(report: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(row[key], kind) for _, key, kind in _COLUMNS] for row in report]


def as_table(report: list[dict[str, Any]]) -> str:
    head = [c[0] for c in _COLUMNS]
    rows = _cells(report)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"


def as_markdown(report: list[dict[str, Any]]) -> str:
    head = [c[0] for c in _COLUMNS]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in _cells(report)]
    return "\n".join(out) + "\n"


def as_json(report: list[dict[str, Any]]) -> str:
    return json.dumps(report, indent=2) + "\n"


_STACK_COLOURS = {"shim": "#1f77b4", "vapi": "#ff7f0e"}


def _latency_svg(latencies: dict[tuple[str, str], list[int]]) -> str:
    """One strip + box per (scenario, stack): every turn latency as a dot, the box p25..p75, a line at p50."""
    if not latencies:
        return "<p>No turn latencies.</p>"
    keys = sorted(latencies)
    top = max(max(v) for v in latencies.values()) or 1
    width, row_h, left = 720, 34, 220
    height = row_h * len(keys) + 40
    scale = (width - left - 20) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="turn latency per scenario and stack">']
    for i, key in enumerate(keys):
        values = latencies[key]
        y = 20 + i * row_h
        colour = _STACK_COLOURS.get(key[1], "#555")
        q = lambda p: values[min(len(values) - 1, int(p * (len(values) - 1) + 0.5))]  # noqa: E731
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">{html.escape(key[0])} / {html.escape(key[1])}</text>')
        parts.append(f'<rect x="{left + q(0.25) * scale:.1f}" y="{y + 2}" width="{max(1.0, (q(0.75) - q(0.25)) * scale):.1f}" '
                     f'height="20" fill="{colour}" fill-opacity="0.25" stroke="{colour}"/>')
        parts.append(f'<line x1="{left + q(0.5) * scale:.1f}" x2="{left + q(0.5) * scale:.1f}" y1="{y}" y2="{y + 24}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        for v in values:
            parts.append(f'<circle cx="{left + v * scale:.1f}" cy="{y + 12}" r="2" fill="{colour}"/>')
    axis_y = height - 14
    for tick in range(0, 6):
        ms = top * tick / 5
        parts.append(f'<text x="{left + ms * scale:.1f}" y="{axis_y + 10}" font-size="10" text-anchor="middle">{ms:.0f} ms</text>')
    parts.append("</svg>")
    return "".join(parts)


def _agreement_svg(report: list[dict[str, Any]]) -> str:
    rows = [r for r in report if r["agreement"] is not None]
    if not rows:
        return "<p>No scenario has runs on both stacks.</p>"
    width, row_h, left = 720, 26, 220
    height = row_h * len(rows) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="tool-order agreement per scenario">']
    span = width - left - 80
    x95 = left + 0.95 * span
    for i, r in enumerate(rows):
        y = 6 + i * row_h
        colour = "#d62728" if r["drift"] else _STACK_COLOURS.get(r["stack"], "#555")
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">{html.escape(r["scenario"])} / {html.escape(r["stack"])}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{r["agreement"] * span:.1f}" height="18" fill="{colour}"/>')
        parts.append(f'<text x="{left + r["agreement"] * span + 6:.1f}" y="{y + 14}" font-size="12">{r["agreement"] * 100:.0f}%</text>')
    parts.append(f'<line x1="{x95:.1f}" x2="{x95:.1f}" y1="0" y2="{height}" stroke="#333" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def as_html(report: list[dict[str, Any]], latencies: dict[tuple[str, str], list[int]], *, title: str) -> str:
    head = "".join(f"<th>{html.escape(c[0])}</th>" for c in _COLUMNS)
    body = "".join(
        "<tr" + (' class="drift"' if row["drift"] else "") + ">" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for row, cells in zip(report, _cells(report)))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} tr.drift td{{background:#fde0e0}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Agreement: share of a stack's runs whose tool sequence equals the other stack's most common one;
drift when below 95% (dashed line). Latency: end of the caller's audio to the first agent audio.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Tool-order agreement</h2>{_agreement_svg(report)}
<h2>Turn latency per stack</h2>{_latency_svg(latencies)}
</body></html>
"""


async def svg_plots(conn: Any) -> list[tuple[str, str]]:
    """The report's two figures over every run, as (title, SVG) — the call browser's /admin/parity."""
    report = await fetch_report(conn, assistant=None, since=None)
    latencies = await fetch_latencies(conn, assistant=None, since=None)
    return [("Turn latency per scenario and stack", _latency_svg(latencies)),
            ("Tool-order agreement per scenario", _agreement_svg(report))]
