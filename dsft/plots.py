"""Small shared pieces of dsft's PNG plots: an Agg figure (no pyplot global state), saving, bins."""

from __future__ import annotations

from pathlib import Path

PLOT_DPI = 110


def new_figure(width_in: float, height_in: float):
    """A matplotlib Figure drawn by the Agg canvas, so plotting needs no display and no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, out_png: Path) -> None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=PLOT_DPI, format="png")


def histogram_bins(lengths: list[int]):
    """One bar per length when the lengths span at most 60 values, else 40 shared bins."""
    import numpy as np

    low, high = min(lengths), max(lengths)
    if high - low <= 60:
        return np.arange(low - 0.5, high + 1.5)
    return np.histogram_bin_edges(lengths, bins=40)


def overlaid_histograms(groups: dict[str, tuple[list[int], str | None]], labels: tuple[str, str, str], out_png: Path) -> None:
    """Semi-transparent histograms on shared bins, one per group {legend: (values, color)};
    labels is (x label, y label, title)."""
    bins = histogram_bins([value for values, _ in groups.values() for value in values])
    figure = new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    for legend, (values, color) in groups.items():
        axes.hist(values, bins=bins, alpha=0.5, color=color, label=legend)
    axes.set(xlabel=labels[0], ylabel=labels[1], title=labels[2])
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    save_png(figure, out_png)
