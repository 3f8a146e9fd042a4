"""Plotting helpers the stages share (matplotlib/seaborn, non-interactive; PNGs written atomically).

Each stage's own figures live in its module under :mod:`runtime_backdoor.pipeline`.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .data import temp_file_for  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path, suffix=path.suffix)
    os.close(fd)
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def outline(ax, mask: np.ndarray, colour: str = "yellow") -> None:
    ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.8)


def lines_with_ci(ax, t: pd.DataFrame, x: str, col: str, hue: str, order) -> None:
    """One line per ``hue`` with its 95 % interval (``col_low``/``col_high``) as a band."""
    palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    for label in order:
        d = t[t[hue] == label].sort_values(x)
        ax.plot(d[x], d[col], marker="o", color=palette[label], label=label)
        ax.fill_between(d[x], d[f"{col}_low"], d[f"{col}_high"], color=palette[label], alpha=0.2)


def interval_bars(ax, d: pd.DataFrame, x: str, col: str, hue_order, hue: str = "method") -> None:
    """95 % intervals (``col_low``/``col_high``) on the bars seaborn drew, one per row of ``d``."""
    ticks = np.asarray(ax.get_xticks(), dtype=float)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    for container, level in zip(
        ax.containers, [h for h in hue_order if h in set(d[hue])], strict=False
    ):
        rows = d[d[hue] == level].set_index(x)
        for bar in container:
            centre = bar.get_x() + bar.get_width() / 2
            label = labels[int(np.argmin(np.abs(ticks - centre)))]  # the bar's x category
            if label not in rows.index or pd.isna(rows.loc[label, col]):
                continue
            r = rows.loc[label]
            ax.errorbar(centre, r[col], yerr=[[r[col] - r[f"{col}_low"]], [r[f"{col}_high"] - r[col]]],
                        color="black", lw=0.8, capsize=2)  # fmt: skip


def bars(t: pd.DataFrame, x: str, panels, title: str):
    """Two rows of bar panels (one column per source editor) with one legend for the figure."""
    sources = list(dict.fromkeys(t["source"]))
    hue_order = list(dict.fromkeys(t["method"]))
    fig, axes = plt.subplots(2, len(sources), figsize=(5.5 * len(sources), 6.6), squeeze=False)
    for c, source in enumerate(sources):
        for r, (select, col, label) in enumerate(panels):
            ax = axes[r, c]
            d = t[(t["source"] == source) & select(t)]
            sns.barplot(data=d, x=x, y=col, hue="method", hue_order=hue_order, ax=ax, errorbar=None)
            interval_bars(ax, d, x, col, hue_order)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{source} — {label}", fontsize=9)
            ax.set_xlabel("")
            ax.set_ylabel("")
            ax.tick_params(axis="x", rotation=30 if x == "transform" else 0, labelsize=8)
            if ax.get_legend() is not None:
                ax.get_legend().remove()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(
        handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(labels),
        fontsize=8, frameon=False, title=title, title_fontsize=10,
    )  # fmt: skip
    return fig
