"""Small inline SVG charts for the verification page.

Written by hand so the page stays one self-contained file with no plotting dependency and no
script: it opens the same in a browser, a mail client or a CI artifact viewer.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

_FONT = "font-family='sans-serif' font-size='11'"


def bar_chart(labels: Sequence[str], values: Sequence[float | None], *, title: str, unit: str,
              width: int = 720, bar: int = 12) -> str:
    """Horizontal bars, one per label, in the order given; ``None`` values are drawn as "exact"."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = max(max(finite, default=1.0), 1e-9)
    left, right, head = 260, 70, 28
    height = head + bar * len(labels) + 24
    span = width - left - right
    parts = [f"<svg role='img' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' {_FONT}>",
             f"<title>{html.escape(title)}</title>",
             f"<text x='4' y='16' font-weight='bold'>{html.escape(title)}</text>"]
    for i, (label, value) in enumerate(zip(labels, values)):
        y = head + i * bar
        name = label if len(label) <= 42 else "..." + label[-39:]
        parts.append(f"<text x='{left - 6}' y='{y + bar - 3}' text-anchor='end'>{html.escape(name)}</text>")
        if value is None or not math.isfinite(value):
            parts.append(f"<text x='{left + 4}' y='{y + bar - 3}'>exact</text>")
            continue
        w = max(1.0, span * max(value, 0.0) / top)
        parts.append(f"<rect x='{left}' y='{y + 1}' width='{w:.1f}' height='{bar - 2}' fill='#c0504d'/>")
        parts.append(f"<text x='{left + w + 4:.1f}' y='{y + bar - 3}'>{value:.1f} {html.escape(unit)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def histogram(edges: Sequence[float], counts: Sequence[int], *, title: str, width: int = 340,
              height: int = 150) -> str:
    """Counts per bin on a log scale (errors pile up at zero; the tails are what matter)."""
    left, bottom, head = 8, 22, 22
    plot_h = height - head - bottom
    span = width - 2 * left
    n = max(len(counts), 1)
    peak = math.log10(max(max(counts, default=1), 1) + 1)
    parts = [f"<svg role='img' width='{width}' height='{height}' "
             f"viewBox='0 0 {width} {height}' {_FONT}>",
             f"<title>{html.escape(title)}</title>",
             f"<text x='4' y='14' font-weight='bold'>{html.escape(title)}</text>"]
    for i, c in enumerate(counts):
        h = plot_h * math.log10(c + 1) / peak if c else 0.0
        x = left + span * i / n
        parts.append(f"<rect x='{x:.1f}' y='{head + plot_h - h:.1f}' width='{max(span / n - 1, 1):.1f}' "
                     f"height='{h:.1f}' fill='#4f81bd'><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}</title></rect>")
    base = head + plot_h
    parts.append(f"<line x1='{left}' y1='{base}' x2='{width - left}' y2='{base}' stroke='#888'/>")
    parts.append(f"<text x='{left}' y='{base + 15}'>{edges[0]:.3g}</text>")
    parts.append(f"<text x='{width / 2:.0f}' y='{base + 15}' text-anchor='middle'>0</text>")
    parts.append(f"<text x='{width - left}' y='{base + 15}' text-anchor='end'>{edges[-1]:.3g}</text>")
    parts.append("</svg>")
    return "".join(parts)
