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
           "method_name", "METHOD_NAMES", "rl_curves", "RL_PANELS"]

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


#: (column of a TAPO log, panel title, y label) of :func:`rl_curves`.
RL_PANELS = {"reward": ("reward (0.9 acc + 0.1 format)", "mean reward (0 to 1)"),
             "kept_ratio": ("groups kept by dynamic sampling", "fraction of groups"),
             "kl": ("KL[x* || x_neg] (Eq. 3)", "KL (nats per token)"),
             "entropy": ("-log pi under x*", "nats per token"),
             "entropy_neg": ("-log pi under x_neg", "nats per token"),
             "response_len": ("response length", "tokens")}


def rl_curves(logs: dict, columns: Sequence[str] = ("reward", "kept_ratio"), window: int | None = None,
              title: str | None = None, ncols: int | None = None):
    """TAPO per-step logs (name -> ``tapo_log.csv`` frame) as one panel per column: each step as a faint dot,
    a moving average as a line; names as the paper's (:func:`method_name`), the legend above the panels.
    ``window``: moving-average steps (default: a third of the shortest run, 1 to 15)."""
    from matplotlib.ticker import MaxNLocator

    if not logs:
        raise ValueError("rl_curves needs at least one log")
    unknown = [c for c in columns if c not in RL_PANELS]
    if unknown:
        raise ValueError(f"unknown TAPO log columns {unknown}; choose from {list(RL_PANELS)}")
    n = min(len(df) for df in logs.values())
    w = window if window is not None else max(1, min(15, n // 3))
    ncols = ncols or min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 2.9 * nrows), squeeze=False)
    for ax, col in zip(axes.flat, columns):
        head, unit = RL_PANELS[col]
        for k, (name, log) in enumerate(logs.items()):
            if col in log and log[col].notna().any():
                ax.plot(log["step"], log[col], ".", color=f"C{k}", alpha=0.25, ms=3)
                ax.plot(log["step"], moving_average(log[col], w), color=f"C{k}", label=method_name(name))
        ax.set(title=head, xlabel="RL step", ylabel=unit)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, "not in these logs", ha="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    handles, labels = next((a.get_legend_handles_labels() for a in axes.flat if a.lines), ([], []))
    note = f"dots: each step; lines: moving average over {w} steps" if w > 1 else "one point per step"
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(4, max(1, len(labels))),
               frameon=False, title=f"{title}\n{note}" if title else note, fontsize=8, title_fontsize=9)
    fig.tight_layout()
    return fig
