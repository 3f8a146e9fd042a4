"""Stage ``figures``: example grids per content type, the scenario figure, the conclusions the
numbers support (``reports/conclusions.json``) and ``reports/results.md``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import read_folder, read_image, read_mask, write_json
from ..masks import BENIGN, MALICIOUS, SCENARIOS
from ..plots import interval_bars, outline, plt, save_figure, sns
from ..reporting import scenario_conclusions
from ..stats import Estimate, group_estimates


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
                outline(ax, region)
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
    interval_bars(axes[0], mse, "scenario", "target_mse", ["clean", "protected"], hue="image")
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
    interval_bars(axes[1], rates, "scenario", "hit", ["clean", "protected"], hue="image")
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
            "What the numbers support (paired over images: an exact sign test for hit rates, "
            "Wilcoxon's signed-rank test and the paired 95 % interval for values, Holm within "
            "each family; never from fewer than 6 images):",
            "",
        ]
        lines += [f"- {c['sentence']}." for c in conclusions]
    if summary.get("lpips_available"):
        lines += [
            "",
            f"LPIPS-alex of the protected image vs the original: {ci('protection_lpips')}.",
        ]
    elif "lpips_unavailable" in summary:
        lines += ["", f"LPIPS: not computed ({summary['lpips_unavailable']})."]
    if summary.get("clip_fid_available"):

        def fid(key: str) -> str:
            v, lo, hi = (summary.get(f"clip_fid_{key}{x}") for x in ("", "_low", "_high"))
            return f"{v:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")

        lines += [
            "",
            f"CLIP-FID (clean-fid's clip_vit_b_32: OpenAI ViT-B/32 features) of the {n} edited "
            f"images against the {n} prepared originals; brackets: 2.5–97.5 % over resampled "
            "images. With fewer images than the 512 feature dimensions the value is biased "
            "upwards: compare only numbers computed on the same n.",
            "",
            "| scenario | CLIP-FID clean | CLIP-FID protected |",
            "|---|---|---|",
        ]
        lines += [f"| {s} | {fid(f'{s}_clean')} | {fid(f'{s}_protected')} |" for s in SCENARIOS]
    else:
        lines.append("")
        lines.append(
            "CLIP-FID: not computed (no pretrained CLIP ViT-B/32 weights: "
            "`runtime-backdoor weights fetch clip-vit-b-32`; see `reports/clip_fid.json`)."
        )
    return "\n".join(lines) + "\n"


def run(
    reports_dir="reports",
    *,
    prepared_dir="data/prepared",
    protected_dir="data/protected",
    edited_dir="data/edited",
    rows_per_grid: int = 3,
    amplify: float = 20,
) -> dict:
    """The stage: ``figures/grids/CONTENT.png``, ``figures/scenarios.png``,
    ``conclusions.json`` and ``results.md`` under ``reports_dir``."""
    reports = Path(reports_dir)
    summary = json.loads((reports / "metrics.json").read_text())
    per_edit = pd.read_csv(reports / "per_edit.csv")
    manifest = read_folder(prepared_dir)
    grids = {}
    for content, group in manifest.groupby("content"):
        names = group["name"].tolist()[:rows_per_grid]
        fig = example_grid(names, prepared_dir, protected_dir, edited_dir, amplify=amplify)
        grids[content] = save_figure(fig, reports / "figures" / "grids" / f"{content}.png")
    scenarios = save_figure(scenario_plot(per_edit), reports / "figures" / "scenarios.png")
    # The comparisons the text states, decided from the per-image values (stats.compare).
    found = scenario_conclusions(per_edit)
    write_json(reports / "conclusions.json", found)
    table = results_table(summary, found)
    (reports / "results.md").write_text(table)
    return {"grids": grids, "scenarios": scenarios, "conclusions": found, "table": table}
