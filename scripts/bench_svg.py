"""A tiny SVG line chart for `make bench` (no plotting library: one chart, a few dozen lines).

    cpu_chart({"bare relay": [(50, 0.12), (100, 0.10)], "shim": [...]}, subtitle="...") -> str
"""

from __future__ import annotations

import math
from html import escape

# Colour-blind-safe (Okabe-Ito), in stack order: the floor first.
COLOURS = ["#555555", "#E69F00", "#0072B2", "#009E73", "#CC79A7", "#D55E00"]


def _nice_max(v: float) -> float:
    """The smallest 1/2/2.5/5 x 10^k at or above v."""
    if v <= 0:
        return 1.0
    k = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * k:
            return m * k
    return 10 * k


def cpu_chart(series: dict[str, list[tuple[int, float]]], *, subtitle: str = "",
              title: str = "CPU-s per call-minute (lower is better)", width: int = 640, height: int = 360) -> str:
    left, right, top, bottom = 64, 170, 52, 48
    pw, ph = width - left - right, height - top - bottom
    xs = sorted({n for pts in series.values() for n, _ in pts})
    ymax = _nice_max(max((v for pts in series.values() for _, v in pts), default=1.0) * 1.05)
    if not xs:
        xs = [0]
    span = (xs[-1] - xs[0]) or 1

    pad = 28  # keep the first and last points off the axes

    def x(n: float) -> float:
        return left + (pad + (pw - 2 * pad) * (n - xs[0]) / span if len(xs) > 1 else pw / 2)

    def y(v: float) -> float:
        return top + ph * (1 - v / ymax)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    if subtitle:
        out.append(f'<text x="{left}" y="40" fill="#555">{escape(subtitle)}</text>')
    for i in range(6):  # horizontal grid and y labels
        v = ymax * i / 5
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for n in xs:
        out.append(f'<text x="{x(n):.1f}" y="{top + ph + 18}" text-anchor="middle">{n}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle">concurrent calls (N)</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#333"/>')
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333"/>')
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts)
        if len(pts) > 1:
            path = " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.5"/>')
        for n, v in pts:
            out.append(f'<circle cx="{x(n):.1f}" cy="{y(v):.1f}" r="4" fill="{colour}"><title>{escape(name)}, '
                       f'N={n}: {v:.3f}</title></circle>')
            out.append(f'<text x="{x(n) + 6:.1f}" y="{y(v) - 6:.1f}" fill="{colour}" font-size="11">{v:.3f}</text>')
        ly = top + 10 + 20 * i
        out.append(f'<line x1="{left + pw + 16}" x2="{left + pw + 40}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                   'stroke-width="2.5"/>')
        out.append(f'<text x="{left + pw + 46}" y="{ly + 4}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
