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

__all__ = ["save_figure", "image_grid", "plot_curves"]


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
