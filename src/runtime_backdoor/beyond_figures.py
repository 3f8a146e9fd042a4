"""The ``beyond`` stage's figures: robustness, methods side by side, transfer, fair masks.

Each reads the stage's ``per_edit`` (and ``protection``) tables as
:func:`runtime_backdoor.pipeline.beyond.measure` returns them, through the tables of
:mod:`runtime_backdoor.reporting`; :func:`fair_mask_figure` draws the prepared images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import reporting
from .data import load_prepared
from .plots import bars, plt, sns
from .robustness import fair_masks

__all__ = ["baseline_plot", "fair_mask_figure", "robustness_plot", "transfer_plot"]


def _compared(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Rows of the images every method was run on (the subset), so that bars compare alike."""
    names = set(per_edit.loc[per_edit["method"] != "backdoor", "name"]) or set(per_edit["name"])
    return per_edit[per_edit["name"].isin(names)]


def robustness_plot(per_edit: pd.DataFrame):
    """Malicious hit rate and benign SSIM (region) per transformation, per source and method,
    on the images every method was run on."""
    d = _compared(per_edit)
    t = reporting.robustness_table(d, methods=list(d["method"].unique()))
    panels = (
        (lambda t: t["kind"] == "malicious", "hit_rate_protected", "malicious: target-hit rate"),
        (
            lambda t: t["kind"] == "benign",
            "ssim_region_vs_clean_edit",
            "benign: SSIM (region) vs clean edit",
        ),
    )
    return bars(t, "transform", panels, "Robustness: transformation before editing")


def baseline_plot(per_edit: pd.DataFrame, protection: pd.DataFrame):
    """Hit rate and SSIM (region) by method and scenario group, per source editor."""
    t = reporting.baseline_table(per_edit, protection)
    t = t[t["status"] == "ok"].copy()
    t["group"] = t["kind"] + "\n" + t["family"]
    panels = (
        (lambda t: t["kind"].notna(), "hit_rate_protected", "target-hit rate"),
        (lambda t: t["kind"].notna(), "ssim_region_vs_clean_edit", "SSIM (region) vs clean edit"),
    )
    return bars(t, "group", panels, "Methods side by side (no transformation)")


def transfer_plot(per_edit: pd.DataFrame):
    """Heat maps: method and editor protected against (rows) x editor edited with (columns)."""
    t = reporting.transfer_table(per_edit)
    t["protected against"] = t["method"] + " / " + t["source"]
    rows = list(dict.fromkeys(t["protected against"]))
    cols = list(dict.fromkeys(t["editor"]))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.4 * len(cols), 1.2 + 0.35 * len(rows)))
    for ax, (kind, col, title) in zip(
        axes,
        (
            ("malicious", "hit_rate_protected", "malicious: target-hit rate"),
            ("benign", "ssim_region_vs_clean_edit", "benign: SSIM (region) vs clean edit"),
        ),
        strict=True,
    ):
        piv = t[t["kind"] == kind].pivot(index="protected against", columns="editor", values=col)
        piv = piv.reindex(index=rows, columns=cols)
        sns.heatmap(piv, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax, cbar=False)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("method / protected against")
        ax.set_xlabel("edited with")
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    return fig


def fair_mask_figure(
    prepared_dir, names: list[str], kernel: int, *, shift_px: int = 4, seed: int = 0
):
    """One row per image: the protected region and every fair scenario's mask."""
    _, x, m = load_prepared(prepared_dir, names)
    fair = fair_masks(m, shift_px=shift_px, seed=seed)
    cols = ["image + m", *fair]
    fig, axes = plt.subplots(
        len(names), len(cols), figsize=(1.5 * len(cols), 1.6 * len(names)), squeeze=False
    )
    for i, name in enumerate(names):
        img = x[i].permute(1, 2, 0).numpy()
        for c, label in enumerate(cols):
            ax = axes[i, c]
            ax.imshow(img)
            region = m[i, 0] if c == 0 else fair[label][i, 0]
            ax.imshow(
                np.ma.masked_where(region.numpy() < 0.5, region.numpy()), cmap="autumn", alpha=0.55
            )
            ax.contour(m[i, 0].numpy(), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    return fig
