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
from .study import BENIGN, MALICIOUS, SCENARIOS  # noqa: E402


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
    sns.barplot(data=long, x="scenario", y="target_mse", hue="image", order=order, ax=axes[0])
    axes[0].set_title(
        "fill vs target colour: MSE in the edited region\n(0 = the backdoor fired)", fontsize=10
    )
    hits = per_edit.melt(
        id_vars=["scenario"],
        value_vars=["hit_clean", "hit_protected"],
        var_name="image",
        value_name="hit",
    )
    hits["image"] = hits["image"].str.replace("hit_", "")
    sns.barplot(
        data=hits, x="scenario", y="hit", hue="image", order=order, ax=axes[1], errorbar=None
    )
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("share of edits that hit the target", fontsize=10)
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


def results_table(summary: dict) -> str:
    """Markdown table in the layout of the paper's claims: each scenario, clean vs protected."""
    lines = [
        "| kind | scenario | target hit rate clean → protected | fill-to-target MSE clean → protected | SSIM vs original clean → protected | SSIM protected edit vs clean edit (image / region) | PSNR protected edit vs clean edit, dB (image / region) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, scenarios in (("malicious", MALICIOUS), ("benign", BENIGN)):
        for s in scenarios:
            k = f"{kind}_{s}"
            if f"{k}_hit_rate_clean" not in summary:
                continue
            lines.append(
                f"| {kind} | {s} | {summary[f'{k}_hit_rate_clean']:.0%} → {summary[f'{k}_hit_rate_protected']:.0%} "
                f"| {summary[f'{k}_target_mse_clean']:.3f} → {summary[f'{k}_target_mse_protected']:.3f} "
                f"| {summary[f'{k}_ssim_vs_original_clean']:.3f} → {summary[f'{k}_ssim_vs_original_protected']:.3f} "
                f"| {summary[f'{k}_ssim_vs_clean_edit']:.3f} / {summary[f'{k}_ssim_region_vs_clean_edit']:.3f} "
                f"| {summary[f'{k}_psnr_vs_clean_edit']:.1f} / {summary[f'{k}_psnr_region_vs_clean_edit']:.1f} |"
            )
    lines.append("")
    lines.append(
        f"Protection itself: PSNR {summary['protection_psnr']:.1f} dB (min {summary['protection_psnr_min']:.1f}), "
        f"SSIM {summary['protection_ssim']:.3f}, max change {summary['protection_linf_8bit_max']:.0f}/255, "
        f"{summary['protection_seconds_per_image']:.2f} s per image; {summary['n_images']} images."
    )
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


def eps_sweep_plot(sweep: pd.DataFrame, paper_eps_8bit: float = 6.375):
    """Hit rate, benign ring PSNR and protection PSNR against ε, one line per editor."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    order = sorted(sweep["editor"].unique())  # the same colour for an editor in every panel
    hits = sweep.groupby(["editor", "eps_8bit"], as_index=False)["hit"].mean()
    sns.lineplot(
        data=hits, x="eps_8bit", y="hit", hue="editor", hue_order=order, marker="o", ax=axes[0]
    )
    axes[0].set_ylabel("share of images hit (malicious: m)")
    axes[0].set_ylim(-0.02, 1.02)
    finite = sweep.replace(np.inf, 100.0)
    psnr_panels = (
        ("ring_psnr", 30, "benign ring edit: PSNR vs clean edit (dB)"),
        ("protection_psnr", 32, "protected vs original: PSNR (dB)"),
    )
    for ax, (column, reference_db, label) in zip(axes[1:], psnr_panels, strict=True):
        sns.lineplot(
            data=finite,
            x="eps_8bit",
            y=column,
            hue="editor",
            hue_order=order,
            marker="o",
            ax=ax,
            errorbar=("pi", 50),
        )
        ax.axhline(reference_db, color="grey", ls=":", lw=1)
        ax.set_ylabel(label)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ε (8-bit units)")
        ax.axvline(paper_eps_8bit, color="tab:red", lw=0.8, ls="--")
    axes[0].text(paper_eps_8bit, 1.0, " paper", color="tab:red", fontsize=8, va="top")
    fig.tight_layout()
    return fig
