"""Figures and tables of the study (matplotlib/seaborn; written atomically as PNG/Markdown)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .data import read_image, read_mask, temp_file_for  # noqa: E402
from .reporting import baseline_table, robustness_table, transfer_table  # noqa: E402
from .robustness import fair_masks  # noqa: E402
from .stats import Estimate, group_estimates  # noqa: E402
from .study import BENIGN, MALICIOUS, SCENARIOS, load_prepared  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path, suffix=path.suffix)
    os.close(fd)
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _outline(ax, mask: np.ndarray, colour: str = "yellow") -> None:
    ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.8)


def example_grid(
    names, prepared_dir, protected_dir, edited_dir, *, malicious="mask", benign="ring", amplify=20
):
    """One row per image: original | protected | δ × amplify | malicious and benign edits.

    The edited region is outlined on the edits; the protected region on the original.
    """
    prepared_dir, protected_dir, edited_dir = map(Path, (prepared_dir, protected_dir, edited_dir))
    cols = [
        "original",
        "protected",
        f"δ ×{amplify}",
        f"malicious ({malicious})\nclean",
        "malicious\nprotected",
        f"benign ({benign})\nclean",
        "benign\nprotected",
    ]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(1.6 * len(cols), 1.7 * len(names)))
    axes = np.atleast_2d(axes)
    for r, name in enumerate(names):
        x = read_image(prepared_dir / f"{name}.png")
        xp = read_image(protected_dir / f"{name}.png")
        m = read_mask(prepared_dir / f"{name}_mask.png")
        panels = [x, xp, np.clip(0.5 + amplify * (xp - x), 0, 1)]
        regions = [m, None, None]
        for scenario in (malicious, benign):
            region = read_mask(edited_dir / "masks" / f"{name}__{scenario}.png")
            for label in ("clean", "protected"):
                panels.append(read_image(edited_dir / label / f"{name}__{scenario}.png"))
                regions.append(region)
        for c, (img, region) in enumerate(zip(panels, regions, strict=True)):
            ax = axes[r, c]
            ax.imshow(img)
            if region is not None:
                _outline(ax, region)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return fig


def scenario_plot(per_edit: pd.DataFrame):
    """Per scenario: distance of the fill to the target (clean vs protected) and how far the
    protected image's edit departs from the clean image's edit inside the edited region."""
    long = per_edit.melt(
        id_vars=["name", "scenario", "kind"],
        value_vars=["target_mse_clean", "target_mse_protected"],
        var_name="image",
        value_name="target_mse",
    )
    long["image"] = long["image"].str.replace("target_mse_", "")
    order = list(SCENARIOS)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    # Intervals from stats (a seeded bootstrap over images), not seaborn's unseeded one: the
    # figure is the same file on every run.
    mse = group_estimates(long, ["scenario", "image"], ["target_mse"])
    sns.barplot(data=mse, x="scenario", y="target_mse", hue="image", order=order, ax=axes[0],
                errorbar=None)  # fmt: skip
    _interval_bars(axes[0], mse, "scenario", "target_mse", ["clean", "protected"], hue="image")
    axes[0].set_title(
        "fill vs target colour: MSE in the edited region\n(0 = the backdoor fired; 95 % intervals)",
        fontsize=10,
    )
    hits = per_edit.melt(
        id_vars=["name", "scenario"],
        value_vars=["hit_clean", "hit_protected"],
        var_name="image",
        value_name="hit",
    )
    hits["image"] = hits["image"].str.replace("hit_", "")
    rates = group_estimates(
        hits.assign(hit=hits["hit"].astype(float)), ["scenario", "image"], ["hit"]
    )
    sns.barplot(data=rates, x="scenario", y="hit", hue="image", order=order, ax=axes[1],
                errorbar=None)  # fmt: skip
    _interval_bars(axes[1], rates, "scenario", "hit", ["clean", "protected"], hue="image")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("share of edits that hit the target (95 % intervals)", fontsize=10)
    region = per_edit.assign(psnr=per_edit["psnr_region_vs_clean_edit"].replace(np.inf, 100.0))
    sns.boxplot(data=region, x="scenario", y="psnr", order=order, ax=axes[2], color="#8fb3d9")
    axes[2].set_title(
        "edit of protected vs same edit of clean:\nPSNR in the edited region (dB)", fontsize=10
    )
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
        ax.axvline(len(MALICIOUS) - 0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("malicious  |  benign")
    fig.tight_layout()
    return fig


def loss_plot(losses: pd.DataFrame):
    """The loss terms over optimisation steps (mean and spread over images)."""
    long = losses.melt(
        id_vars=["name", "step"], value_vars=["implant", "incomplete", "hide"], var_name="term"
    )
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.lineplot(data=long, x="step", y="value", hue="term", ax=ax, errorbar=("pi", 50))
    ax.set_yscale("log")
    ax.set_ylabel("masked MSE")
    ax.set_title("run-time backdoor optimisation")
    fig.tight_layout()
    return fig


def results_table(summary: dict, conclusions: list[dict] | None = None) -> str:
    """Markdown table in the layout of the paper's claims: each scenario, clean vs protected,
    every mean with its 95 % interval over images; then the ``conclusions`` it supports."""
    n = int(summary["n_images"])

    def ci(key: str, pct: bool = False, digits: int = 3) -> str:
        if f"{key}_low" not in summary:  # a summary written before intervals were recorded
            return f"{summary[key]:.0%}" if pct else f"{summary[key]:.{digits}f}"
        return Estimate(summary[key], summary[f"{key}_low"], summary[f"{key}_high"], n).format(
            pct, digits
        )

    lines = [
        f"Means over the {n} images with 95 % intervals in brackets (`runtime_backdoor.stats`).",
        "",
        "| kind | scenario | target hit rate clean → protected | fill-to-target MSE clean → protected | SSIM vs original clean → protected | SSIM protected edit vs clean edit (image / region) | PSNR protected edit vs clean edit, dB (image / region) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, scenarios in (("malicious", MALICIOUS), ("benign", BENIGN)):
        for s in scenarios:
            k = f"{kind}_{s}"
            if f"{k}_hit_rate_clean" not in summary:
                continue
            lines.append(
                f"| {kind} | {s} | {ci(f'{k}_hit_rate_clean', True)} → {ci(f'{k}_hit_rate_protected', True)} "
                f"| {ci(f'{k}_target_mse_clean')} → {ci(f'{k}_target_mse_protected')} "
                f"| {ci(f'{k}_ssim_vs_original_clean')} → {ci(f'{k}_ssim_vs_original_protected')} "
                f"| {ci(f'{k}_ssim_vs_clean_edit')} / {ci(f'{k}_ssim_region_vs_clean_edit')} "
                f"| {ci(f'{k}_psnr_vs_clean_edit', digits=1)} / {ci(f'{k}_psnr_region_vs_clean_edit', digits=1)} |"
            )
    lines.append("")
    lines.append(
        f"Protection itself: PSNR {ci('protection_psnr', digits=1)} dB (min {summary['protection_psnr_min']:.1f}), "
        f"SSIM {ci('protection_ssim')}, max change {summary['protection_linf_8bit_max']:.0f}/255, "
        f"{summary['protection_seconds_per_image']:.2f} s per image; {n} images."
    )
    if conclusions:
        lines += [
            "",
            "What the numbers support (a direction only where the paired 95 % interval excludes 0):",
            "",
        ]
        lines += [f"- {c['sentence']}." for c in conclusions]
    if summary.get("clip_fid_available"):
        lines.append("")
        lines.append("| scenario | CLIP-FID clean | CLIP-FID protected |")
        lines.append("|---|---|---|")
        for s in SCENARIOS:
            lines.append(
                f"| {s} | {summary[f'clip_fid_{s}_clean']:.2f} | {summary[f'clip_fid_{s}_protected']:.2f} |"
            )
    else:
        lines.append("")
        lines.append(
            "CLIP-FID: not computed (no pretrained CLIP ViT-B/32 weights; see `reports/clip_fid.json`)."
        )
    return "\n".join(lines) + "\n"


def _lines_with_ci(ax, t: pd.DataFrame, x: str, col: str, hue: str, order) -> None:
    """One line per ``hue`` with its 95 % interval (``col_low``/``col_high``) as a band."""
    palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    for label in order:
        d = t[t[hue] == label].sort_values(x)
        ax.plot(d[x], d[col], marker="o", color=palette[label], label=label)
        ax.fill_between(d[x], d[f"{col}_low"], d[f"{col}_high"], color=palette[label], alpha=0.2)


def eps_sweep_plot(sweep: pd.DataFrame, paper_eps_8bit: float = 6.375):
    """Hit rate, benign ring PSNR and protection PSNR against ε, one line per editor, with
    95 % intervals over images (seeds averaged within an image first) as bands."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    order = sorted(sweep["editor"].unique())  # the same colour for an editor in every panel
    finite = sweep.replace(np.inf, 100.0).assign(hit=sweep["hit"].astype(float))
    t = group_estimates(finite, ["editor", "eps_8bit"], ["hit", "ring_psnr", "protection_psnr"])
    panels = (
        ("hit", None, "share of images hit (malicious: m)"),
        ("ring_psnr", 30, "benign ring edit: PSNR vs clean edit (dB)"),
        ("protection_psnr", 32, "protected vs original: PSNR (dB)"),
    )
    for ax, (column, reference_db, label) in zip(axes, panels, strict=True):
        _lines_with_ci(ax, t, "eps_8bit", column, "editor", order)
        if reference_db is not None:
            ax.axhline(reference_db, color="grey", ls=":", lw=1)
        ax.set_ylabel(label)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ε (8-bit units)")
        ax.axvline(paper_eps_8bit, color="tab:red", lw=0.8, ls="--")
    axes[0].text(paper_eps_8bit, 1.0, " paper", color="tab:red", fontsize=8, va="top")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------- beyond stage


def _compared(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Rows of the images every method was run on (the subset), so that bars compare alike."""
    names = set(per_edit.loc[per_edit["method"] != "backdoor", "name"]) or set(per_edit["name"])
    return per_edit[per_edit["name"].isin(names)]


def _interval_bars(ax, d: pd.DataFrame, x: str, col: str, hue_order, hue: str = "method") -> None:
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


def _bars(t: pd.DataFrame, x: str, panels, title: str):
    """Two rows of bar panels (one column per source editor) with one legend for the figure."""
    sources = list(dict.fromkeys(t["source"]))
    hue_order = list(dict.fromkeys(t["method"]))
    fig, axes = plt.subplots(2, len(sources), figsize=(5.5 * len(sources), 6.6), squeeze=False)
    for c, source in enumerate(sources):
        for r, (select, col, label) in enumerate(panels):
            ax = axes[r, c]
            d = t[(t["source"] == source) & select(t)]
            sns.barplot(data=d, x=x, y=col, hue="method", hue_order=hue_order, ax=ax, errorbar=None)
            _interval_bars(ax, d, x, col, hue_order)
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


def robustness_plot(per_edit: pd.DataFrame):
    """Malicious hit rate and benign SSIM (region) per transformation, per source and method,
    on the images every method was run on."""
    d = _compared(per_edit)
    t = robustness_table(d, methods=list(d["method"].unique()))
    panels = (
        (lambda t: t["kind"] == "malicious", "hit_rate_protected", "malicious: target-hit rate"),
        (
            lambda t: t["kind"] == "benign",
            "ssim_region_vs_clean_edit",
            "benign: SSIM (region) vs clean edit",
        ),
    )
    return _bars(t, "transform", panels, "Robustness: transformation before editing")


def baseline_plot(per_edit: pd.DataFrame, protection: pd.DataFrame):
    """Hit rate and SSIM (region) by method and scenario group, per source editor."""
    t = baseline_table(per_edit, protection)
    t = t[t["status"] == "ok"].copy()
    t["group"] = t["kind"] + "\n" + t["family"]
    panels = (
        (lambda t: t["kind"].notna(), "hit_rate_protected", "target-hit rate"),
        (lambda t: t["kind"].notna(), "ssim_region_vs_clean_edit", "SSIM (region) vs clean edit"),
    )
    return _bars(t, "group", panels, "Methods side by side (no transformation)")


def transfer_plot(per_edit: pd.DataFrame):
    """Heat maps: method and editor protected against (rows) x editor edited with (columns)."""
    t = transfer_table(per_edit)
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
