"""Server-rendered SVG charts for the dashboard (no JavaScript chart library).

Each function returns a small, self-contained ``<svg>`` as `markupsafe.Markup`: every label
is escaped, colours are presentation attributes (the Content-Security-Policy forbids inline
styles), and each chart has a ``<title>`` and ``role="img"`` with an ``aria-label`` so it
reads as text to a screen reader.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

COLORS = {"success": "#2e7d32", "failure": "#c62828", "not-run": "#9e9e9e",
          "disabled": "#f9a825", "items": "#1565c0", "failures": "#c62828",
          "runs": "#1565c0", "failed_runs": "#c62828"}
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _svg(width: int, height: int, title: str, body: str) -> Markup:
    # Safe: every text that reaches ``body`` went through escape() above; numbers are ours.
    return Markup(  # noqa: S704
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f"{body}</svg>")


def stacked_bars(title: str, rows: Sequence[tuple[str, Sequence[tuple[str, int]]]]) -> Markup:
    """One horizontal bar per row, split by state (``[(label, [(state, n), ...]), ...]``)."""
    width, left, bar_h, gap = 560, 80, 22, 12
    height = 30 + len(rows) * (bar_h + gap) + 24
    most = max([sum(n for _, n in parts) for _, parts in rows] + [1])
    body = []
    for i, (label, parts) in enumerate(rows):
        y = 20 + i * (bar_h + gap)
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" {FONT}>'
                    f"{escape(label)}</text>")
        x = float(left)
        total = sum(n for _, n in parts)
        for state, n in parts:
            if n <= 0:
                continue
            w = (width - left - 60) * n / most
            body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                        f'fill="{COLORS.get(state, "#607d8b")}"><title>{escape(state)}: {n}'
                        "</title></rect>")
            if w > 18:
                body.append(f'<text x="{x + w / 2:.1f}" y="{y + 15}" text-anchor="middle" '
                            f'fill="#fff" {FONT}>{n}</text>')
            x += w
        body.append(f'<text x="{x + 6:.1f}" y="{y + 15}" {FONT} fill="#555">{total}</text>')
    legend_y = height - 10
    states = list(dict.fromkeys(s for _, parts in rows for s, _ in parts))
    for j, state in enumerate(states):
        lx = left + j * 95
        body.append(f'<rect x="{lx}" y="{legend_y - 9}" width="10" height="10" '
                    f'fill="{COLORS.get(state, "#607d8b")}"/>'
                    f'<text x="{lx + 14}" y="{legend_y}" {FONT}>{escape(state)}</text>')
    return _svg(width, height, title, "".join(body))


def hourly_bars(title: str, hours: Sequence[str], series: Sequence[tuple[str, Sequence[int]]]
                ) -> Markup:
    """Grouped vertical bars per hour (e.g. items and failures), with an axis and a legend."""
    width, height, left, bottom, top = 560, 200, 40, 30, 16
    plot_w, plot_h = width - left - 10, height - bottom - top
    most = max([max(values, default=0) for _, values in series] + [1])
    slot = plot_w / max(len(hours), 1)
    bar_w = max(1.0, slot * 0.8 / max(len(series), 1))
    body = [f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" '
            'stroke="#999"/>',
            f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" {FONT}>{most}</text>',
            f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" {FONT}>0</text>']
    for i, hour in enumerate(hours):
        for k, (name, values) in enumerate(series):
            value = values[i] if i < len(values) else 0
            if value <= 0:
                continue
            h = plot_h * value / most
            x = left + i * slot + slot * 0.1 + k * bar_w
            body.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" '
                        f'height="{h:.1f}" fill="{COLORS.get(name, "#607d8b")}"><title>'
                        f"{escape(hour)} {escape(name)}: {value}</title></rect>")
        if i % max(1, len(hours) // 6) == 0:
            body.append(f'<text x="{left + i * slot:.1f}" y="{height - 12}" {FONT} '
                        f'fill="#555">{escape(hour[11:16])}</text>')
    for k, (name, _) in enumerate(series):
        lx = left + k * 90
        body.append(f'<rect x="{lx}" y="{height - 9}" width="10" height="8" '
                    f'fill="{COLORS.get(name, "#607d8b")}"/>'
                    f'<text x="{lx + 14}" y="{height - 1}" {FONT}>{escape(name)}</text>')
    return _svg(width, height + 4, title, "".join(body))


def value_bars(title: str, values: Sequence[tuple[str, float | None]], unit: str) -> Markup:
    """Labelled horizontal bars for a few named values (latency percentiles)."""
    width, left, bar_h, gap = 560, 80, 20, 10
    height = 16 + len(values) * (bar_h + gap)
    most = max([v for _, v in values if v is not None] + [1e-9])
    body = []
    for i, (label, value) in enumerate(values):
        y = 8 + i * (bar_h + gap)
        body.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end" {FONT}>'
                    f"{escape(label)}</text>")
        if value is None:
            body.append(f'<text x="{left}" y="{y + 14}" {FONT} fill="#777">no runs yet</text>')
            continue
        w = (width - left - 90) * value / most
        body.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                    'fill="#6a1b9a"/>'
                    f'<text x="{left + w + 6:.1f}" y="{y + 14}" {FONT}>{value:.2f} '
                    f"{escape(unit)}</text>")
    return _svg(width, height, title, "".join(body))
