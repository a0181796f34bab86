"""Inline SVG charts for the HTML report: lines, a scatter map and a histogram.

Written by hand (no matplotlib) so a report costs milliseconds and its charts are plain,
inspectable elements; each chart is one `<svg>` string with `<title>` tooltips.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
HIT, MISS = "#2ca02c", "#d62728"
_W, _H, _L, _R, _T, _B = 360, 280, 52, 14, 14, 42  # size and margins (px)
_LEGEND = 84  # room right of a line chart for its legend


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 x 10^e steps)."""
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Frame:
    """Maps data coordinates to pixels inside the plot area and draws the axes."""

    def __init__(self, x_range, y_range, width=_W, height=_H, right=_R, left=_L, top=_T):
        self.w, self.h, self.r, self.l = width, height, right, left
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.t = top

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.l + (x - self.x0) / span * (self.w - self.l - self.r)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.h - _B - (y - self.y0) / span * (self.h - self.t - _B)

    def axes(self, x_label: str, y_label: str, x_ticks, y_ticks, x_fmt=str, y_fmt=str) -> list[str]:
        out = [f'<rect x="{self.l}" y="{self.t}" width="{self.w - self.l - self.r}" height="{self.h - self.t - _B}" fill="#fff" stroke="#999"/>']
        for t in y_ticks:
            y = self.py(t)
            out.append(f'<line x1="{self.l}" x2="{self.w - self.r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text x="{self.l - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(y_fmt(t))}</text>')
        for t in x_ticks:
            x = self.px(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.t}" y2="{self.h - _B}" stroke="#eee"/>'
                       f'<text x="{x:.1f}" y="{self.h - _B + 14}" text-anchor="middle">{escape(x_fmt(t))}</text>')
        out.append(f'<text x="{(self.l + self.w - self.r) / 2:.0f}" y="{self.h - 6}" text-anchor="middle">{escape(x_label)}</text>')
        out.append(f'<text transform="translate(12 {(self.h - _B + self.t) / 2:.0f}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
        return out


def _svg(frame: _Frame, body: list[str], cls: str) -> str:
    return (f'<svg class="chart {cls}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {frame.w} {frame.h}" '
            f'width="{frame.w}" height="{frame.h}" font-size="11" font-family="sans-serif">' + "".join(body) + "</svg>")


def _num(v: float) -> str:
    return f"{v:g}"


MAX_MARKERS = 60  # points per series drawn as markers with a tooltip; longer series are lines only


def line_chart(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str,
               y_range: tuple[float, float] | None = (0.0, 100.0), cls: str = "lines") -> str:
    """One polyline (with markers when short) per named series, a legend on the right;
    `y_range=None` fits the y axis to the data."""
    xs = [x for pts in series.values() for x, _ in pts]
    lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    pad = (hi - lo) * 0.04 or 0.5
    if y_range is None:
        ys = [y for pts in series.values() for _, y in pts] or [0.0, 1.0]
        y_pad = (max(ys) - min(ys)) * 0.05 or 0.5
        y_range = (min(ys) - y_pad, max(ys) + y_pad)
    f = _Frame((lo - pad, hi + pad), y_range, width=_W + _LEGEND, right=_R + _LEGEND)
    x_ticks = sorted(set(xs)) if len(set(xs)) <= 12 else nice_ticks(lo, hi)
    body = f.axes(x_label, y_label, x_ticks, nice_ticks(*y_range), _num, _num)
    for i, (name, pts) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        if len(pts) <= MAX_MARKERS:
            body += [f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3" fill="{c}"><title>{escape(name)}: '
                     f'{_num(x)} -> {y:.4g}</title></circle>' for x, y in pts]
        body.append(f'<text x="{f.w - _LEGEND + 4}" y="{_T + 14 + 14 * i}" fill="{c}">{escape(name)}</text>')
    return _svg(f, body, cls)


def _extent(v: np.ndarray) -> tuple[float, float]:
    """(centre, span) of the values, padded 5 % on each side (a tiny floor for a single point)."""
    if not len(v):
        return 0.0, 1e-5
    lo, hi = float(v.min()), float(v.max())
    return (lo + hi) / 2, max(hi - lo, 1e-5) * 1.1


def scatter_map(lon: np.ndarray, lat: np.ndarray, colours: list[str], titles: list[str],
                legend: tuple[tuple[str, str], ...] = (), cls: str = "map", hollow: list[bool] | None = None,
                max_px: tuple[int, int] = (300, 210), min_px: tuple[int, int] = (200, 120)) -> str:
    """Points on plain longitude/latitude axes with equal ground scale (x shrunk by cos lat), the
    frame fitted to the data's extent; later points draw on top, `hollow` ones as rings (so a
    point beneath stays visible)."""
    lat0 = float(np.mean(lat)) if len(lat) else 0.0
    squeeze = max(math.cos(math.radians(lat0)), 1e-6)
    x, y = np.asarray(lon) * squeeze, np.asarray(lat)
    (cx, sx), (cy, sy) = _extent(x), _extent(y)
    scale = min(max_px[0] / sx, max_px[1] / sy)  # px per degree, the same on both axes
    sx, sy = max(sx, min_px[0] / scale), max(sy, min_px[1] / scale)  # a thin street still gets a frame
    left, top = _L + 22, _T + 14  # room for long tick labels; the legend's line
    f = _Frame((cx - sx / 2, cx + sx / 2), (cy - sy / 2, cy + sy / 2), width=round(left + sx * scale + _R),
               height=round(top + sy * scale + _B), left=left, top=top)
    x_ticks = nice_ticks(f.x0 / squeeze, f.x1 / squeeze, 3)
    body = f.axes("longitude (°)", "latitude (°)", [t * squeeze for t in x_ticks], nice_ticks(f.y0, f.y1, 4),
                  lambda v: f"{v / squeeze:.4f}", lambda v: f"{v:.4f}")
    hollow = hollow or [False] * len(colours)
    for a, b, c, t, ring in zip(x.tolist(), y.tolist(), colours, titles, hollow):
        paint = f'r="3.5" fill="none" stroke="{c}" stroke-width="1.5"' if ring else f'r="2.5" fill="{c}" fill-opacity="0.75"'
        body.append(f'<circle class="point" cx="{f.px(a):.1f}" cy="{f.py(b):.1f}" {paint}><title>{escape(t)}</title></circle>')
    body += [f'<text x="{left + 110 * i}" y="{top - 6}" fill="{c}">{escape(t)}</text>' for i, (c, t) in enumerate(legend)]
    return _svg(f, body, cls)


def histogram(counts: list[int], labels: list[str], x_label: str, y_label: str, colours: list[str] | None = None,
              cls: str = "histogram") -> str:
    """Bars of `counts` over categorical bins named by `labels`."""
    top = max(counts) if counts else 1
    f = _Frame((0, len(counts)), (0, max(1, top) * 1.05), width=_W + 80)
    body = f.axes(x_label, y_label, [], nice_ticks(0, max(1, top), 4), _num, lambda v: f"{v:g}")
    bw = (f.px(1) - f.px(0)) * 0.85
    for i, (n, name) in enumerate(zip(counts, labels)):
        c = colours[i] if colours else PALETTE[0]
        body.append(f'<rect class="bar" data-count="{n}" x="{f.px(i) + bw * 0.08:.1f}" y="{f.py(n):.1f}" width="{bw:.1f}" '
                    f'height="{f.py(0) - f.py(n):.1f}" fill="{c}"><title>{escape(name)}: {n}</title></rect>'
                    f'<text x="{f.px(i + 0.5):.1f}" y="{f.h - _B + 14}" text-anchor="middle" font-size="9">{escape(name)}</text>')
    return _svg(f, body, cls)
