"""Figures of the tutorial: small helpers so notebook cells stay short. Saved atomically as PNG."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg") if not hasattr(matplotlib, "_called_from_notebook") else None
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from .io import atomic_write_bytes  # noqa: E402

__all__ = ["save_figure", "image_grid", "plot_curves", "label_bars", "legend_outside", "moving_average",
           "method_name", "METHOD_NAMES"]

# run keys of the ablation -> the paper's method names (Fig. 3c)
METHOD_NAMES = {"tapo-dapo": "CoT SFT + DAPO", "tapo-intra": "CoT SFT + DAPO + intra-class x_pos",
                "tapo-inter": "CoT SFT + DAPO + inter-class x_neg", "tapo-tapo": "Fine-R1 (TAPO)"}


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (PNG) atomically; deterministic bytes for the same figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


def image_grid(images: Sequence[Image.Image], titles: Sequence[str] | None = None, ncols: int = 4,
               size: float = 2.0, suptitle: str | None = None, fontsize: int = 8):
    """A grid of images with optional titles; returns the figure."""
    n = len(images)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k])
            if titles:
                ax.set_title(titles[k], fontsize=fontsize)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_curves(frame, x: str, ys: Sequence[str], title: str = "", ylabel: str = "", smooth: int = 1,
                logy: bool = False):
    """Line plot of columns ``ys`` of a pandas frame against ``x`` (rolling mean over ``smooth`` rows)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for y in ys:
        series = frame[y].astype(float)
        if smooth > 1:
            series = series.rolling(smooth, min_periods=1).mean()
        ax.plot(frame[x].astype(float), series, label=y)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def method_name(key: str) -> str:
    """The paper's name of a run key ("tapo-dapo" -> "CoT SFT + DAPO"); other names pass through unchanged."""
    return METHOD_NAMES.get(key, key)


def label_bars(ax, fmt: str = "{:.1f}", fontsize: int = 7, padding: int = 2, cap: float | None = None):
    """Write each bar's value at its end (``ax.bar_label``), so a zero-height bar still shows as "0.0".

    ``cap``: end the value axis there, so one tall bar does not flatten the rest; a longer bar is cut at the
    axis edge and its value is written inside it, marked "(axis cut)".
    """
    horizontal = False
    for container in ax.containers:
        if not hasattr(container, "datavalues"):
            continue
        horizontal = getattr(container, "orientation", "vertical") == "horizontal"
        labels = []
        for bar, v in zip(container, container.datavalues):
            text = fmt.format(v) if v == v else "n/a"
            if cap is not None and v > cap:
                xy = ((cap, bar.get_y() + bar.get_height() / 2) if horizontal
                      else (bar.get_x() + bar.get_width() / 2, cap))
                ax.annotate(f"{text} (axis cut)", xy, xytext=(-3, 0) if horizontal else (0, -3),
                            textcoords="offset points", ha="right" if horizontal else "center",
                            va="center" if horizontal else "top", fontsize=fontsize, color="white",
                            fontweight="bold")
                text = ""
            labels.append(text)
        ax.bar_label(container, labels=labels, fontsize=fontsize, padding=padding)
    ax.margins(**({"x": 0.15} if horizontal else {"y": 0.15}))
    if cap is not None:
        (ax.set_xlim if horizontal else ax.set_ylim)(0, cap)
    return ax


def legend_outside(ax, title: str | None = None, fontsize: int = 8, **kw):
    """A legend to the right of the axes (never over the data)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=fontsize,
                     title=title, title_fontsize=fontsize, **kw)


def moving_average(values, window: int):
    """Centred moving average (a pandas rolling mean, shorter windows at the ends); ``window`` <= 1: unchanged."""
    import pandas as pd

    series = pd.Series(values, dtype=float)
    return series if window <= 1 else series.rolling(window, center=True, min_periods=1).mean()
