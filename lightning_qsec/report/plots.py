"""Draw a :class:`~lightning_qsec.report.section.Plot` to PNG bytes.

Uses matplotlib's object-oriented API (:class:`matplotlib.figure.Figure` with an
explicit Agg canvas), so it never touches pyplot's global state or the configured
backend and is safe to call from training code.
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_qsec.report.section import Plot

__all__ = ["draw_plot"]


def _finite(value: float) -> bool:
    """Whether ``value`` is a finite number."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


_VARIANTS = 4  # after the 10 colours of matplotlib's default cycle: line styles or bar hatches


def _style(index: int, kind: str) -> dict[str, Any]:
    """Colour and line style (``kind="line"``) or hatch (``"bar"``) of series ``index``: 40 distinct."""
    variant = index // 10 % _VARIANTS
    if kind == "line":
        return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[variant]}
    return {"color": f"C{index % 10}", "hatch": ("", "//", "..", "xx")[variant]}


def _draw_line(ax: Any, plot: Plot) -> int:
    """Draw line series; returns how many colours were used."""
    for index, (name, points) in enumerate(plot.series.items()):
        if not points:
            continue
        xs = [x for x, _ in points]
        ys = [float(y) if y is not None else math.nan for _, y in points]
        ax.plot(xs, ys, marker="o", label=str(name), **_style(index, "line"))
    return len(plot.series)


def _draw_bar(ax: Any, plot: Plot) -> int:
    """Draw grouped bars, one group per category; returns how many colours were used."""
    categories: list[Any] = []
    for points in plot.series.values():
        for x, _ in points:
            if x not in categories:
                categories.append(x)
    n_series = max(len(plot.series), 1)
    width = 0.8 / n_series
    for index, (name, points) in enumerate(plot.series.items()):
        heights = dict(points)
        positions = [
            pos + (index - (n_series - 1) / 2) * width
            for pos, category in enumerate(categories)
            if category in heights
        ]
        values = [
            float(heights[category]) if heights[category] is not None else math.nan
            for category in categories
            if category in heights
        ]
        ax.bar(positions, values, width=width, label=str(name), **_style(index, "bar"))
    ax.set_xticks(range(len(categories)), [str(category) for category in categories])
    return len(plot.series)


def draw_plot(plot: Plot) -> bytes:
    """Render ``plot`` as a PNG image.

    ``kind="line"`` draws one line with markers per series; ``kind="bar"`` draws
    grouped bars (categories from the series' x values, in first-seen order).
    ``hlines`` are dashed horizontal reference lines labelled in the legend. Series
    beyond matplotlib's ten default colours differ by line style or bar hatch (40
    distinct styles).
    Non-finite or ``None`` values are left out of the picture.

    Args:
        plot: what to draw.

    Returns:
        The PNG file content.

    Raises:
        ValueError: ``plot.kind`` is neither ``"line"`` nor ``"bar"``.
    """
    if plot.kind not in ("line", "bar"):
        raise ValueError(f"plot {plot.filename!r}: unknown kind {plot.kind!r}")
    figure = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    used = _draw_line(ax, plot) if plot.kind == "line" else _draw_bar(ax, plot)
    for offset, (name, y) in enumerate(plot.hlines.items()):
        if _finite(y):
            ax.axhline(
                float(y),
                linestyle=(0, (6, 2, 1, 2, 1, 2)),  # dash-dot-dot: unlike any series' style
                linewidth=1.2,
                color=f"C{(used + offset) % 10}",
                label=str(name),
            )
    ax.set_title(plot.title)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="best", fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
