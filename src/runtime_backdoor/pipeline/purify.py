"""Stage ``purify``: does the protection survive purification before the edit?

The attacker cleans the protected image ``x'`` with a purifier ``p``
(:mod:`runtime_backdoor.purifiers`) and then edits ``p(x')``. For every editor protected
against — the pipeline's editor with the implant stage's images (``data/protected``), and the
editors of ``editors`` protected here at the implant stage's budget with one δ₀ seed each —
and every purifier, per image:

- the malicious edit (``mask``: the protected region) and the benign edit (``ring``: the ring
  around it) of ``p(x')``, against the same edits of the clean image ``x`` and of ``p(x)``;
- the hit (the share of the region within ``hit_tol`` of the target reaches
  ``hit_min_fraction``) and the fill-to-target distance (MSE over the region), PSNR and SSIM
  of the edit against the clean image's edit (mapped into the purified frame: only ``crop``
  moves the content) and against ``p(x)``'s edit, and the purified image's PSNR against
  ``x'``. PSNR is capped at 100 dB (identical images).

**Worst case** (BlurGuard's convention): per image, the attacker's best purifier for each
metric — the lowest hit and hit fraction, the largest distance to the target, the highest
PSNR/SSIM against the clean edit — over no purification and the classical purifiers
(``worst:classical``) and, when any diffusion purifier ran, over all of them (``worst:all``);
then the mean over images with 95 % intervals (:mod:`runtime_backdoor.stats`). Not purifying
is one of the attacker's options, as in BlurGuard's per-image worst case.

Diffusion purifiers run only where their weights are (``runtime-backdoor weights fetch
NAME``); otherwise their rows say ``unavailable: weights (...)``. The optional adaptive
defence (``adaptive``: editors whose backdoor is also optimised with expectation over the
classical purifiers, :class:`runtime_backdoor.eot.EOTEditor` drawing one per image) adds the
method ``backdoor_adaptive`` for those editors.

Outputs: ``reports/purification/`` (``per_edit.csv``, ``table.csv``, ``conclusions.json``,
``results.md``, ``metrics.json``) and ``reports/figures/purification.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import purifiers as P
from ..baselines import protect
from ..budget import Budget
from ..data import load_prepared, read_image, to_tensor, write_csv, write_json
from ..editors.specs import PIPELINE, build_from_spec, parse_editor_specs
from ..eot import EOTEditor
from ..implant import implant
from ..masks import ring
from ..metrics import hit_fraction_batch, psnr_batch, ssim_batch
from ..plots import interval_bars, plt, save_figure, sns
from ..project import resolve_device
from ..reporting import metric_key
from ..robustness import to_8bit
from ..stats import RATE, Estimate, Findings, compare, group_estimates
from ..targets import make_target

SCENARIOS = ("mask", "ring")
PSNR_CAP = 100.0
#: per-image columns, and the attacker's best over purifiers (min or max) for the worst case
WORST = {
    "hit_protected": "min",
    "hit_fraction_protected": "min",
    "target_mse_protected": "max",
    "psnr_vs_clean_edit": "max",
    "ssim_vs_clean_edit": "max",
    "psnr_vs_purified_clean_edit": "max",
}
#: columns of the table (means over images with 95 % intervals)
COLUMNS = [
    "hit_protected",
    "hit_fraction_protected",
    "hit_purified_clean",
    "hit_clean",
    "target_mse_protected",
    "psnr_vs_clean_edit",
    "ssim_vs_clean_edit",
    "psnr_vs_purified_clean_edit",
    "purified_psnr",
]


# ------------------------------------------------------------------------------- measures


def _region_mse(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2 * region).flatten(1).sum(1) / (3 * region.flatten(1).sum(1).clamp_min(1))


def _edit(editor, images: torch.Tensor, masks: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        out = [
            editor(images[i : i + batch_size], masks[i : i + batch_size])
            for i in range(0, images.shape[0], batch_size)
        ]
    return to_8bit(torch.cat(out))


def _purify(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
        )


def evaluate_editor(
    editor,
    x: torch.Tensor,
    m: torch.Tensor,
    protected: torch.Tensor,
    target: torch.Tensor,
    purifiers: dict,
    *,
    names: list[str],
    kernel: int = 5,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    batch_size: int = 12,
    purified_clean: dict | None = None,
    clean_edits: dict | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per image, purifier and scenario (``mask``, ``ring``) for one editor.

    ``purifiers``: name -> (:class:`~runtime_backdoor.purifiers.PurifierSpec`, function).
    ``purified_clean``: a dict the caller keeps, so that ``p(x)`` (the same for every editor)
    is computed once per purifier; ``clean_edits``: one the caller keeps per editor, so that the
    edits of ``x`` and ``p(x)`` are computed once for every method protecting against it.
    """
    regions = {"mask": m, "ring": ring(m, kernel)}
    cache = purified_clean if purified_clean is not None else {}
    edits_of = clean_edits if clean_edits is not None else {}
    for s, r in regions.items():
        if ("clean", s) not in edits_of:
            edits_of[("clean", s)] = _edit(editor, x, r, batch_size)
    rows = []
    for name, (spec, fn) in tqdm(purifiers.items(), desc="purifiers", disable=not progress):
        if name not in cache:
            cache[name] = _purify(fn, x, batch_size)
        px = cache[name]
        pp = _purify(fn, protected, batch_size)
        purified_psnr = psnr_batch(pp, protected, cap=PSNR_CAP)
        purified_clean_psnr = psnr_batch(px, x, cap=PSNR_CAP)
        phi = spec.frame(target)
        for scenario, region in regions.items():
            r = spec.frame(region, mask=True)
            if (name, scenario) not in edits_of:
                edits_of[(name, scenario)] = _edit(editor, px, r, batch_size)
            edit_pc, edit_pp = edits_of[(name, scenario)], _edit(editor, pp, r, batch_size)
            clean_edit = edits_of[("clean", scenario)]
            reference = spec.frame(clean_edit)
            frac_p = hit_fraction_batch(edit_pp, phi, r, hit_tol)
            frac_pc = hit_fraction_batch(edit_pc, phi, r, hit_tol)
            frac_c = hit_fraction_batch(clean_edit, target, region, hit_tol)
            columns = {
                "hit_fraction_protected": frac_p,
                "hit_protected": frac_p >= hit_min_fraction,
                "hit_fraction_purified_clean": frac_pc,
                "hit_purified_clean": frac_pc >= hit_min_fraction,
                "hit_fraction_clean": frac_c,
                "hit_clean": frac_c >= hit_min_fraction,
                "target_mse_protected": _region_mse(edit_pp, phi, r),
                "psnr_vs_clean_edit": psnr_batch(edit_pp, reference, cap=PSNR_CAP),
                "ssim_vs_clean_edit": ssim_batch(edit_pp, reference),
                "psnr_vs_purified_clean_edit": psnr_batch(edit_pp, edit_pc, cap=PSNR_CAP),
                "ssim_vs_purified_clean_edit": ssim_batch(edit_pp, edit_pc),
                "purified_psnr": purified_psnr,
                "purified_clean_psnr": purified_clean_psnr,
                "region_pixels": r.flatten(1).sum(1),
            }
            values = {k: v.detach().cpu().numpy() for k, v in columns.items()}
            for i, image in enumerate(names):
                row = {
                    "name": image,
                    "purifier": name,
                    "family": "reference" if spec.kind == "none" else spec.family,
                    "scenario": scenario,
                }
                for k, v in values.items():
                    row[k] = bool(v[i]) if v.dtype == bool else float(v[i])
                rows.append(row)
    return pd.DataFrame(rows)


def worst_case(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Per image (and δ₀ seed), method, editor and scenario, the attacker's best option for each
    metric (:data:`WORST`), BlurGuard's rule: ``worst:classical`` over no purification and the
    classical purifiers and, when a diffusion purifier ran, ``worst:all`` over all of them."""
    keys = [k for k in ("editor", "method", "seed", "name", "content", "scenario") if k in per_edit]
    # BlurGuard's rule: not purifying at all is one of the attacker's options.
    unpurified = per_edit["purifier"] == "none"
    groups = [("worst:classical", unpurified | (per_edit["family"] == "classical"))]
    if (per_edit["family"] == "diffusion").any():
        groups.append(
            ("worst:all", unpurified | per_edit["family"].isin(["classical", "diffusion"]))
        )
    frames = []
    for label, select in groups:
        d = per_edit[select].assign(hit_protected=per_edit["hit_protected"].astype(float))
        if not len(d):
            continue
        w = d.groupby(keys, sort=False).agg(WORST).reset_index()
        w["hit_protected"] = w["hit_protected"].astype(bool)
        clean = d.groupby(keys, sort=False)[["hit_clean", "hit_fraction_clean"]].first()
        w = w.merge(clean.reset_index(), on=keys)
        frames.append(w.assign(purifier=label, family="worst"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summary_table(rows: pd.DataFrame, status: pd.DataFrame | None = None) -> pd.DataFrame:
    """Means over images with 95 % intervals per editor, method, purifier and scenario;
    purifiers that could not run get one row each with their ``status``."""
    d = rows.assign(**{c: rows[c].astype(float) for c in COLUMNS if c in rows})
    present = [c for c in COLUMNS if c in d]
    t = group_estimates(d, ["editor", "method", "scenario", "purifier", "family"], present)
    t.insert(5, "status", "ok")
    if status is not None and len(status):
        missing = status[status["status"] != "ok"]
        extra = [
            {"editor": e, "method": meth, "scenario": s, "purifier": r["purifier"],
             "family": "diffusion", "status": r["status"], "n_images": 0}
            for (e, meth) in dict.fromkeys(zip(t["editor"], t["method"], strict=True))
            for s in SCENARIOS
            for _, r in missing.iterrows()
        ]  # fmt: skip
        t = pd.concat([t, pd.DataFrame(extra)], ignore_index=True)
    return t


# ------------------------------------------------------------------------------- conclusions


def _paired(d: pd.DataFrame, column: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``column`` under purifiers ``a`` and ``b``, on the images both have."""
    wide = d.pivot_table(index="name", columns="purifier", values=column, aggfunc="mean")
    if a not in wide or b not in wide:
        return np.array([]), np.array([])
    both = wide[[a, b]].dropna()
    return both[a].to_numpy(dtype=float), both[b].to_numpy(dtype=float)


def _image_means(d: pd.DataFrame, purifier: str) -> pd.DataFrame:
    """The hit columns under ``purifier`` per image, averaged over δ₀ seeds (sorted by name)."""
    cols = ["hit_protected", "hit_clean", "hit_purified_clean"]
    return d[d["purifier"] == purifier].groupby("name")[cols].mean().sort_index()


def _said(purifier: str, before: bool = True) -> str:
    """A purifier as the conclusions name it."""
    if purifier == "worst:classical":
        return "the worst classical purifier (per image)"
    if purifier == "worst:all":
        return "the worst purifier (per image)"
    return f"{purifier} before editing" if before else purifier


def conclusions(rows: pd.DataFrame) -> list[dict]:
    """The comparisons the stage may state, each an exact sign test over images
    (:func:`runtime_backdoor.stats.compare`), decided within its family by Holm's adjustment.

    Per editor and method, on the malicious edit (``mask``): does the backdoor fire without
    purification (protected vs clean images); for every purifier and worst case, is the hit rate
    lower than without purification, and does it still fire (protected vs clean images, both
    purified). The worst case is an oracle attacker's, who picks per image: its hit rate is at
    most the lowest purifier's. With the adaptive defence: its worst-case hit rate against the
    plain backdoor's. The random baseline (uniform noise within ±ε): does it fire, and does the
    backdoor hit more often than it. Each image's outcome is the share of its δ₀ seeds that hit;
    exact sign tests, Holm within each family (``purify/fires``, ``purify/lowers``,
    ``purify/still_fires``, ``purify/vs_random``, ``purify/adaptive``).
    Distances and fidelities are in the table, not stated as conclusions:
    a per-image extreme over purifiers differs from no purification by selection alone.
    Returns ``id``, ``verdict``, ``n``, ``sentence`` and ``no_hits`` per comparison.
    """
    found = Findings()

    def add(cid, family, a, b, label_a, label_b, metric):
        if not len(a):
            return
        c = compare(a, b, label_a=label_a, label_b=label_b, metric=metric, kind=RATE)
        found.add(cid, family, c, pct=True, no_hits=bool(not np.any(a) and not np.any(b)))

    mal = rows[rows["scenario"] == "mask"].assign(
        hit_protected=lambda d: d["hit_protected"].astype(float),
        hit_clean=lambda d: d["hit_clean"].astype(float),
        hit_purified_clean=lambda d: d["hit_purified_clean"].astype(float),
    )
    for (editor, method), d in mal.groupby(["editor", "method"], sort=False):
        who = editor if method == "backdoor" else f"{editor}, {method}"
        metric = f"the malicious hit rate ({who}; purify stage, edit of m)"
        none = _image_means(d, "none")
        if len(none):
            add(f"{editor}/{method}/fires", "purify/fires", none["hit_protected"].to_numpy(),
                none["hit_clean"].to_numpy(), "protected images", "clean images", metric)  # fmt: skip
        if method == "random":
            continue  # the baseline: whether it fires at all, and against the backdoor (below)
        for purifier in dict.fromkeys(d.loc[d["purifier"] != "none", "purifier"]):
            worst = purifier.startswith("worst")
            a, b = _paired(d, "hit_protected", purifier, "none")
            add(f"{editor}/{method}/{purifier}/vs_none", "purify/lowers", a, b, _said(purifier),
                "no purification", metric)  # fmt: skip
            p = _image_means(d, purifier)
            add(f"{editor}/{method}/{purifier}/fires", "purify/still_fires",
                p["hit_protected"].to_numpy(),
                p["hit_clean" if worst else "hit_purified_clean"].to_numpy(),
                f"protected images after {_said(purifier, False)}",
                "clean images" if worst else f"clean images after {purifier}", metric)  # fmt: skip
    plain = mal[mal["purifier"] == "none"]
    for editor in dict.fromkeys(plain.loc[plain["method"] == "random", "editor"]):
        d = plain[plain["editor"] == editor]
        wide = d.pivot_table(index="name", columns="method", values="hit_protected")
        if {"backdoor", "random"} <= set(wide):
            both = wide[["backdoor", "random"]].dropna()
            add(f"{editor}/backdoor/vs_random", "purify/vs_random", both["backdoor"].to_numpy(),
                both["random"].to_numpy(), "the backdoor", "random noise at the same budget",
                f"the malicious hit rate ({editor}, no purification)")  # fmt: skip
    if "backdoor_adaptive" in set(mal["method"]):
        for editor in dict.fromkeys(mal.loc[mal["method"] == "backdoor_adaptive", "editor"]):
            d = mal[(mal["editor"] == editor) & (mal["purifier"] == "worst:classical")]
            wide = d.pivot_table(index="name", columns="method", values="hit_protected")
            if {"backdoor", "backdoor_adaptive"} <= set(wide):
                both = wide[["backdoor_adaptive", "backdoor"]].dropna()
                add(f"{editor}/adaptive/worst:classical", "purify/adaptive",
                    both["backdoor_adaptive"].to_numpy(), both["backdoor"].to_numpy(), "the adaptive backdoor", "the plain backdoor",
                    f"the worst-case malicious hit rate ({editor})")  # fmt: skip
    return found.decide()


# ------------------------------------------------------------------------------- reports


def _ci(r: pd.Series, col: str, pct: bool = False) -> str:
    if r.get("status", "ok") != "ok":
        return "–"
    e = Estimate(float(r[col]), float(r[f"{col}_low"]), float(r[f"{col}_high"]), int(r["n_images"]))
    return e.format(pct=pct)


def markdown(table: pd.DataFrame, found: list[dict], settings: dict) -> str:
    """``results.md``: settings, the table per editor, the conclusions."""
    lines = [
        "# Purification before editing",
        "",
        "The attacker purifies the protected image, then edits it. Malicious edit: the protected "
        "region (`mask`); benign edit: the ring around it (`ring`). Hit: at least "
        f"{settings['hit_min_fraction']:.0%} of the region within {settings['hit_tol']} of the "
        "target in every channel. Means over images with 95 % intervals. **Worst case** "
        "(BlurGuard's convention): per image, the attacker's best purifier for each metric "
        "(lowest hit, highest PSNR/SSIM against the clean image's edit), then the mean over "
        "images; `none` is the reference and not part of it.",
        "",
        f"Images: {settings['n_images']}; budget ε = {settings['eps'] * 255:.1f}/255, "
        f"{settings['steps']} steps, δ₀ seed {settings['seed']}; editors: "
        f"{', '.join(settings['editors'])}; purifiers: {', '.join(settings['purifiers'])}.",
        "",
    ]
    header = (
        "| purifier | malicious hit rate | hit rate on p(clean) | fill-to-target MSE | "
        "malicious PSNR vs clean edit (dB) | benign ring PSNR vs clean edit (dB) | "
        "purified PSNR vs protected (dB) |"
    )
    for (editor, method), g in table.groupby(["editor", "method"], sort=False):
        lines += [f"## {editor}" + ("" if method == "backdoor" else f" ({method})"), ""]
        lines += [header, "|" + "---|" * 7]
        for purifier in dict.fromkeys(g["purifier"]):
            mal = g[(g["purifier"] == purifier) & (g["scenario"] == "mask")].iloc[0]
            ben = g[(g["purifier"] == purifier) & (g["scenario"] == "ring")].iloc[0]
            if mal["status"] != "ok":
                lines.append(f"| {purifier} | {mal['status']} | | | | | |")
                continue
            worst = purifier.startswith("worst")
            lines.append(
                f"| {'**' + purifier + '**' if worst else purifier} "
                f"| {_ci(mal, 'hit_protected', True)} "
                f"| {'–' if worst else _ci(mal, 'hit_purified_clean', True)} "
                f"| {_ci(mal, 'target_mse_protected')} | {_ci(mal, 'psnr_vs_clean_edit')} "
                f"| {_ci(ben, 'psnr_vs_clean_edit')} "
                f"| {'–' if worst or purifier == 'none' else _ci(mal, 'purified_psnr')} |"
            )
        lines.append("")
    directional = [c for c in found if c["verdict"] != "no difference"]
    lines += ["## Conclusions", ""]
    lines += [f"- {c['sentence']}" for c in directional] or ["- none with a direction"]
    rest = len(found) - len(directional)
    lines += [
        "",
        f"{rest} further comparisons showed no detectable difference (all in `conclusions.json`).",
        "",
    ]
    return "\n".join(lines)


def summarize(table: pd.DataFrame, status: pd.DataFrame, n_images: int) -> dict:
    """The flat ``metrics.json``: per editor, method, purifier and scenario the hit rate and
    the PSNR against the clean edit with their intervals; each diffusion purifier's availability."""
    out: dict = {"n_images": int(n_images)}
    for _, r in table[table["status"] == "ok"].iterrows():
        where = [r["editor"]] + ([] if r["method"] == "backdoor" else [r["method"]])
        where += [r["purifier"], r["scenario"]]
        for col, name in (
            ("hit_protected", "hit_rate"),
            ("psnr_vs_clean_edit", "psnr_vs_clean_edit"),
        ):
            for suffix in ("", "_low", "_high"):
                out[metric_key(*where, name) + suffix] = float(r[col + suffix])
    for _, r in status.iterrows():
        out[metric_key(r["purifier"], "available")] = r["status"] == "ok"
    return out


def purification_plot(table: pd.DataFrame):
    """Malicious hit rate (top) and benign ring PSNR against the clean edit (bottom) per
    purifier and editor, the worst cases last (right of the dashed line), with 95 % intervals."""
    t = table[(table["status"] == "ok")].copy()
    t["label"] = [
        e if m == "backdoor" else f"{e} ({m})"
        for e, m in zip(t["editor"], t["method"], strict=True)
    ]
    order = list(dict.fromkeys(t["purifier"]))
    order = [p for p in order if not p.startswith("worst")] + [
        p for p in order if p.startswith("worst")
    ]
    hue_order = list(dict.fromkeys(t["label"]))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(order) + 2), 7.5))
    plain = sum(not p.startswith("worst") for p in order)
    for ax, (scenario, col, label, ylim) in zip(
        axes,
        (("mask", "hit_protected", "malicious (mask): share of images hit", (0, 1.02)),
         ("ring", "psnr_vs_clean_edit", "benign (ring): PSNR vs clean edit (dB)", None)),
        strict=True,
    ):  # fmt: skip
        d = t[t["scenario"] == scenario]
        sns.barplot(data=d, x="purifier", y=col, hue="label", order=order, hue_order=hue_order,
                    ax=ax, errorbar=None)  # fmt: skip
        interval_bars(ax, d, "purifier", col, hue_order, hue="label")
        if ylim:
            ax.set_ylim(*ylim)
        if plain < len(order):  # the worst cases, right of the line
            ax.axvline(plain - 0.5, color="grey", ls="--", lw=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=35, labelsize=8)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(labels),
               fontsize=8, frameon=False)  # fmt: skip
    return fig


# ------------------------------------------------------------------------------- the stage


def seed_spread(per_edit: pd.DataFrame) -> dict:
    """Per editor and method run over several δ₀ seeds, the malicious hit rate without
    purification of each seed, and their range (``..._seed_range``): how much one seed moves it."""
    d = per_edit[(per_edit["purifier"] == "none") & (per_edit["scenario"] == "mask")]
    out: dict = {}
    for (editor, method), g in d.groupby(["editor", "method"], sort=False):
        rates = g.groupby("seed")["hit_protected"].mean().astype(float)
        if len(rates) < 2:
            continue
        for s, rate in rates.items():
            out[metric_key(editor, method, f"seed{s}", "mask_hit_rate")] = float(rate)
        out[metric_key(editor, method, "mask_hit_rate_seed_range")] = float(
            rates.max() - rates.min()
        )
    return out


def load_models(specs, device) -> tuple[dict, pd.DataFrame]:
    """The diffusion pipelines whose weights are here, and one status row per diffusion purifier."""
    models, rows, status = {}, [], {}
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    for spec in specs:
        if spec.weights not in status:
            ok, line = P.weights_status(spec.weights)
            if ok:
                try:
                    models[spec.weights] = P.LOADERS[spec.weights](device=device, dtype=dtype)
                except (OSError, ValueError) as err:  # a folder that is there but does not load
                    ok, line = False, f"unavailable: {str(err).splitlines()[0][:150]}"
            status[spec.weights] = line
        rows.append(
            {"purifier": spec.name, "weights": spec.weights, "status": status[spec.weights]}
        )
    return models, pd.DataFrame(rows, columns=["purifier", "weights", "status"])


def run(
    reports_dir="reports",
    *,
    prepared_dir="data/prepared",
    protected_dir="data/protected",
    editor_record="models/editor/editor.json",
    editors: str = "pipeline blur-fill control:global-mix(gain:800,reach:8)",
    purifiers: str = " ".join(P.CLASSICAL),
    diffusion: str = " ".join(P.DIFFUSION),
    adaptive: str = "control",
    baselines: str = "random",
    seeds: int = 3,
    budget: Budget,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    batch_size: int = 18,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """The stage. ``editors``: specs (``pipeline`` = the editor stage's, protected by the implant
    stage; the others are protected here at ``budget``, the implant stage's, whose seed also
    seeds the noise purifiers). ``purifiers``: the classical suite;
    ``diffusion``: the diffusion purifiers (run where their weights are); ``adaptive``: labels
    of editors also protected with expectation over the classical purifiers ("" = none);
    ``baselines``: protections of :mod:`runtime_backdoor.baselines` run beside the backdoor
    against every editor (``random``: uniform noise within ±ε). ``seeds``: δ₀ seeds
    (``budget.seed`` + 0 … seeds − 1) of every protection made here; the pipeline editor's
    images come from the implant stage (``budget.seed`` only). Rows carry their ``seed``.
    Returns the tables, the conclusions, the figure path and the wall time.
    """
    if int(seeds) < 1:
        raise ValueError(f"seeds: at least 1, got {seeds}")
    extra = str(baselines).split()
    if set(extra) - {"random"}:
        raise ValueError(f"baselines: only 'random' runs here, got {baselines!r}")
    start = time.perf_counter()
    seed, expand_kernel = budget.seed, budget.expand_kernel
    dev = resolve_device(device)
    classical = P.parse_purifiers(purifiers)
    if any(s.family != "classical" for s in classical):
        raise ValueError(
            f"purifiers: classical ones only (diffusion ones go in `diffusion`): {purifiers}"
        )
    wanted = P.parse_purifiers(diffusion)
    if any(s.family != "diffusion" for s in wanted):
        raise ValueError(f"diffusion: diffusion purifiers only, got {diffusion}")
    models, status = load_models(wanted, dev)
    chosen = [P.parse_purifier("none"), *classical] + [s for s in wanted if s.weights in models]
    functions = {s.name: (s, P.build_purifier(s, seed=seed, models=models)) for s in chosen}

    df, x, m = load_prepared(prepared_dir)
    names = list(df["name"])
    x, m = x.to(dev), m.to(dev)
    specs = parse_editor_specs(editors)
    adaptive_labels = str(adaptive).split()
    pipeline_name = json.loads(Path(editor_record).read_text())["name"]
    labels = {s.label: (pipeline_name if s.name == PIPELINE else s.label) for s in specs}
    unknown = set(adaptive_labels) - set(labels)
    if unknown:
        raise ValueError(f"adaptive: {sorted(unknown)} are not editor labels of {editors!r}")
    cache: dict = {}
    frames, protection = [], []
    for spec in specs:
        editor = build_from_spec(spec, editor_record, device=dev)
        label = labels[spec.label]
        edits_of: dict = {}  # this editor's edits of x and p(x), shared by its methods and seeds
        methods = {}  # (method, seed) -> (protected, target, seconds)
        own_seeds = [seed] if spec.name == PIPELINE else [seed + k for k in range(int(seeds))]
        if spec.name == PIPELINE:
            protected = torch.cat(
                [to_tensor(read_image(Path(protected_dir) / f"{n}.png")) for n in names]
            ).to(dev)
            methods["backdoor", seed] = (protected, make_target(x, budget.target), float("nan"))
        for s in own_seeds:
            run_budget = budget.with_seed(s)
            if spec.name != PIPELINE:
                t0 = time.perf_counter()
                r = _implant_batches(editor, x, m, batch_size, run_budget)
                methods["backdoor", s] = (*r, time.perf_counter() - t0)
            if spec.label in adaptive_labels:
                t0 = time.perf_counter()
                eot = EOTEditor(
                    editor, [c.name for c in classical], pick="one", jpeg_grad="kornia", seed=s
                )
                r = _implant_batches(eot, x, m, batch_size, run_budget)
                methods["backdoor_adaptive", s] = (*r, time.perf_counter() - t0)
            for name in extra:
                t0 = time.perf_counter()
                r = protect(name, editor, x, m, budget=run_budget, progress=False)
                methods[name, s] = (r.protected, r.target, time.perf_counter() - t0)
        for (method, s), (protected, phi, seconds) in methods.items():
            rows = evaluate_editor(
                editor, x, m, protected, phi, functions, names=names, kernel=expand_kernel,
                hit_tol=hit_tol, hit_min_fraction=hit_min_fraction, batch_size=batch_size,
                purified_clean=cache, clean_edits=edits_of, progress=progress,
            )  # fmt: skip
            frames.append(rows.assign(editor=label, method=method, seed=s))
            protection.append(
                {"editor": label, "method": method, "seed": s, "seconds": seconds,
                 "linf_8bit": float((protected - x).abs().max() * 255)}
            )  # fmt: skip
    per_edit = pd.concat(frames, ignore_index=True)
    per_edit["content"] = per_edit["name"].map(dict(zip(df["name"], df["content"], strict=True)))
    first = ["editor", "method", "seed", "name", "content", "purifier", "family", "scenario"]
    per_edit = per_edit[first + [c for c in per_edit.columns if c not in first]]
    rows = pd.concat([per_edit, worst_case(per_edit)], ignore_index=True)
    table = summary_table(rows, status)
    found = conclusions(rows)

    reports = Path(reports_dir)
    out = reports / "purification"
    write_csv(out / "per_edit.csv", per_edit)
    write_csv(out / "table.csv", table)
    write_json(out / "conclusions.json", found)
    settings = {
        "n_images": len(names), "eps": budget.eps, "steps": budget.steps, "seed": seed,
        "seeds": int(seeds), "hit_tol": hit_tol,
        "hit_min_fraction": hit_min_fraction, "editors": list(labels.values()),
        "purifiers": [s.name for s in classical] + [s.name for s in wanted],
    }  # fmt: skip
    text = markdown(table, found, settings)
    (out / "results.md").write_text(text)
    metrics = summarize(table, status, len(names)) | seed_spread(per_edit)
    write_json(out / "metrics.json", metrics)
    figure = save_figure(purification_plot(table), reports / "figures" / "purification.png")
    return {
        "table": table,
        "per_edit": per_edit,
        "status": status,
        "protection": pd.DataFrame(protection),
        "conclusions": found,
        "markdown": text,
        "metrics": metrics,
        "figure": figure,
        "seconds": time.perf_counter() - start,
    }


def _implant_batches(editor, x, m, batch_size: int, budget: Budget):
    protected, targets = [], []
    for i in range(0, x.shape[0], batch_size):
        r = implant(
            editor, x[i : i + batch_size], m[i : i + batch_size], budget=budget, progress=False
        )
        protected.append(r.protected)
        targets.append(r.target)
    return torch.cat(protected), torch.cat(targets)


__all__ = [
    "COLUMNS",
    "SCENARIOS",
    "WORST",
    "conclusions",
    "evaluate_editor",
    "markdown",
    "purification_plot",
    "run",
    "seed_spread",
    "summarize",
    "summary_table",
    "worst_case",
]
