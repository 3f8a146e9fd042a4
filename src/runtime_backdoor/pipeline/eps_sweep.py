"""Stage ``eps_sweep``: protection against each editor at each L∞ budget, with 95 % intervals.

Per image and budget: the share of the protected region on target under the malicious edit, the
benign ring edit's PSNR against the clean image's, and the protection's own PSNR.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import metrics as Q
from ..budget import Budget
from ..data import load_prepared, read_folder, to_array, write_csv, write_json
from ..editors.specs import PIPELINE, build_from_spec, parse_editor_specs
from ..implant import implant
from ..masks import ring
from ..plots import lines_with_ci, plt, save_figure
from ..project import resolve_device
from ..stats import group_estimates
from ..summaries import eps_sweep_curves


def pick_names(manifest: pd.DataFrame, per_content: int) -> list[str]:
    """The first ``per_content`` images of each content type (all with 0)."""
    if per_content <= 0:
        return list(manifest["name"])
    return list(manifest.groupby("content", sort=True).head(per_content)["name"])


def sweep_editor(
    editor,
    prepared_dir,
    eps_values,
    *,
    budget: Budget,
    names=None,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Protection against ``editor`` at ``budget`` with each ε in ``eps_values`` (fractions of
    the range) in turn.

    Per image and ε: the share of the protected region on target when it is edited
    (malicious), the PSNR of the ring edit of the protected image against the ring edit
    of the clean image (benign), and the PSNR of the protection itself.
    """
    df, x, m = load_prepared(prepared_dir, names)
    x, m = x.to(device), m.to(device)
    band = ring(m, budget.expand_kernel)
    with torch.no_grad():
        clean_ring = editor(x, band)
        clean_fill = editor(x, m)
    rows = []
    for eps in tqdm(list(eps_values), desc="ε sweep", disable=not progress):
        r = implant(editor, x, m, budget=budget.replace(eps=eps), progress=False)
        with torch.no_grad():
            fill = editor(r.protected, m)
            ring_edit = editor(r.protected, band)
        # float64: the hit fractions of the reference (metrics.target_hit_fraction), bit for bit
        phi, region_b = r.target.double(), m.double()
        fracs = Q.hit_fraction_batch(fill.double(), phi, region_b, hit_tol).tolist()
        cleans = Q.hit_fraction_batch(clean_fill.double(), phi, region_b, hit_tol).tolist()
        for i, name in enumerate(df["name"]):
            region = m[i, 0].cpu().numpy() > 0.5
            target = to_array(r.target[i])
            frac = fracs[i]
            rows.append(
                {
                    "eps": eps,
                    "eps_8bit": eps * 255,
                    "name": name,
                    "content": df["content"][i],
                    "hit_fraction": frac,
                    "hit": bool(frac >= hit_min_fraction),
                    "hit_fraction_clean": cleans[i],
                    "target_mse": Q.masked_mse(to_array(fill[i]), target, region),
                    "ring_psnr": Q.psnr(to_array(ring_edit[i]), to_array(clean_ring[i])),
                    "protection_psnr": Q.psnr(to_array(r.protected[i]), to_array(x[i])),
                }
            )
    return pd.DataFrame(rows)


def eps_sweep_plot(sweep: pd.DataFrame, paper_eps_8bit: float = Budget().eps_8bit):
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
        lines_with_ci(ax, t, "eps_8bit", column, "editor", order)
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


def run(
    reports_dir="reports",
    *,
    prepared_dir="data/prepared",
    editor_record="models/editor/editor.json",
    eps_8bit: str = "1,2,4,6.4,8,16,32",
    editors: str = PIPELINE,
    images_per_type: int = 0,
    seeds: int = 1,
    seeded: str = "",
    budget: Budget,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    device: str = "auto",
) -> dict:
    """The stage: ``eps_sweep.csv``, ``eps_sweep.json`` (flat summary) and the figure.

    ``editors``: specs (``pipeline`` = the editor stage's); the labels in ``seeded`` run over
    ``seeds`` δ₀ seeds (the chaotic toy), the others run ``budget.seed`` only, to bound the
    cost. ``budget``: the implant stage's, whose ε is swept; ``hit_tol``/``hit_min_fraction``:
    the evaluate stage's.
    """
    dev = resolve_device(device)
    budgets = [float(v) / 255 for v in str(eps_8bit).split(",")]
    pipeline_name = json.loads(Path(editor_record).read_text())["name"]
    built = {}
    for spec in parse_editor_specs(editors):
        label = pipeline_name if spec.label == PIPELINE else spec.label
        built[label] = build_from_spec(spec, editor_record, device=dev)
    names = pick_names(read_folder(prepared_dir), images_per_type)
    seeded_labels = str(seeded).split()
    parts = []
    for label, editor in built.items():
        for run_seed in range(budget.seed, budget.seed + (seeds if label in seeded_labels else 1)):
            part = sweep_editor(
                editor, prepared_dir, budgets, budget=budget.with_seed(run_seed), names=names,
                hit_tol=hit_tol, hit_min_fraction=hit_min_fraction, device=dev,
            )  # fmt: skip
            parts.append(part.assign(editor=label, seed=run_seed))
    sweep = pd.concat(parts, ignore_index=True)
    reports = Path(reports_dir)
    write_csv(reports / "eps_sweep.csv", sweep)
    write_csv(reports / "plots" / "eps_sweep.csv", eps_sweep_curves(sweep))  # `dvc plots`
    # Means over images (seeds averaged within an image first) with 95 % intervals.
    finite = sweep.replace(float("inf"), 100.0).assign(hit=sweep["hit"].astype(float))
    columns = ["hit", "hit_fraction", "ring_psnr", "protection_psnr"]
    table = group_estimates(finite, ["editor", "eps_8bit"], columns)
    table = table.rename(
        columns=lambda c: (
            c.replace("hit", "hit_rate", 1)
            if c.startswith("hit") and not c.startswith("hit_fraction")
            else c
        )
    )
    figure = save_figure(eps_sweep_plot(sweep), reports / "figures" / "eps_sweep.png")
    # Flat summary: the smallest budget at which at least 80 % of the images are hit, per editor.
    summary = {
        "n_images": len(names),
        **{f"{label}_seeds": seeds if label in seeded_labels else 1 for label in built},
    }
    for label, g in table.groupby("editor"):
        reached = g[g["hit_rate"] >= 0.8]["eps_8bit"]
        summary[f"{label}_min_eps_8bit_for_80pct_hits"] = (
            float(reached.min()) if len(reached) else None
        )
        paper = g.iloc[(g["eps_8bit"] - Budget().eps_8bit).abs().argsort()[:1]].iloc[0]
        for suffix in ("", "_low", "_high"):
            summary[f"{label}_hit_rate_at_paper_eps{suffix}"] = float(paper[f"hit_rate{suffix}"])
    write_json(reports / "eps_sweep.json", summary)
    return {"sweep": sweep, "table": table, "figure": figure, "summary": summary}
