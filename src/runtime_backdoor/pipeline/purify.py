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
``results.md``, ``metrics.json``) and ``reports/figures/purification.png``; the conclusions,
the reports and the figure are built by :mod:`runtime_backdoor.purification_report`.
:func:`evaluate_editor` is a little over 80 lines: its one table row per image, purifier and
scenario is built in one place so that every column comes from the same edits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import purifiers as P
from .. import transforms as T
from ..baselines import protect
from ..budget import Budget
from ..data import load_prepared, read_image, to_tensor, write_csv, write_json
from ..editors.specs import PIPELINE, build_from_spec, parse_editor_specs
from ..eot import EOTEditor
from ..implant import implant
from ..masks import ring
from ..metrics import hit_fraction_batch, psnr_batch, reduce_ssim, ssim_map, ssim_reference
from ..plots import save_figure
from ..project import resolve_device
from ..purification_report import (
    conclusions,
    markdown,
    purification_plot,
    summarize,
    unpurified_seed_spread,
)
from ..robustness import to_8bit
from ..stats import group_estimates
from ..summaries import purification_worst_case, write_headline
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
    edits of ``x`` and ``p(x)`` (and their SSIM references, about 0.7 GB for 18 images at 128 px
    and 8 purifiers) are computed once for every method protecting against it.
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
            if ("ssim", name, scenario) not in edits_of:  # the same for every protection
                edits_of[("ssim", name, scenario)] = (
                    ssim_reference(reference),
                    ssim_reference(edit_pc),
                )
            ssim_clean, ssim_purified_clean = edits_of[("ssim", name, scenario)]
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
                "ssim_vs_clean_edit": reduce_ssim(ssim_map(edit_pp, reference=ssim_clean)),
                "psnr_vs_purified_clean_edit": psnr_batch(edit_pp, edit_pc, cap=PSNR_CAP),
                "ssim_vs_purified_clean_edit": reduce_ssim(
                    ssim_map(edit_pp, reference=ssim_purified_clean)
                ),
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


def worst_case_over_draws(per_edit: pd.DataFrame, draw: str = "draw") -> pd.DataFrame:
    """:func:`worst_case` when the stochastic (diffusion) purifiers ran N times each: per image
    (and δ₀ seed), method, editor and scenario, the attacker's best for each metric over no
    purification, every classical purifier and every one of the N draws of every diffusion
    purifier (rows of one purifier told apart by the column ``draw``: 0 … N − 1, the draw
    ``k`` being the purifier built with ``seed + k``; deterministic purifiers have one row and
    ``draw`` empty). Labels as :func:`worst_case`; the column ``draws`` holds N (1 without a
    ``draw`` column, or when no diffusion purifier ran).

    ``ValueError`` when a diffusion purifier's draws are not 0 … N − 1 with the same N for
    every purifier and image, or a classical purifier has more than one row per image."""
    keys = [k for k in ("editor", "method", "seed", "name", "content", "scenario") if k in per_edit]
    stochastic = per_edit["family"] == "diffusion"
    n = 1
    if draw in per_edit and stochastic.any():
        d = per_edit[stochastic]
        if d[draw].isna().any():
            raise ValueError(f"every diffusion row needs its {draw!r} number")
        sets = d.groupby([*keys, "purifier"], sort=False)[draw].agg(lambda v: tuple(sorted(v)))
        n = len(sets.iloc[0])
        if any(t != tuple(range(n)) for t in sets):
            raise ValueError(f"diffusion draws must be 0 … N-1 with one N for all, got {set(sets)}")
    fixed = per_edit[~stochastic].groupby([*keys, "purifier"], sort=False).size()
    if (fixed > 1).any():
        raise ValueError("a classical purifier has more than one row per image (draws?)")
    w = worst_case(per_edit)
    return w.assign(draws=n) if len(w) else w


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


# ------------------------------------------------------------------------------- the stage


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


def _purifier_suite(purifiers: str, diffusion: str, seed: int, dev) -> tuple:
    """``(classical, wanted, status, functions)``: the classical and the diffusion purifier
    specs asked for, one status row per diffusion purifier (:func:`load_models`), and name ->
    (spec, function) of those that run (``none``, the classical ones, the diffusion ones whose
    weights loaded)."""
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
    return classical, wanted, status, functions


def _protections(
    spec, editor, x, m, names, *, protected_dir, budget: Budget, seeds: int, adaptive_labels,
    classical, extra, batch_size: int, dev,
) -> dict:  # fmt: skip
    """(method, δ₀ seed) -> (protected images, target, seconds) of every protection against
    ``editor``: the implant stage's images for the pipeline editor (``budget.seed``), the
    backdoor at every seed for the others; the adaptive backdoor where ``spec``'s label is in
    ``adaptive_labels``; the baselines ``extra``."""
    seed = budget.seed
    methods = {}
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
            eot = EOTEditor(editor, _eot_draws(classical), pick="one", jpeg_grad="kornia", seed=s)
            r = _implant_batches(eot, x, m, batch_size, run_budget)
            methods["backdoor_adaptive", s] = (*r, time.perf_counter() - t0)
        for name in extra:
            t0 = time.perf_counter()
            r = protect(name, editor, x, m, budget=run_budget, progress=False)
            methods[name, s] = (r.protected, r.target, time.perf_counter() - t0)
    return methods


def _eot_draws(classical) -> list[str]:
    """The classical purifiers the adaptive defence draws from: those the EOT editor takes
    (:data:`runtime_backdoor.transforms.EOT`); chains and ``lanczos`` are left out (every
    purifier of the default suite is an EOT form)."""
    words = {T.FORMS[k].word for k in T.EOT}
    return [c.name for c in classical if c.kind in words]


def _editor_labels(editors: str, editor_record, adaptive: str) -> tuple:
    """``(specs, labels, adaptive_labels)``: the editor specs, spec label -> the label the
    tables use (the pipeline editor's recorded name for ``pipeline``), and the labels of the
    editors with the adaptive defence (each must be one of ``editors``)."""
    specs = parse_editor_specs(editors)
    adaptive_labels = str(adaptive).split()
    pipeline_name = json.loads(Path(editor_record).read_text())["name"]
    labels = {s.label: (pipeline_name if s.name == PIPELINE else s.label) for s in specs}
    unknown = set(adaptive_labels) - set(labels)
    if unknown:
        raise ValueError(f"adaptive: {sorted(unknown)} are not editor labels of {editors!r}")
    return specs, labels, adaptive_labels


def _measure(
    specs, labels, x, m, names, functions, *, editor_record, protected_dir, budget: Budget,
    seeds: int, adaptive_labels, classical, extra, hit_tol: float, hit_min_fraction: float,
    batch_size: int, dev, progress: bool,
) -> tuple[list, list]:  # fmt: skip
    """Every protection against every editor (:func:`_protections`), evaluated under every
    purifier (:func:`evaluate_editor`): the per-edit frames, and one row per editor, method
    and δ₀ seed with the protection's cost and L∞ size."""
    cache: dict = {}
    frames, protection = [], []
    for spec in specs:
        editor = build_from_spec(spec, editor_record, device=dev)
        label = labels[spec.label]
        edits_of: dict = {}  # this editor's edits of x and p(x), shared by its methods and seeds
        methods = _protections(
            spec, editor, x, m, names, protected_dir=protected_dir, budget=budget, seeds=seeds,
            adaptive_labels=adaptive_labels, classical=classical, extra=extra,
            batch_size=batch_size, dev=dev,
        )  # fmt: skip
        for (method, s), (protected, phi, seconds) in methods.items():
            rows = evaluate_editor(
                editor, x, m, protected, phi, functions, names=names, kernel=budget.expand_kernel,
                hit_tol=hit_tol, hit_min_fraction=hit_min_fraction, batch_size=batch_size,
                purified_clean=cache, clean_edits=edits_of, progress=progress,
            )  # fmt: skip
            frames.append(rows.assign(editor=label, method=method, seed=s))
            protection.append(
                {"editor": label, "method": method, "seed": s, "seconds": seconds,
                 "linf_8bit": float((protected - x).abs().max() * 255)}
            )  # fmt: skip
    return frames, protection


def _write_reports(reports_dir, per_edit, table, found, status, settings) -> tuple:
    """``reports_dir/purification/`` (``per_edit.csv``, ``table.csv``, ``conclusions.json``,
    ``results.md``, ``metrics.json``) and the figure; returns the markdown, the metrics and the
    figure's path."""
    reports = Path(reports_dir)
    out = reports / "purification"
    write_csv(out / "per_edit.csv", per_edit)
    write_csv(out / "table.csv", table)
    write_json(out / "conclusions.json", found)
    text = markdown(table, found, settings)
    (out / "results.md").write_text(text)
    metrics = summarize(table, status, settings["n_images"]) | unpurified_seed_spread(per_edit)
    write_json(out / "metrics.json", metrics)
    write_headline(out / "headline.json", metrics, "purify")  # what `dvc metrics show` shows
    write_csv(reports / "plots" / "purification_worst_case.csv", purification_worst_case(table))
    figure = save_figure(purification_plot(table), reports / "figures" / "purification.png")
    return text, metrics, figure


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
    seed = budget.seed
    dev = resolve_device(device)
    classical, wanted, status, functions = _purifier_suite(purifiers, diffusion, seed, dev)

    df, x, m = load_prepared(prepared_dir)
    names = list(df["name"])
    x, m = x.to(dev), m.to(dev)
    specs, labels, adaptive_labels = _editor_labels(editors, editor_record, adaptive)
    frames, protection = _measure(
        specs, labels, x, m, names, functions, editor_record=editor_record,
        protected_dir=protected_dir, budget=budget, seeds=seeds, adaptive_labels=adaptive_labels,
        classical=classical, extra=extra, hit_tol=hit_tol, hit_min_fraction=hit_min_fraction,
        batch_size=batch_size, dev=dev, progress=progress,
    )  # fmt: skip
    per_edit = pd.concat(frames, ignore_index=True)
    per_edit["content"] = per_edit["name"].map(dict(zip(df["name"], df["content"], strict=True)))
    first = ["editor", "method", "seed", "name", "content", "purifier", "family", "scenario"]
    per_edit = per_edit[first + [c for c in per_edit.columns if c not in first]]
    rows = pd.concat([per_edit, worst_case(per_edit)], ignore_index=True)
    table = summary_table(rows, status)
    found = conclusions(rows)
    settings = {
        "n_images": len(names), "eps": budget.eps, "steps": budget.steps, "seed": seed,
        "seeds": int(seeds), "hit_tol": hit_tol,
        "hit_min_fraction": hit_min_fraction, "editors": list(labels.values()),
        "purifiers": [s.name for s in classical] + [s.name for s in wanted],
    }  # fmt: skip
    text, metrics, figure = _write_reports(reports_dir, per_edit, table, found, status, settings)
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
    "summarize",
    "summary_table",
    "worst_case",
    "worst_case_over_draws",
]
