"""Stage ``ensemble``: protect against editors you do not know — leave-one-editor-out.

For every editor E of a list: protect each image against E alone, against the ensemble of all
the others (E left out: the owner did not know E), and against the full ensemble; then edit the
protected image with E. Malicious: the protected region ``m`` (hit = at least
``hit_min_fraction`` of it within ``hit_tol`` of the target). Benign: the ring E(m) − m, PSNR
against the same edit of the clean image. Means over images with 95 % intervals; paired
comparisons per editor (``stats.compare``) give the conclusions.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import metrics as Q
from ..data import load_prepared, read_folder, to_array, write_csv, write_json
from ..editors.specs import build_from_spec, parse_editor_specs
from ..implant import implant
from ..masks import ring
from ..plots import interval_bars, plt, save_figure, sns
from ..project import resolve_device
from ..stats import compare, group_estimates

PROTECTIONS = ("alone", "without", "all")  #: against E alone, the others (E left out), all


def _edit_rows(editor, label, protection, x, m, protected, target, names, *, kernel, hit_tol,
               hit_min_fraction) -> list[dict]:  # fmt: skip
    band = ring(m, kernel)
    with torch.no_grad():
        fill = editor(protected, m)
        clean_fill = editor(x, m)
        ring_edit = editor(protected, band)
        clean_ring = editor(x, band)
    rows = []
    for i, name in enumerate(names):
        region = m[i, 0].cpu().numpy() > 0.5
        phi = to_array(target[i])
        frac = Q.target_hit_fraction(to_array(fill[i]), phi, region, tol=hit_tol)
        clean = Q.target_hit_fraction(to_array(clean_fill[i]), phi, region, tol=hit_tol)
        rows.append(
            {
                "editor": label, "protection": protection, "name": name,
                "hit_fraction": frac, "hit": bool(frac >= hit_min_fraction),
                "hit_clean": bool(clean >= hit_min_fraction),
                "ring_psnr": min(Q.psnr(to_array(ring_edit[i]), to_array(clean_ring[i])), 100.0),
                "protection_psnr": Q.psnr(to_array(protected[i]), to_array(x[i])),
            }
        )  # fmt: skip
    return rows


def measure(
    prepared_dir,
    editors: str,
    *,
    names=None,
    budget: dict,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    device="cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """One row per edited editor, protection (``alone``/``without``/``all``) and image."""
    specs = parse_editor_specs(editors)
    if len(specs) < 2:
        raise ValueError(f"ensemble.editors: give at least two editors, got {len(specs)}")
    built = {s.label: build_from_spec(s, device=device) for s in specs}
    df, x, m = load_prepared(prepared_dir, names)
    x, m = x.to(device), m.to(device)
    names = list(df["name"])
    kernel = int(budget["expand_kernel"])
    settings = {k: v for k, v in budget.items()} | {"progress": False}

    def protect(labels):
        return implant([built[k] for k in labels], x, m, **settings)

    runs = [("all", None, list(built))]
    for label in built:
        runs += [("alone", label, [label]), ("without", label, [k for k in built if k != label])]
    full = None
    rows = []
    for protection, edited, labels in tqdm(runs, desc="ensemble", disable=not progress):
        result = protect(labels)
        if protection == "all":
            full = result
            continue
        rows += _edit_rows(built[edited], edited, protection, x, m, result.protected,
                           result.target, names, kernel=kernel, hit_tol=hit_tol,
                           hit_min_fraction=hit_min_fraction)  # fmt: skip
    for label, editor in built.items():
        rows += _edit_rows(editor, label, "all", x, m, full.protected, full.target, names,
                           kernel=kernel, hit_tol=hit_tol,
                           hit_min_fraction=hit_min_fraction)  # fmt: skip
    return pd.DataFrame(rows)


def conclusions(per_image: pd.DataFrame) -> list[dict]:
    """Per edited editor: left out vs alone, and all vs alone (hit rate, benign ring PSNR)."""
    out = []
    for label, g in per_image.groupby("editor", sort=False):
        by = {p: g[g["protection"] == p].set_index("name").sort_index() for p in PROTECTIONS}
        for other in ("without", "all"):
            for column, metric, pct in (("hit", "hit rate", True), ("ring_psnr", "benign ring PSNR (dB)", False)):  # fmt: skip
                c = compare(
                    by[other][column].astype(float), by["alone"][column].astype(float),
                    label_a=f"protection {'without' if other == 'without' else 'against all editors incl.'} {label}",
                    label_b=f"protection against {label} alone", metric=f"{metric} when edited with {label}",
                )  # fmt: skip
                out.append(
                    {
                        "id": f"ensemble/{label}/{other}_vs_alone/{column}", "verdict": c.verdict,
                        "n": c.difference.n, "sentence": c.sentence(pct=pct),
                    }
                )  # fmt: skip
    return out


def summarize(table: pd.DataFrame, n_images: int) -> dict:
    """The flat ``metrics.json``: each editor and protection's rates with their intervals."""
    out: dict = {"n_images": n_images}
    for r in table.to_dict("records"):
        key = f"{r['editor']}_{r['protection']}".replace("-", "_")
        for column in ("hit", "ring_psnr"):
            for suffix in ("", "_low", "_high"):
                name = "hit_rate" if column == "hit" else column
                out[f"{key}_{name}{suffix}"] = float(r[f"{column}{suffix}"])
    return out


def figure(table: pd.DataFrame):
    """Hit rate and benign ring PSNR per edited editor and protection, with 95 % intervals."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, (column, label) in zip(
        axes, (("hit", "malicious: hit rate (edit of m)"), ("ring_psnr", "benign: ring PSNR vs clean edit (dB)")), strict=True
    ):  # fmt: skip
        sns.barplot(data=table, x="editor", y=column, hue="protection", hue_order=list(PROTECTIONS),
                    ax=ax, errorbar=None)  # fmt: skip
        interval_bars(ax, table, "editor", column, list(PROTECTIONS), hue="protection")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("edited with")
        ax.set_ylabel("")
    axes[0].set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def run(
    reports_dir="reports",
    *,
    prepared_dir="data/prepared",
    editors: str = "a:global-mix(gain:800,reach:8,seed:0) b:global-mix(gain:800,reach:8,seed:1)",
    images_per_type: int = 0,
    eps: float = 0.025,
    steps: int = 20,
    lr: float = 0.1,
    init_high: float = 0.01,
    expand_kernel: int = 5,
    target: str = "solid",
    seed: int = 0,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    device: str = "auto",
) -> dict:
    """The stage: ``reports_dir/ensemble/`` (per_image.csv, table.csv, conclusions.json,
    metrics.json, results.md) and ``reports_dir/figures/ensemble.png``."""
    manifest = read_folder(prepared_dir)
    names = (
        list(manifest.groupby("content").head(images_per_type)["name"]) if images_per_type else None
    )
    budget = {
        "eps": eps, "steps": steps, "lr": lr, "init_high": init_high,
        "expand_kernel": expand_kernel, "target": target, "seed": seed,
    }  # fmt: skip
    per_image = measure(prepared_dir, editors, names=names, budget=budget, hit_tol=hit_tol,
                        hit_min_fraction=hit_min_fraction, device=resolve_device(device))  # fmt: skip
    out = Path(reports_dir) / "ensemble"
    table = group_estimates(
        per_image.assign(hit=per_image["hit"].astype(float)), ["editor", "protection"],
        ["hit", "ring_psnr", "protection_psnr"],
    )  # fmt: skip
    found = conclusions(per_image)
    n = int(per_image["name"].nunique())
    write_csv(out / "per_image.csv", per_image)
    write_csv(out / "table.csv", table)
    write_json(out / "conclusions.json", found)
    write_json(out / "metrics.json", summarize(table, n))
    lines = [
        f"Leave-one-editor-out on {n} images (means with 95 % intervals over images): each row "
        "is the editor the image was edited with and what it was protected against.",
        "",
        "| edited with | protected against | hit rate (edit of m) | benign ring PSNR, dB | protection PSNR, dB |",
        "|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        against = {
            "alone": "it alone",
            "without": "the others (it left out)",
            "all": "all editors",
        }[r["protection"]]
        lines.append(
            f"| {r['editor']} | {against} | {r['hit']:.0%} [{r['hit_low']:.0%}, {r['hit_high']:.0%}] "
            f"| {r['ring_psnr']:.1f} [{r['ring_psnr_low']:.1f}, {r['ring_psnr_high']:.1f}] "
            f"| {r['protection_psnr']:.1f} |"
        )
    lines += ["", "What the numbers support (paired over images):", ""]
    lines += [f"- {c['sentence']}." for c in found]
    markdown = "\n".join(lines) + "\n"
    (out / "results.md").write_text(markdown)
    fig_path = save_figure(figure(table), Path(reports_dir) / "figures" / "ensemble.png")
    return {"per_image": per_image, "table": table, "conclusions": found, "markdown": markdown,
            "figure": fig_path}  # fmt: skip
