"""The ``beyond`` stage: fair masks, robustness, EOT, transfer and baselines side by side.

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
Editors are given as compact specs (``label:name(key:value,...)``, see :func:`parse_editor_spec`)
so that ``params.yaml`` holds them as plain strings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import study
from .baselines import METHODS, NotApplicable, protect
from .data import read_image
from .robustness import (
    FAIR_BENIGN,
    FAIR_MALICIOUS,
    Transform,
    fair_masks,
    parse_transforms,
    to_8bit,
)
from .targets import make_target

OFFICIAL_MALICIOUS, OFFICIAL_BENIGN = study.MALICIOUS, study.BENIGN
MALICIOUS = OFFICIAL_MALICIOUS + FAIR_MALICIOUS
BENIGN = OFFICIAL_BENIGN + FAIR_BENIGN
ALL_SCENARIOS = MALICIOUS + BENIGN
PIPELINE = "pipeline"

# ------------------------------------------------------------------------------- editors


@dataclasses.dataclass(frozen=True)
class EditorSpec:
    """An editor named in ``params.yaml``: ``label:name(key:value,key:value)``."""

    label: str
    name: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def kwargs(self) -> dict:
        return dict(self.options)


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_editor_spec(text: str) -> EditorSpec:
    """Parse one spec (no spaces, no ``=``: papermill's parameter parser rejects it).

    ``pipeline`` (the editor stage's record), ``global-mix(gain:400,reach:8)``,
    ``lama(preset:mini,seed:1)`` (random weights; ``ngf``/``n_blocks``/``n_downsampling``/
    ``global_ratio`` override the preset), ``lama(weights:PATH)``, ``mini-lama(weights:PATH)``,
    ``sd-inpainting(weights:PATH)``, ``tiny-sd(seed:0)`` (random miniature SD inpainting),
    ``blur-fill``. A ``label:`` prefix names it (``control:global-mix(reach:8)``); the label
    defaults to the spec itself.
    """
    text = str(text).strip()
    head, paren, rest = text.partition("(")
    if paren and not rest.endswith(")"):
        raise ValueError(f"editor spec {text!r}: options must end with ')'")
    label, _, name = head.rpartition(":")
    label = label or text
    options = []
    for item in filter(None, rest[:-1].split(",") if paren else []):
        key, colon, value = item.partition(":")
        if not colon:
            raise ValueError(f"editor spec {text!r}: option {item!r} is not key:value")
        options.append((key.strip(), _literal(value.strip())))
    if name not in EDITOR_KINDS:
        raise ValueError(
            f"editor spec {text!r}: unknown editor {name!r}; known: {', '.join(EDITOR_KINDS)}"
        )
    return EditorSpec(label, name, tuple(options))


def parse_editor_specs(text: str | list) -> list[EditorSpec]:
    """A space-separated string of specs (or a list of specs); labels must be unique."""
    items = text.split() if isinstance(text, str) else list(text)
    specs = [s if isinstance(s, EditorSpec) else parse_editor_spec(s) for s in items]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"editor labels must be unique, got {labels}")
    return specs


def tiny_sd_editor(seed: int = 0, steps: int = 2, size: int = 64):
    """A randomly initialised miniature SD-inpainting stack (diffusers), for CPU runs.

    Same architecture family as SD 1.x inpainting (9-channel UNet, 8x VAE, DDIM) but
    tiny and untrained: it exercises the diffusion code paths (the encoder attack,
    LaMa ↔ SD transfer) without any download; its numbers say nothing about real SD.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from .editors.diffusion import (
        SD_NOISE_SCHEDULE,
        TINY_UNET_CONFIG,
        TINY_VAE_CONFIG,
        DiffusionInpaintEditor,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "sample_size": size // 8})
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": size})
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SD_NOISE_SCHEDULE)
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(seed))
    return DiffusionInpaintEditor.from_components(
        unet, vae, scheduler, embeds, steps=steps, guidance_scale=1.0, seed=seed
    )


def _build_lama(opts: dict):
    from .editors import build_editor
    from .editors.lama import PRESETS

    weights = opts.pop("weights", None)
    preset = opts.pop("preset", "mini" if weights is None else "big-lama")
    overrides = {
        k: opts.pop(k) for k in ("ngf", "n_blocks", "n_downsampling", "global_ratio") if k in opts
    }
    config = dataclasses.replace(PRESETS[preset], **overrides)
    if weights is None:
        opts.setdefault("seed", 0)
    return build_editor("lama", weights=weights, preset=config, **opts)


def _build_simple(cls_name: str):
    def build(opts: dict):
        from .editors import simple

        return getattr(simple, cls_name)(**opts).eval().requires_grad_(False)

    return build


def _build_registry(name: str):
    def build(opts: dict):
        from .editors import build_editor

        return build_editor(name, weights=opts.pop("weights", None), **opts)

    return build


def _build_tiny_sd(opts: dict):
    return tiny_sd_editor(**opts).eval().requires_grad_(False)


EDITOR_KINDS = {
    PIPELINE: None,
    "global-mix": _build_simple("GlobalMixEditor"),
    "blur-fill": _build_simple("BlurFillEditor"),
    "lama": _build_lama,
    "mini-lama": _build_registry("mini-lama"),
    "sd-inpainting": _build_registry("sd-inpainting"),
    "tiny-sd": _build_tiny_sd,
}


def build_from_spec(spec: EditorSpec | str, editor_record=None, device="cpu"):
    """Build the editor of ``spec``; ``pipeline`` loads ``editor_record`` (models/editor/editor.json)."""
    spec = parse_editor_spec(spec) if isinstance(spec, str) else spec
    if spec.name == PIPELINE:
        if editor_record is None:
            raise ValueError(
                "editor spec 'pipeline' needs the editor stage's record (editor_record)"
            )
        return study.load_editor(editor_record, device=device)
    return EDITOR_KINDS[spec.name](spec.kwargs).to(device)


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
    return torch.cat([study.to_tensor(read_image(Path(protected_dir) / f"{n}.png")) for n in names])


# ------------------------------------------------------------------------------- metrics


def _symmetric_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    # scipy.ndimage's "reflect" (edge repeated), which scikit-image's SSIM filter uses
    x = torch.cat([x[..., :p].flip(-1), x, x[..., -p:].flip(-1)], dim=-1)
    return torch.cat([x[..., :p, :].flip(-2), x, x[..., -p:, :].flip(-2)], dim=-2)


def _box_mean(x: torch.Tensor, win: int) -> torch.Tensor:
    """Mean over ``win`` x ``win`` windows of an already padded map, by cumulative sums."""
    for dim in (-1, -2):
        c = torch.cumsum(x, dim=dim)
        zero = torch.zeros_like(c.narrow(dim, 0, 1))
        c = torch.cat([zero, c], dim=dim)
        x = c.narrow(dim, win, c.shape[dim] - win) - c.narrow(dim, 0, c.shape[dim] - win)
    return x / (win * win)


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) SSIM map of (B, 3, H, W) images, averaged over channels (float64).

    scikit-image's definition, as :func:`runtime_backdoor.metrics.ssim` uses it: 7x7
    uniform window, sample covariance, K1 0.01, K2 0.03, data range 1.
    """
    a, b = a.double(), b.double()
    win, pad = 7, 3
    norm = win * win / (win * win - 1)
    stats = _box_mean(_symmetric_pad(torch.cat([a, b, a * a, b * b, a * b], 1), pad), win)
    ua, ub, aa, bb, ab = stats.chunk(5, dim=1)
    va, vb, cov = norm * (aa - ua * ua), norm * (bb - ub * ub), norm * (ab - ua * ub)
    c1, c2 = 0.01**2, 0.03**2
    smap = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua**2 + ub**2 + c1) * (va + vb + c2))
    return smap.mean(1, keepdim=True)


def reduce_ssim(smap: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean of an SSIM map: without ``mask`` skipping a 3-px border (as scikit-image
    does), with a (B, 1, H, W) ``mask`` over the mask's pixels."""
    if mask is None:
        return smap[..., 3:-3, 3:-3].mean(dim=(1, 2, 3))
    m = mask.double()
    return (smap * m).flatten(1).sum(1) / m.flatten(1).sum(1)


def ssim_batch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) SSIM of (B, 3, H, W) images: :func:`runtime_backdoor.metrics.ssim`, batched."""
    return reduce_ssim(ssim_map(a, b), mask)


def hit_fraction(edited: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, tol: float):
    """(B,) share of the mask's pixels within ``tol`` of ``target`` in every channel."""
    hit = ((edited - target).abs().amax(1, keepdim=True) <= tol + 1e-9).to(mask.dtype)
    return (hit * mask).flatten(1).sum(1) / mask.flatten(1).sum(1)


def scenario_masks(mask: torch.Tensor, kernel: int, *, shift_px: int = 4, seed: int = 0) -> dict:
    """The official scenarios of :func:`runtime_backdoor.study.scenario_masks` plus the fair ones."""
    return study.scenario_masks(mask, kernel) | fair_masks(mask, shift_px=shift_px, seed=seed)


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
    progress: bool = False,
) -> pd.DataFrame:
    """Edit the clean and every protected version under every scenario and transformation.

    ``protected``/``targets``: method -> (N, 3, H, W). ``transforms``: specs or
    :class:`~runtime_backdoor.robustness.Transform`; the transformation is applied to
    the clean and the protected images alike, masks and targets follow its geometry.
    ``robust_scenarios`` (default: all) restricts the scenarios run under the
    transformations other than ``none``. Returns one row per image, method,
    transformation and scenario; a scenario whose mask is empty after a crop is skipped.
    """
    device = images.device
    transforms = parse_transforms(list(transforms), seed=seed)
    all_masks = scenario_masks(masks, kernel, shift_px=shift_px, seed=seed)
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
        batch = torch.cat([clean_t, *prot_t.values()])
        region_b = region.repeat(len(methods) + 1, 1, 1, 1)
        with torch.no_grad():
            edits = torch.cat(
                [
                    editor(batch[i : i + batch_size], region_b[i : i + batch_size])
                    for i in range(0, batch.shape[0], batch_size)
                ]
            )
        edits = to_8bit(edits).to(device)
        clean_edit = edits[:n]
        valid = region.flatten(1).sum(1) > 0
        kind = "malicious" if scenario in MALICIOUS else "benign"
        family = "fair" if scenario in FAIR_MALICIOUS + FAIR_BENIGN else "official"
        for j, method in enumerate(methods):
            prot_edit = edits[(j + 1) * n : (j + 2) * n]
            target = t.frame(targets[method])
            safe = region.clone()
            safe[~valid] = 1  # metrics of an empty region are dropped below
            frac_p = hit_fraction(prot_edit, target, safe, hit_tol)
            frac_c = hit_fraction(clean_edit, target, safe, hit_tol)
            smap = ssim_map(prot_edit, clean_edit)
            ssim_all, ssim_reg = reduce_ssim(smap), reduce_ssim(smap, safe)
            mse_reg = ((prot_edit - clean_edit) ** 2 * safe).flatten(1).sum(1) / (
                3 * safe.flatten(1).sum(1)
            )
            for i in range(n):
                if not valid[i]:
                    continue
                rows.append(
                    {
                        "name": names[i],
                        "method": method,
                        "transform": t.name,
                        "scenario": scenario,
                        "kind": kind,
                        "family": family,
                        "edited_fraction": float(region[i].mean()),
                        "hit_fraction_clean": float(frac_c[i]),
                        "hit_fraction_protected": float(frac_p[i]),
                        "hit_clean": bool(frac_c[i] >= hit_min_fraction),
                        "hit_protected": bool(frac_p[i] >= hit_min_fraction),
                        "ssim_vs_clean_edit": float(ssim_all[i]),
                        "ssim_region_vs_clean_edit": float(ssim_reg[i]),
                        "mse_region_vs_clean_edit": float(mse_reg[i]),
                    }
                )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- the stage


def run(
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
    budget: dict | None = None,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 12,
    device="cpu",
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole stage: returns ``(per_edit, protection)``.

    ``editors``: source editors (specs) protected against and edited with; ``pipeline``
    must be among them for the all-image part. ``transfer_editors``: extra editors that
    only edit. ``budget``: the implant stage's settings (``eps``, ``steps``, ``lr``,
    ``init_high``, ``expand_kernel``, ``target``, ``seed``), shared by every method.
    ``per_edit`` has one row per source, target editor, method, image, transformation and
    scenario; ``protection`` one row per source, method and image (cost, L∞, status).
    """
    budget = dict(budget or {})
    kernel = int(budget.get("expand_kernel", 5))
    sources = parse_editor_specs(editors)
    all_targets = parse_editor_specs(sources + parse_editor_specs(transfer_editors))
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
    transform_list = transforms.split() if isinstance(transforms, str) else list(transforms)
    eot = {
        "transforms": tuple(
            eot_transforms.split() if isinstance(eot_transforms, str) else eot_transforms
        )
    }
    device = torch.device(device)

    manifest = study.read_folder(prepared_dir)
    content = dict(zip(manifest["name"], manifest["content"], strict=True))
    chosen = subset_names(manifest, subset)
    grid = {
        "kernel": kernel, "shift_px": shift_px, "seed": seed, "hit_tol": hit_tol,
        "hit_min_fraction": hit_min_fraction, "batch_size": batch_size,
    }  # fmt: skip
    editors_built: dict[str, torch.nn.Module] = {}

    def editor_of(spec: EditorSpec):
        if spec.label not in editors_built:
            editors_built[spec.label] = build_from_spec(spec, editor_record, device)
        return editors_built[spec.label]

    frames, log = [], []

    def add(df: pd.DataFrame, source: str, target: str) -> None:
        if len(df):
            frames.append(df.assign(source=source, editor=target))

    # 1. The pipeline's own protected images, every image: fair masks and robustness.
    pipeline = [s for s in sources if s.name == PIPELINE]
    if pipeline:
        _, x, m = study.load_prepared(prepared_dir)
        names = list(study.read_folder(prepared_dir)["name"])
        x, m = x.to(device), m.to(device)
        xp = load_protected(protected_dir, names).to(device)
        phi = make_target(x, budget.get("target", "solid"))
        df = evaluate_grid(
            editor_of(pipeline[0]), x, m, {"backdoor": xp}, {"backdoor": phi}, names=names,
            transforms=transform_list, robust_scenarios=robust, progress=progress, **grid,
        )  # fmt: skip
        add(df, pipeline[0].label, pipeline[0].label)
        imp = study.read_folder(protected_dir).set_index("name")
        for i, name in enumerate(names):
            log.append(
                {
                    "source": pipeline[0].label, "method": "backdoor", "name": name,
                    "status": "ok", "seconds": float(imp.loc[name, "seconds"]),
                    "linf_8bit": float((xp[i] - x[i]).abs().max() * 255),
                }
            )  # fmt: skip

    # 2. Every method against every source editor on the subset.
    _, x, m = study.load_prepared(prepared_dir, chosen)
    x, m = x.to(device), m.to(device)
    order = list(study.read_folder(prepared_dir).query("name in @chosen")["name"])
    for spec in sources:
        editor = editor_of(spec)
        protected, targets = {}, {}
        for method in methods:
            if spec.name == PIPELINE and method == "backdoor":
                protected[method] = load_protected(protected_dir, order).to(device)
                targets[method] = make_target(x, budget.get("target", "solid"))
                continue
            try:
                r = protect(method, editor, x, m, eot=eot, progress=False, **budget)
            except NotApplicable as err:
                log.extend(
                    {"source": spec.label, "method": method, "name": n, "status": f"n/a: {err}"}
                    for n in order
                )
                continue
            protected[method], targets[method] = r.protected, r.target
            for i, name in enumerate(order):
                log.append(
                    {
                        "source": spec.label, "method": method, "name": name, "status": "ok",
                        "seconds": r.seconds / len(order),
                        "linf_8bit": float(r.delta[i].abs().max() * 255),
                    }
                )  # fmt: skip
        # The pipeline's backdoor already has its rows (every image) from part 1.
        own = {
            k: v for k, v in protected.items() if not (spec.name == PIPELINE and k == "backdoor")
        }
        if own:
            df = evaluate_grid(
                editor, x, m, own, targets, names=order, transforms=transform_list,
                robust_scenarios=robust, progress=progress, **grid,
            )  # fmt: skip
            add(df, spec.label, spec.label)
        # 3. Transfer: the same protected images, edited by every other editor.
        for other in all_targets:
            if other.label == spec.label or not protected:
                continue
            df = evaluate_grid(
                editor_of(other), x, m, protected, targets, names=order, transforms=["none"],
                progress=progress, **grid,
            )  # fmt: skip
            add(df, spec.label, other.label)
    per_edit = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(per_edit):
        per_edit["content"] = per_edit["name"].map(content)
        first = ["source", "editor", "method", "name", "content", "transform", "scenario"]
        per_edit = per_edit[first + [c for c in per_edit.columns if c not in first]]
    return per_edit, pd.DataFrame(log)


# ------------------------------------------------------------------------------- tables


def _mean_table(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    cols = {
        "n_images": ("name", "nunique"),
        "hit_rate_clean": ("hit_clean", "mean"),
        "hit_rate_protected": ("hit_protected", "mean"),
        "hit_fraction_protected": ("hit_fraction_protected", "mean"),
        "ssim_vs_clean_edit": ("ssim_vs_clean_edit", "mean"),
        "ssim_region_vs_clean_edit": ("ssim_region_vs_clean_edit", "mean"),
    }
    return df.groupby(by, sort=False).agg(**cols).reset_index()


def _own(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Rows edited by the editor the protection was optimised against."""
    return per_edit[per_edit["source"] == per_edit["editor"]]


def fair_mask_table(per_edit: pd.DataFrame) -> pd.DataFrame:
    """The backdoor under every scenario, official and fair, without transformation."""
    d = _own(per_edit)
    d = d[(d["method"] == "backdoor") & (d["transform"] == "none")]
    return _mean_table(d, ["source", "kind", "family", "scenario"])


def robustness_table(per_edit: pd.DataFrame, methods=("backdoor",)) -> pd.DataFrame:
    """Per transformation: malicious hit rate, its survival (share of the untransformed rate)
    and the benign side effects, over the scenarios run under every transformation."""
    d = _own(per_edit)
    d = d[d["method"].isin(methods)]
    robust = set(d.loc[d["transform"] != "none", "scenario"])
    d = d[d["scenario"].isin(robust)] if robust else d
    keys = ["source", "method", "kind"]
    t = _mean_table(d, [*keys, "transform"])
    base = t.loc[t["transform"] == "none", [*keys, "hit_rate_protected"]]
    t = t.merge(base.rename(columns={"hit_rate_protected": "_base"}), on=keys, how="left")
    t["survival"] = (t["hit_rate_protected"] / t["_base"]).where(t["_base"] > 0)
    return t.drop(columns="_base")


def eot_table(per_edit: pd.DataFrame, protection: pd.DataFrame) -> pd.DataFrame:
    """Backdoor with and without EOT on the same images: robustness gained, cost paid."""
    eot = per_edit[(per_edit["method"] == "backdoor_eot")]
    names = set(eot["name"])
    d = per_edit[per_edit["name"].isin(names)]
    t = robustness_table(d, methods=("backdoor", "backdoor_eot"))
    ok = protection[(protection["status"] == "ok") & protection["name"].isin(names)]
    cost = ok.groupby(["source", "method"])["seconds"].mean().rename("seconds_per_image")
    return t.merge(cost.reset_index(), on=["source", "method"], how="left")


def baseline_table(per_edit: pd.DataFrame, protection: pd.DataFrame) -> pd.DataFrame:
    """Every method on the same images and editor, no transformation, by scenario group.

    Methods that do not apply to an editor get a row with ``status`` "n/a".
    """
    d = _own(per_edit)
    d = d[d["transform"] == "none"]
    names = set(d.loc[d["method"] != "backdoor", "name"]) or set(d["name"])
    d = d[d["name"].isin(names)]
    t = _mean_table(d, ["source", "method", "kind", "family"])
    t["status"] = "ok"
    na = protection[protection["status"].str.startswith("n/a")][["source", "method", "status"]]
    na = na.drop_duplicates(["source", "method"])
    return pd.concat([t, na], ignore_index=True)


def transfer_table(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Protect against ``source``, edit with ``editor``: hit rate and SSIM by kind."""
    d = per_edit[per_edit["transform"] == "none"]
    names = set(d.loc[d["source"] != d["editor"], "name"])
    d = d[d["name"].isin(names) & (d["family"] == "official")]
    return _mean_table(d, ["method", "source", "editor", "kind"])


def summarize(per_edit: pd.DataFrame, protection: pd.DataFrame) -> dict:
    """The flat ``reports/beyond/metrics.json``."""
    out: dict = {"n_edits": int(len(per_edit))}
    if not len(per_edit):
        return out
    key = lambda *parts: "_".join(str(p).replace("-", "_").replace(":", "") for p in parts)  # noqa: E731
    for r in fair_mask_table(per_edit).itertuples():
        out[key(r.source, "backdoor", r.scenario, "hit_rate")] = float(r.hit_rate_protected)
        out[key(r.source, "backdoor", r.scenario, "ssim_region")] = float(
            r.ssim_region_vs_clean_edit
        )
    for r in robustness_table(per_edit, methods=list(per_edit["method"].unique())).itertuples():
        out[key(r.source, r.method, r.kind, r.transform, "hit_rate")] = float(r.hit_rate_protected)
    for r in baseline_table(per_edit, protection).itertuples():
        if r.status == "ok":
            out[key(r.source, r.method, r.kind, r.family, "ssim_region")] = float(
                r.ssim_region_vs_clean_edit
            )
    for r in transfer_table(per_edit).itertuples():
        if r.source != r.editor:
            out[key("transfer", r.method, r.source, "to", r.editor, r.kind, "hit_rate")] = float(
                r.hit_rate_protected
            )
    ok = protection[protection["status"] == "ok"]
    for (source, method), g in ok.groupby(["source", "method"]):
        out[key(source, method, "seconds_per_image")] = float(g["seconds"].mean())
        out[key(source, method, "linf_8bit_max")] = float(g["linf_8bit"].max())
    return out


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def markdown(per_edit: pd.DataFrame, protection: pd.DataFrame) -> str:
    """``reports/beyond/results.md``: the five tables, compact."""
    lines = ["# Beyond the paper: fair masks, robustness, EOT, baselines, transfer", ""]
    lines += [
        "Hit = at least the set share of the edited region within the tolerance of the target",
        "colour; SSIM (region) = SSIM of the protected image's edit against the same edit of the",
        "clean image, over the edited region (1 = no change). Malicious edits: want a high hit",
        "rate / low SSIM; benign edits: want a 0% hit rate / SSIM near 1.",
        "",
        "## Fair masks (backdoor, no transformation)",
        "",
        "| source | kind | family | scenario | images | hit clean → protected | SSIM region |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in fair_mask_table(per_edit).itertuples():
        lines.append(
            f"| {r.source} | {r.kind} | {r.family} | {r.scenario} | {r.n_images} | "
            f"{_fmt(r.hit_rate_clean, True)} → {_fmt(r.hit_rate_protected, True)} | {_fmt(r.ssim_region_vs_clean_edit)} |"
        )
    lines += [
        "",
        "## Robustness (backdoor; transformation applied to the image before editing)",
        "",
        "| source | transform | images | malicious hit | survival | malicious SSIM region | benign hit | benign SSIM region |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rob = robustness_table(per_edit)
    for (source, transform), g in rob.groupby(["source", "transform"], sort=False):
        mal, ben = g[g["kind"] == "malicious"], g[g["kind"] == "benign"]
        get = lambda d, c: d[c].iloc[0] if len(d) else None  # noqa: E731
        lines.append(
            f"| {source} | {transform} | {get(g, 'n_images')} | {_fmt(get(mal, 'hit_rate_protected'), True)} | "
            f"{_fmt(get(mal, 'survival'), True)} | {_fmt(get(mal, 'ssim_region_vs_clean_edit'))} | "
            f"{_fmt(get(ben, 'hit_rate_protected'), True)} | {_fmt(get(ben, 'ssim_region_vs_clean_edit'))} |"
        )
    if (per_edit["method"] == "backdoor_eot").any():
        lines += [
            "",
            "## EOT: what it buys and costs (same images)",
            "",
            "| source | transform | malicious hit: backdoor → EOT | benign SSIM region: backdoor → EOT |",
            "|---|---|---|---|",
        ]
        t = eot_table(per_edit, protection)
        for (source, transform), g in t.groupby(["source", "transform"], sort=False):

            def cell(kind, col, pct, g=g):
                vals = [
                    g[(g["kind"] == kind) & (g["method"] == m)][col]
                    for m in ("backdoor", "backdoor_eot")
                ]
                return " → ".join(_fmt(v.iloc[0] if len(v) else None, pct) for v in vals)

            lines.append(
                f"| {source} | {transform} | {cell('malicious', 'hit_rate_protected', True)} | "
                f"{cell('benign', 'ssim_region_vs_clean_edit', False)} |"
            )
        cost = t.drop_duplicates(["source", "method"])[["source", "method", "seconds_per_image"]]
        lines.append("")
        lines.append(
            "Cost (s per image): "
            + "; ".join(
                f"{r.source} {r.method} {r.seconds_per_image:.2f}" for r in cost.itertuples()
            )
            + "."
        )
    lines += [
        "",
        "## Methods side by side (same images, editor and budget; no transformation)",
        "",
        "| source | method | malicious hit (official / fair) | malicious SSIM region (official / fair) | benign hit (official / fair) | benign SSIM region (official / fair) |",
        "|---|---|---|---|---|---|",
    ]
    base = baseline_table(per_edit, protection)
    for (source, method), g in base.groupby(["source", "method"], sort=False):
        if (g["status"] != "ok").all():
            lines.append(f"| {source} | {method} | not applicable | | | |")
            continue

        def pair(kind, col, pct, g=g):
            vals = [g[(g["kind"] == kind) & (g["family"] == f)][col] for f in ("official", "fair")]
            return " / ".join(_fmt(v.iloc[0] if len(v) else None, pct) for v in vals)

        lines.append(
            f"| {source} | {method} | {pair('malicious', 'hit_rate_protected', True)} | "
            f"{pair('malicious', 'ssim_region_vs_clean_edit', False)} | {pair('benign', 'hit_rate_protected', True)} | "
            f"{pair('benign', 'ssim_region_vs_clean_edit', False)} |"
        )
    tr = transfer_table(per_edit)
    if len(tr):
        editors = list(dict.fromkeys(tr["editor"]))
        lines += [
            "",
            "## Transfer (official scenarios, no transformation): malicious hit rate / benign SSIM region",
            "",
            "| method | protected against ↓ / edited with → | " + " | ".join(editors) + " |",
            "|---|---|" + "---|" * len(editors),
        ]
        for (method, source), g in tr.groupby(["method", "source"], sort=False):
            cells = []
            for e in editors:
                mal = g[(g["editor"] == e) & (g["kind"] == "malicious")]["hit_rate_protected"]
                ben = g[(g["editor"] == e) & (g["kind"] == "benign")]["ssim_region_vs_clean_edit"]
                cells.append(
                    f"{_fmt(mal.iloc[0] if len(mal) else None, True)} / {_fmt(ben.iloc[0] if len(ben) else None)}"
                )
            lines.append(f"| {method} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- figures


def _compared(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Rows of the images every method was run on (the subset), so that bars compare alike."""
    names = set(per_edit.loc[per_edit["method"] != "backdoor", "name"]) or set(per_edit["name"])
    return per_edit[per_edit["name"].isin(names)]


def _bars(t: pd.DataFrame, x: str, panels, title: str):
    """Two rows of bar panels (one column per source editor) with one legend for the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sources = list(dict.fromkeys(t["source"]))
    hue_order = list(dict.fromkeys(t["method"]))
    fig, axes = plt.subplots(2, len(sources), figsize=(5.5 * len(sources), 6.6), squeeze=False)
    for c, source in enumerate(sources):
        for r, (select, col, label) in enumerate(panels):
            ax = axes[r, c]
            d = t[(t["source"] == source) & select(t)]
            sns.barplot(data=d, x=x, y=col, hue="method", hue_order=hue_order, ax=ax)
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
    import matplotlib.pyplot as plt
    import seaborn as sns

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
    import matplotlib.pyplot as plt

    _, x, m = study.load_prepared(prepared_dir, names)
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


__all__ = [
    "ALL_SCENARIOS",
    "BENIGN",
    "EDITOR_KINDS",
    "MALICIOUS",
    "EditorSpec",
    "Transform",
    "baseline_plot",
    "baseline_table",
    "build_from_spec",
    "eot_table",
    "evaluate_grid",
    "fair_mask_figure",
    "fair_mask_table",
    "hit_fraction",
    "markdown",
    "parse_editor_spec",
    "parse_editor_specs",
    "robustness_plot",
    "robustness_table",
    "run",
    "scenario_masks",
    "reduce_ssim",
    "ssim_batch",
    "ssim_map",
    "subset_names",
    "summarize",
    "tiny_sd_editor",
    "transfer_plot",
    "transfer_table",
]
