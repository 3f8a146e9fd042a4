"""Stage ``beyond``: fair masks, robustness, EOT, transfer and baselines side by side.

Reads the pipeline's folders (``data/prepared``, ``data/protected``, ``models/editor``) and
writes flat tables to ``reports/beyond/``. What it measures, and on which images:

- **fair masks** and **robustness** of the pipeline's own protected images (the ``implant``
  stage's output) on every image: the official scenarios plus the fair ones of
  :func:`runtime_backdoor.robustness.fair_masks`, after each transformation;
- **methods side by side** on a subset of images (a few per content type): the backdoor,
  the backdoor with EOT and the baselines of :mod:`runtime_backdoor.baselines`, each
  optimised against each *source* editor at the implant stage's budget and evaluated with
  that editor under every scenario and transformation;
- **transfer**: the same protected images edited with every other editor (no transformation).

Every edit is compared with the same edit of the clean image after the same transformation.
Editors are given as compact specs (``label:name(key:value,...)``, see
:func:`runtime_backdoor.editors.specs.parse_editor_spec`) so that ``params.yaml`` holds them as
plain strings. The tables, ``results.md`` and ``metrics.json`` are built by
:mod:`runtime_backdoor.reporting`; the figures are drawn by :mod:`runtime_backdoor.beyond_figures`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import reporting
from ..baselines import METHODS, NotApplicable, protect
from ..beyond_figures import baseline_plot, fair_mask_figure, robustness_plot, transfer_plot
from ..budget import Budget
from ..data import load_prepared, read_folder, read_image, to_tensor, write_csv, write_json
from ..editors.specs import PIPELINE, ParsedSpec, build_from_spec, parse_editor_specs
from ..eot import parse_draws
from ..masks import BENIGN as OFFICIAL_BENIGN
from ..masks import MALICIOUS as OFFICIAL_MALICIOUS
from ..masks import scenario_masks
from ..metrics import (
    LpipsUnavailable,
    hit_fraction_batch,
    load_lpips,
    lpips_batch,
    reduce_ssim,
    ssim_map,
    ssim_reference,
)
from ..plots import save_figure
from ..project import resolve_device
from ..robustness import FAIR_BENIGN, FAIR_MALICIOUS, fair_masks, parse_transforms, to_8bit
from ..summaries import write_headline
from ..targets import make_target

MALICIOUS = OFFICIAL_MALICIOUS + FAIR_MALICIOUS
BENIGN = OFFICIAL_BENIGN + FAIR_BENIGN
ALL_SCENARIOS = MALICIOUS + BENIGN
#: Methods evaluated under every transformation (the others only untransformed).
ROBUST_METHODS = ("backdoor", "backdoor_eot")

# ------------------------------------------------------------------------------- images


def subset_names(manifest: pd.DataFrame, n: int) -> list[str]:
    """``n`` image names taken round-robin over content types (0 = all), in manifest order."""
    if n < 0:
        raise ValueError(f"subset must be >= 0, got {n}")
    if n == 0 or n >= len(manifest):
        return list(manifest["name"])
    groups = [list(g["name"]) for _, g in manifest.groupby("content", sort=False)]
    out: list[str] = []
    while len(out) < n:
        for g in groups:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def load_protected(protected_dir, names) -> torch.Tensor:
    return torch.cat([to_tensor(read_image(Path(protected_dir) / f"{n}.png")) for n in names])


# ------------------------------------------------------------------------------- metrics


def _edit_batches(editor, batch: torch.Tensor, regions: torch.Tensor, batch_size: int):
    """``editor`` on ``batch`` with ``regions``, ``batch_size`` images at a time."""
    with torch.no_grad():
        return torch.cat(
            [
                editor(batch[i : i + batch_size], regions[i : i + batch_size])
                for i in range(0, batch.shape[0], batch_size)
            ]
        )


def _method_rows(
    prot_edit, clean_edit, target, region, valid, *, names, where: dict, hit_tol: float,
    hit_min_fraction: float, lpips_model, ssim_ref=None,
) -> list[dict]:  # fmt: skip
    """One row per image with a non-empty ``region``: the hit fractions of the protected and
    the clean image's edits, and the protected edit's SSIM, MSE (and LPIPS) against the clean
    edit; ``where``: the row's method, transformation, scenario, kind and family. ``ssim_ref``:
    :func:`~runtime_backdoor.metrics.ssim_reference` of ``clean_edit``, shared by the methods."""
    rows = []
    safe = region.clone()
    safe[~valid] = 1  # metrics of an empty region are dropped below
    frac_p = hit_fraction_batch(prot_edit, target, safe, hit_tol)
    frac_c = hit_fraction_batch(clean_edit, target, safe, hit_tol)
    smap = ssim_map(prot_edit, clean_edit, reference=ssim_ref)
    ssim_all, ssim_reg = reduce_ssim(smap), reduce_ssim(smap, safe)
    mse_reg = ((prot_edit - clean_edit) ** 2 * safe).flatten(1).sum(1) / (
        3 * safe.flatten(1).sum(1)
    )
    lpips = {}
    if lpips_model is not None:
        lpips["lpips_vs_clean_edit"] = lpips_batch(prot_edit, clean_edit, lpips_model)
        lpips["lpips_region_vs_clean_edit"] = lpips_batch(prot_edit, clean_edit, lpips_model, safe)
    for i in range(prot_edit.shape[0]):
        if not valid[i]:
            continue
        rows.append(
            {
                "name": names[i],
                **where,
                "edited_fraction": float(region[i].mean()),
                "hit_fraction_clean": float(frac_c[i]),
                "hit_fraction_protected": float(frac_p[i]),
                "hit_clean": bool(frac_c[i] >= hit_min_fraction),
                "hit_protected": bool(frac_p[i] >= hit_min_fraction),
                "ssim_vs_clean_edit": float(ssim_all[i]),
                "ssim_region_vs_clean_edit": float(ssim_reg[i]),
                "mse_region_vs_clean_edit": float(mse_reg[i]),
                **{k: float(v[i]) for k, v in lpips.items()},
            }
        )
    return rows


def evaluate_grid(
    editor,
    images: torch.Tensor,
    masks: torch.Tensor,
    protected: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    *,
    names: list[str],
    kernel: int,
    transforms=("none",),
    scenarios=ALL_SCENARIOS,
    robust_scenarios=None,
    shift_px: int = 4,
    seed: int = 0,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    batch_size: int = 12,
    clean_edits: dict | None = None,
    lpips_model=None,
    progress: bool = False,
) -> pd.DataFrame:
    """Edit the clean and every protected version under every scenario and transformation.

    ``protected``/``targets``: method -> (N, 3, H, W). ``transforms``: specs or
    :class:`~runtime_backdoor.robustness.Transform`; the transformation is applied to
    the clean and the protected images alike, masks and targets follow its geometry.
    ``robust_scenarios`` (default: all) restricts the scenarios run under the
    transformations other than ``none``. Returns one row per image, method,
    transformation and scenario; a scenario whose mask is empty after a crop is skipped.
    ``clean_edits``: a dict kept by the caller per editor, so that the clean images' edits
    (the same for every method and δ₀ seed) are computed once across calls. ``lpips_model``
    (:func:`runtime_backdoor.metrics.load_lpips`) adds LPIPS of each edit against the clean
    image's edit, whole and over the region.
    """
    device = images.device
    transforms = parse_transforms(list(transforms), seed=seed)
    all_masks = scenario_masks(masks, kernel) | fair_masks(masks, shift_px=shift_px, seed=seed)
    unknown = set(scenarios) - set(all_masks)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; known: {', '.join(all_masks)}")
    methods = list(protected)
    n = images.shape[0]
    rows = []
    jobs = [
        (t, s)
        for t in transforms
        for s in scenarios
        if t.kind == "none" or robust_scenarios is None or s in robust_scenarios
    ]
    cache: dict[str, tuple] = {}
    for t, scenario in tqdm(jobs, desc="edit grid", disable=not progress, leave=False):
        if t.name not in cache:
            cache = {t.name: (t(images), {k: t(v) for k, v in protected.items()})}
        clean_t, prot_t = cache[t.name]
        region = t.frame(all_masks[scenario])
        key = (t.name, scenario, tuple(names), kernel, shift_px, seed)
        known = clean_edits.get(key) if clean_edits is not None else None
        batch = torch.cat([*([] if known is not None else [clean_t]), *prot_t.values()])
        region_b = region.repeat(batch.shape[0] // n, 1, 1, 1)
        edits = to_8bit(_edit_batches(editor, batch, region_b, batch_size)).to(device)
        if known is not None:
            edits = torch.cat([known, edits])
        elif clean_edits is not None:
            clean_edits[key] = edits[:n]
        clean_edit = edits[:n]
        valid = region.flatten(1).sum(1) > 0
        kind = "malicious" if scenario in MALICIOUS else "benign"
        family = "fair" if scenario in FAIR_MALICIOUS + FAIR_BENIGN else "official"
        ssim_ref = ssim_reference(clean_edit)
        for j, method in enumerate(methods):
            prot_edit = edits[(j + 1) * n : (j + 2) * n]
            target = t.frame(targets[method])
            where = {"method": method, "transform": t.name, "scenario": scenario, "kind": kind,
                     "family": family}  # fmt: skip
            rows += _method_rows(
                prot_edit, clean_edit, target, region, valid, names=names, where=where,
                hit_tol=hit_tol, hit_min_fraction=hit_min_fraction, lpips_model=lpips_model,
                ssim_ref=ssim_ref,
            )  # fmt: skip
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- the stage


@dataclass
class _Measurement:
    """What the parts of :func:`measure` share: its settings, the editors built so far (one per
    label) with their clean edits (the same for every method and δ₀ seed), and the rows."""

    editor_record: Any
    protected_dir: Any
    device: torch.device
    budget: Budget
    methods: list
    eot: dict
    transforms: list
    robust: list | None
    all_targets: list
    grid: dict  #: the keywords every :func:`evaluate_grid` call shares
    progress: bool
    built: dict = field(default_factory=dict)
    clean_edits: dict = field(default_factory=dict)  #: editor label -> its clean edits
    frames: list = field(default_factory=list)
    log: list = field(default_factory=list)

    @property
    def base_seed(self) -> int:
        return int(self.budget.seed)

    def editor_of(self, spec: ParsedSpec):
        if spec.label not in self.built:
            self.built[spec.label] = build_from_spec(spec, self.editor_record, self.device)
        return self.built[spec.label]

    def add(self, df: pd.DataFrame, source: str, target: str, run_seed: int | None = None) -> None:
        if len(df):
            run_seed = self.base_seed if run_seed is None else run_seed
            self.frames.append(df.assign(source=source, editor=target, seed=run_seed))

    def pipeline_part(self, spec: ParsedSpec, prepared_dir) -> None:
        """The pipeline's own protected images, every image: fair masks and robustness."""
        device = self.device
        _, x, m = load_prepared(prepared_dir)
        names = list(read_folder(prepared_dir)["name"])
        x, m = x.to(device), m.to(device)
        xp = load_protected(self.protected_dir, names).to(device)
        phi = make_target(x, self.budget.target)
        df = evaluate_grid(
            self.editor_of(spec), x, m, {"backdoor": xp}, {"backdoor": phi}, names=names,
            transforms=self.transforms, robust_scenarios=self.robust, progress=self.progress,
            clean_edits=self.clean_edits.setdefault(spec.label, {}), **self.grid,
        )  # fmt: skip
        self.add(df, spec.label, spec.label)
        imp = read_folder(self.protected_dir).set_index("name")
        for i, name in enumerate(names):
            self.log.append(
                {
                    "source": spec.label, "method": "backdoor", "name": name,
                    "seed": self.base_seed, "status": "ok", "seconds": float(imp.loc[name, "seconds"]),
                    "linf_8bit": float((xp[i] - x[i]).abs().max() * 255),
                }
            )  # fmt: skip

    def protect_methods(self, spec, editor, x, m, order, run_budget: Budget, run_seed: int):
        """``(protected, targets)``: method -> images of every method against ``editor`` that
        applies to it (each logged, as are those that do not apply)."""
        protected, targets = {}, {}
        for method in self.methods:
            if spec.name == PIPELINE and method == "backdoor":
                protected[method] = load_protected(self.protected_dir, order).to(self.device)
                targets[method] = make_target(x, self.budget.target)
                continue
            try:
                r = protect(method, editor, x, m, budget=run_budget, eot=self.eot, progress=False)
            except NotApplicable as err:
                self.log.extend(
                    {
                        "source": spec.label,
                        "method": method,
                        "name": n,
                        "seed": run_seed,
                        "status": f"n/a: {err}",
                    }
                    for n in order
                )
                continue
            protected[method], targets[method] = r.protected, r.target
            for i, name in enumerate(order):
                self.log.append(
                    {
                        "source": spec.label, "method": method, "name": name, "seed": run_seed, "status": "ok",
                        "seconds": r.seconds / len(order),
                        "linf_8bit": float(r.delta[i].abs().max() * 255),
                    }
                )  # fmt: skip
        return protected, targets

    def protect_against(self, spec, editor, x, m, order, run_budget: Budget, run_seed: int):
        """Every method against ``spec``'s editor on the subset, evaluated with that editor
        and (transfer) with every other editor."""
        protected, targets = self.protect_methods(spec, editor, x, m, order, run_budget, run_seed)
        # The pipeline's backdoor already has its rows (every image) from part 1.
        own = {
            k: v for k, v in protected.items() if not (spec.name == PIPELINE and k == "backdoor")
        }
        # Transformations only for the backdoor and its EOT variant (the robustness and EOT
        # tables); the baselines are compared untransformed, which is all their table uses.
        for group, group_transforms in (
            ({k: v for k, v in own.items() if k in ROBUST_METHODS}, self.transforms),
            ({k: v for k, v in own.items() if k not in ROBUST_METHODS}, ["none"]),
        ):
            if not group:
                continue
            df = evaluate_grid(
                editor, x, m, group, targets, names=order, transforms=group_transforms,
                robust_scenarios=self.robust, progress=self.progress,
                clean_edits=self.clean_edits.setdefault(spec.label, {}), **self.grid,
            )  # fmt: skip
            self.add(df, spec.label, spec.label, run_seed)
        # 3. Transfer: the same protected images, edited by every other editor.
        for other in self.all_targets:
            if other.label == spec.label or not protected:
                continue
            # Only the official scenarios: the transfer table and its conclusions use no others.
            df = evaluate_grid(
                self.editor_of(other), x, m, protected, targets, names=order, transforms=["none"],
                scenarios=OFFICIAL_MALICIOUS + OFFICIAL_BENIGN, progress=self.progress,
                clean_edits=self.clean_edits.setdefault(other.label, {}), **self.grid,
            )  # fmt: skip
            self.add(df, spec.label, other.label, run_seed)


def _checked_methods(methods: str | list, robust_scenarios: str | list | None) -> tuple:
    """``(methods, robust_scenarios)`` as lists (``None``: every scenario), checked."""
    methods = methods.split() if isinstance(methods, str) else list(methods)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    robust = robust_scenarios.split() if isinstance(robust_scenarios, str) else robust_scenarios
    if robust is not None and set(robust) - set(ALL_SCENARIOS):
        raise ValueError(
            f"unknown robust_scenarios {sorted(set(robust) - set(ALL_SCENARIOS))}; "
            f"known: {', '.join(ALL_SCENARIOS)}"
        )
    return methods, robust


def measure(
    prepared_dir,
    protected_dir,
    editor_record,
    *,
    editors: str | list = PIPELINE,
    transfer_editors: str | list = "",
    methods: str | list = METHODS,
    subset: int = 6,
    transforms: str | list = "none",
    robust_scenarios: str | list | None = None,
    eot_transforms: str | list = "jpeg resize dilate",
    shift_px: int = 4,
    budget: Budget,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    seed: int = 0,
    seeds: int = 1,
    batch_size: int = 12,
    lpips_model=None,
    device="cpu",
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every measurement of the stage: returns ``(per_edit, protection)``.

    ``editors``: source editors (specs) protected against and edited with; ``pipeline``
    must be among them for the all-image part. ``transfer_editors``: extra editors that
    only edit. ``budget``: the implant stage's :class:`~runtime_backdoor.budget.Budget`,
    shared by every method.
    ``per_edit`` has one row per source, target editor, method, image, transformation and
    scenario; ``protection`` one row per source, method and image (cost, L∞, status).
    ``seeds``: δ₀ seeds (``budget.seed`` and the next ones) of every method against every
    source except the pipeline editor, whose backdoor is the implant stage's (one seed) and
    whose other methods run once to bound the cost; rows carry their ``seed``.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    kernel = int(budget.expand_kernel)
    sources = parse_editor_specs(editors)
    all_targets = parse_editor_specs(sources + parse_editor_specs(transfer_editors))
    methods, robust = _checked_methods(methods, robust_scenarios)
    transform_list = [t.name for t in parse_transforms(transforms)]  # refused here, not later
    eot = {"transforms": tuple(s.name for s in parse_draws(eot_transforms))}
    device = torch.device(device)

    manifest = read_folder(prepared_dir)
    content = dict(zip(manifest["name"], manifest["content"], strict=True))
    chosen = subset_names(manifest, subset)
    grid = {
        "kernel": kernel, "shift_px": shift_px, "seed": seed, "hit_tol": hit_tol,
        "hit_min_fraction": hit_min_fraction, "batch_size": batch_size, "lpips_model": lpips_model,
    }  # fmt: skip
    run = _Measurement(
        editor_record, protected_dir, device, budget, methods, eot, transform_list, robust,
        all_targets, grid, progress,
    )  # fmt: skip
    base_seed = run.base_seed

    # 1. The pipeline's own protected images, every image: fair masks and robustness.
    pipeline = [s for s in sources if s.name == PIPELINE]
    if pipeline:
        run.pipeline_part(pipeline[0], prepared_dir)

    # 2. Every method against every source editor on the subset (and 3. transfer).
    _, x, m = load_prepared(prepared_dir, chosen)
    x, m = x.to(device), m.to(device)
    order = list(read_folder(prepared_dir).query("name in @chosen")["name"])
    for spec in sources:
        editor = run.editor_of(spec)
        for run_seed in range(base_seed, base_seed + (1 if spec.name == PIPELINE else seeds)):
            run_budget = budget.with_seed(run_seed)
            run.protect_against(spec, editor, x, m, order, run_budget, run_seed)
    per_edit = pd.concat(run.frames, ignore_index=True) if run.frames else pd.DataFrame()
    if len(per_edit):
        per_edit["content"] = per_edit["name"].map(content)
        first = ["source", "editor", "method", "name", "content", "transform", "scenario"]
        per_edit = per_edit[first + [c for c in per_edit.columns if c not in first]]
    return per_edit, pd.DataFrame(run.log)


__all__ = [
    "ALL_SCENARIOS",
    "BENIGN",
    "MALICIOUS",
    "evaluate_grid",
    "load_protected",
    "run",
    "subset_names",
]


def _lpips(lpips_backbone: str, dev) -> tuple:
    """``(model, None)``, or ``(None, why not)``: LPIPS-alex on ``lpips_backbone``."""
    lpips_model, lpips_unavailable = None, "no backbone given (evaluate.lpips_backbone)"
    if lpips_backbone:
        try:
            lpips_model, lpips_unavailable = load_lpips("alex", lpips_backbone, device=dev), None
        except LpipsUnavailable as err:
            print(f"LPIPS unavailable: {err}")
            lpips_unavailable = "no backbone: runtime-backdoor weights fetch lpips-alex"
    return lpips_model, lpips_unavailable


def _tables_and_figures(
    per_edit, protection, out: Path, fig_dir: Path, prepared_dir, budget: Budget, shift_px: int
) -> tuple[dict, list]:
    """Every table (written as ``out/NAME.csv``) and figure (under ``fig_dir``)."""
    seed = budget.seed
    manifest = read_folder(prepared_dir)
    firsts = manifest.groupby("content", sort=False).head(1)["name"].tolist()
    fig = fair_mask_figure(prepared_dir, firsts, budget.expand_kernel, shift_px=shift_px, seed=seed)
    figures = [save_figure(fig, fig_dir / "fair_masks.png")]
    tables = {
        "fair_masks": reporting.fair_mask_table(per_edit),
        "robustness": reporting.robustness_table(per_edit),
    }
    has_eot = (per_edit["method"] == "backdoor_eot").any()
    tables["eot"] = (
        reporting.eot_table(per_edit, protection) if has_eot else tables["robustness"].iloc[:0]
    )
    tables["baselines"] = reporting.baseline_table(per_edit, protection)
    tables["transfer"] = reporting.transfer_table(per_edit)
    for name, table in tables.items():
        write_csv(out / f"{name}.csv", table)
    figures.append(save_figure(robustness_plot(per_edit), fig_dir / "robustness.png"))
    figures.append(save_figure(baseline_plot(per_edit, protection), fig_dir / "baselines.png"))
    if per_edit["editor"].nunique() > 1:
        figures.append(save_figure(transfer_plot(per_edit), fig_dir / "transfer.png"))
    return tables, figures


def run(
    reports_dir="reports",
    *,
    prepared_dir="data/prepared",
    protected_dir="data/protected",
    editor_record="models/editor/editor.json",
    editors: str = PIPELINE,
    transfer_editors: str = "",
    methods: str = " ".join(METHODS),
    subset: int = 0,
    transforms: str = "none",
    robust_scenarios: str | None = None,
    eot_transforms: str = "jpeg resize dilate",
    shift_px: int = 4,
    budget: Budget,
    seeds: int = 1,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    batch_size: int = 12,
    lpips_backbone: str = "",
    device: str = "auto",
) -> dict:
    """The stage: :func:`measure`, then every table, figure, ``results.md``,
    ``conclusions.json`` and ``metrics.json`` under ``reports_dir/beyond`` and
    ``reports_dir/figures/beyond``. ``budget``: the implant stage's; its seed also seeds the
    EOT draws and the fair masks.
    ``lpips_backbone``: the evaluate stage's AlexNet for LPIPS-alex ("" = none); without it the
    LPIPS columns are absent and the report says why, with the fetch command."""
    out = Path(reports_dir) / "beyond"
    fig_dir = Path(reports_dir) / "figures" / "beyond"
    seed = budget.seed
    dev = resolve_device(device)
    lpips_model, lpips_unavailable = _lpips(lpips_backbone, dev)
    start = time.perf_counter()
    per_edit, protection = measure(
        prepared_dir, protected_dir, editor_record,
        editors=editors, transfer_editors=transfer_editors, methods=methods, subset=subset,
        transforms=transforms, robust_scenarios=robust_scenarios, eot_transforms=eot_transforms,
        shift_px=shift_px, budget=budget, hit_tol=hit_tol, hit_min_fraction=hit_min_fraction,
        seed=seed, seeds=seeds, batch_size=batch_size, lpips_model=lpips_model, device=dev,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    write_csv(out / "per_edit.csv", per_edit)
    write_csv(out / "protection.csv", protection)

    tables, figures = _tables_and_figures(
        per_edit, protection, out, fig_dir, prepared_dir, budget, shift_px
    )
    markdown = reporting.markdown(per_edit, protection, lpips_unavailable)
    (out / "results.md").write_text(markdown)
    # The comparisons the text states, by stable id: what `make stability` re-checks.
    write_json(out / "conclusions.json", reporting.conclusions(per_edit))
    summary = reporting.summarize(per_edit, protection)
    summary["lpips_available"] = lpips_model is not None
    if lpips_unavailable:
        summary["lpips_unavailable"] = lpips_unavailable
    summary["stage_seconds"] = seconds
    write_json(out / "metrics.json", summary)
    write_headline(out / "headline.json", summary, "beyond")  # what `dvc metrics show` shows
    recorded = {
        "n_edits": summary["n_edits"],
        "stage_seconds": seconds,
        "sources": sorted(per_edit["source"].unique().tolist()),
        "editors": sorted(per_edit["editor"].unique().tolist()),
        "methods": sorted(protection["method"].unique().tolist()),
        "not_applicable": sorted(
            protection.loc[protection["status"].str.startswith("n/a"), "method"].unique().tolist()
        ),
        "figures": [str(p) for p in figures],
    }
    return {"tables": tables, "figures": figures, "markdown": markdown, "recorded": recorded}
