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
