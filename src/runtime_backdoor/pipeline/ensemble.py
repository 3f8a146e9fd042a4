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
from ..budget import Budget
from ..data import load_prepared, read_folder, to_array, write_csv, write_json
from ..editors.specs import build_from_spec, parse_editor_specs
from ..implant import implant
from ..masks import ring
from ..plots import interval_bars, plt, save_figure, sns
from ..project import resolve_device
from ..stats import RATE, VALUE, Findings, compare, group_estimates, seed_spread
from ..summaries import write_headline

PROTECTIONS = ("alone", "without", "all")  #: against E alone, the others (E left out), all


def _edit_rows(editor, label, protection, x, m, protected, target, names, *, kernel, hit_tol,
               hit_min_fraction) -> list[dict]:  # fmt: skip
    band = ring(m, kernel)
    with torch.no_grad():
        fill = editor(protected, m)
        clean_fill = editor(x, m)
        ring_edit = editor(protected, band)
        clean_ring = editor(x, band)
    # float64: the hit fractions of the reference (metrics.target_hit_fraction), bit for bit
    phi, region = target.double(), m.double()
    fracs = Q.hit_fraction_batch(fill.double(), phi, region, hit_tol).tolist()
    cleans = Q.hit_fraction_batch(clean_fill.double(), phi, region, hit_tol).tolist()
    rows = []
    for i, name in enumerate(names):
        frac, clean = fracs[i], cleans[i]
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
    budget: Budget,
    seeds: int = 1,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    device="cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """One row per edited editor, protection (``alone``/``without``/``all``), δ₀ seed
    (``budget.seed`` + 0 … seeds − 1) and image."""
    specs = parse_editor_specs(editors)
    if len(specs) < 2:
        raise ValueError(f"ensemble.editors: give at least two editors, got {len(specs)}")
    built = {s.label: build_from_spec(s, device=device) for s in specs}
    df, x, m = load_prepared(prepared_dir, names)
    x, m = x.to(device), m.to(device)
    names = list(df["name"])
    kernel = int(budget.expand_kernel)

    runs = [("all", None, list(built))]
    for label in built:
        runs += [("alone", label, [label]), ("without", label, [k for k in built if k != label])]
    rows = []
    todo = [(s, *r) for s in range(budget.seed, budget.seed + int(seeds)) for r in runs]
    for seed, protection, edited, labels in tqdm(todo, desc="ensemble", disable=not progress):
        result = implant([built[k] for k in labels], x, m, budget=budget.with_seed(seed),
                         progress=False)  # fmt: skip
        for label in labels if protection == "all" else [edited]:
            rows += [
                r | {"seed": seed}
                for r in _edit_rows(
                    built[label],
                    label,
                    protection,
                    x,
                    m,
                    result.protected,
                    result.target,
                    names,
                    kernel=kernel,
                    hit_tol=hit_tol,
                    hit_min_fraction=hit_min_fraction,
                )  # fmt: skip
            ]
    order = {"alone": 0, "without": 1, "all": 2}
    df = pd.DataFrame(rows)
    return df.sort_values(["seed", "editor", "protection"], key=lambda c: c.map(order) if
                          c.name == "protection" else c, kind="stable").reset_index(drop=True)  # fmt: skip


def _per_image(g: pd.DataFrame, protection: str, column: str) -> pd.Series:
    """``column`` per image under ``protection``, averaged over δ₀ seeds (the share of seeds
    that hit, for ``hit``)."""
    d = g[g["protection"] == protection]
    return d.groupby("name")[column].mean().astype(float).sort_index()


def conclusions(per_image: pd.DataFrame) -> list[dict]:
    """Per edited editor E, over images (each image's outcome averaged over its δ₀ seeds):

    - family ``ensemble/left_out_fires``: protection without E against clean images, hit rate
      (does a protection that never saw E fire on E at all?);
    - family ``ensemble/<other>_vs_alone/<metric>``: left out (``without``) and ``all`` against
      E alone, hit rate (exact sign test) and benign ring PSNR (signed-rank test).
    Holm within each family (:class:`runtime_backdoor.stats.Findings`).
    """
    found = Findings()
    for label, g in per_image.groupby("editor", sort=False):
        without = _per_image(g, "without", "hit")
        clean = _per_image(g, "without", "hit_clean").loc[without.index]
        found.add(
            f"ensemble/{label}/without_vs_clean/hit", "ensemble/left_out_fires",
            compare(without, clean, label_a=f"protection without {label}",
                    label_b="clean images", metric=f"hit rate when edited with {label}", kind=RATE),
            pct=True,
        )  # fmt: skip
        alone = {c: _per_image(g, "alone", c) for c in ("hit", "ring_psnr")}
        for other in ("without", "all"):
            for column, metric, kind in (("hit", "hit rate", RATE),
                                         ("ring_psnr", "benign ring PSNR (dB)", VALUE)):  # fmt: skip
                a = _per_image(g, other, column)
                b = alone[column].loc[a.index]
                who = "without" if other == "without" else "against all editors incl."
                found.add(
                    f"ensemble/{label}/{other}_vs_alone/{column}",
                    f"ensemble/{other}_vs_alone/{column}",
                    compare(a, b, label_a=f"protection {who} {label}",
                            label_b=f"protection against {label} alone",
                            metric=f"{metric} when edited with {label}", kind=kind),
                    pct=kind == RATE,
                )  # fmt: skip
    return found.decide()


def _seed_key(group: tuple, seed) -> str:
    """The ``metrics.json`` key of an (editor, protection)'s hit rate under δ₀ ``seed``, or of
    its range over seeds (``seed=None``; :func:`runtime_backdoor.stats.seed_spread`)."""
    key = f"{group[0]}_{group[1]}".replace("-", "_")
    return f"{key}_hit_rate_seed_range" if seed is None else f"{key}_seed{seed}_hit_rate"


def summarize(table: pd.DataFrame, n_images: int) -> dict:
    """The flat ``metrics.json``: each editor and protection's rates with their intervals."""
    out: dict = {"n_images": n_images}
    for r in table.to_dict("records"):
        key = f"{r['editor']}_{r['protection']}".replace("-", "_")
        for column in ("hit", "hit_clean", "ring_psnr"):
            for suffix in ("", "_low", "_high"):
                name = {"hit": "hit_rate", "hit_clean": "clean_hit_rate"}.get(column, column)
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
    budget: Budget,
    seeds: int = 3,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    device: str = "auto",
) -> dict:
    """The stage: ``reports_dir/ensemble/`` (per_image.csv, table.csv, conclusions.json,
    metrics.json, results.md) and ``reports_dir/figures/ensemble.png``. Every protection is
    made with ``seeds`` δ₀ seeds; an image's outcome is averaged over them (the share of seeds
    that hit), and ``metrics.json`` gives each seed's hit rate."""
    if int(seeds) < 1:
        raise ValueError(f"seeds: at least 1, got {seeds}")
    manifest = read_folder(prepared_dir)
    names = (
        list(manifest.groupby("content").head(images_per_type)["name"]) if images_per_type else None
    )
    per_image = measure(prepared_dir, editors, names=names, budget=budget, seeds=seeds,
                        hit_tol=hit_tol, hit_min_fraction=hit_min_fraction,
                        device=resolve_device(device))  # fmt: skip
    out = Path(reports_dir) / "ensemble"
    table = group_estimates(
        per_image.assign(hit=per_image["hit"].astype(float),
                         hit_clean=per_image["hit_clean"].astype(float)),
        ["editor", "protection"], ["hit", "hit_clean", "ring_psnr", "protection_psnr"],
    )  # fmt: skip
    found = conclusions(per_image)
    n = int(per_image["name"].nunique())
    write_csv(out / "per_image.csv", per_image)
    write_csv(out / "table.csv", table)
    write_json(out / "conclusions.json", found)
    metrics = summarize(table, n) | seed_spread(
        per_image, ["editor", "protection"], "hit", _seed_key
    )
    write_json(out / "metrics.json", metrics)
    write_headline(out / "headline.json", metrics, "ensemble")  # what `dvc metrics show` shows
    lines = [
        f"Leave-one-editor-out on {n} images, {int(seeds)} δ₀ seeds (means with 95 % intervals "
        "over images, each image averaged over its seeds): each row is the editor the image was "
        "edited with and what it was protected against; `clean` is the same editor's hit rate "
        "on the unprotected images.",
        "",
        "| edited with | protected against | hit rate (edit of m) | clean | benign ring PSNR, dB | protection PSNR, dB |",
        "|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        against = {
            "alone": "it alone",
            "without": "the others (it left out)",
            "all": "all editors",
        }[r["protection"]]
        lines.append(
            f"| {r['editor']} | {against} | {r['hit']:.0%} [{r['hit_low']:.0%}, {r['hit_high']:.0%}] "
            f"| {r['hit_clean']:.0%} "
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
