"""Stage ``evaluate``: metrics per edit, the protection's imperceptibility, CLIP-FID and the flat
``reports/metrics.json`` (means over images with 95 % intervals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import metrics as Q
from ..data import read_folder, read_image, read_mask, write_csv, write_json
from ..masks import MALICIOUS, SCENARIOS
from ..project import resolve_device
from ..stats import estimate
from ..summaries import write_headline


def _colour(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split(",")]) / 255


def evaluate_folder(
    prepared_dir,
    protected_dir,
    edited_dir,
    *,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    lpips_model=None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per image and scenario metrics, and the protection's own imperceptibility.

    References, stated once: ``*_vs_clean_edit`` compares the edit of the protected
    image with the same edit of the clean image, over the whole image or (``*_region_*``)
    over the edited region only (low under malicious edits = the protection works; high
    under benign edits = no side effect). ``target_*`` compare
    the edited region with the image's target colour. ``hit`` = at least
    ``hit_min_fraction`` of the edited region within ``hit_tol`` of the target in every
    channel. Imperceptibility compares the protected image with the original.
    With ``lpips_model`` (:func:`runtime_backdoor.metrics.load_lpips`) the LPIPS columns are
    added: ``lpips_vs_clean_edit`` (whole image), ``lpips_region_vs_clean_edit`` and the
    protection's ``lpips`` against the original.
    """
    prepared_dir, protected_dir, edited_dir = map(Path, (prepared_dir, protected_dir, edited_dir))
    protected = read_folder(protected_dir).set_index("name")
    edits = read_folder(edited_dir)
    rows = []
    for rec in edits.to_dict("records"):
        name, scenario = rec["name"], rec["scenario"]
        stem = f"{name}__{scenario}.png"
        original = read_image(prepared_dir / f"{name}.png")
        clean = read_image(edited_dir / "clean" / stem)
        prot = read_image(edited_dir / "protected" / stem)
        region = read_mask(edited_dir / "masks" / stem)
        target = np.broadcast_to(_colour(protected.loc[name, "target"]), original.shape)
        row = dict(rec)
        row["ssim_vs_clean_edit"] = Q.ssim(prot, clean)
        row["psnr_vs_clean_edit"] = Q.psnr(prot, clean)
        # The same comparison inside the edited region only, where the fill is.
        row["ssim_region_vs_clean_edit"] = Q.ssim(prot, clean, region)
        row["psnr_region_vs_clean_edit"] = Q.psnr(prot, clean, region)
        if lpips_model is not None:
            row["lpips_vs_clean_edit"] = Q.lpips_distance(prot, clean, lpips_model)
            row["lpips_region_vs_clean_edit"] = Q.lpips_distance(prot, clean, lpips_model, region)
        for label, img in (("clean", clean), ("protected", prot)):
            row[f"ssim_vs_original_{label}"] = Q.ssim(img, original)
            row[f"target_mse_{label}"] = Q.masked_mse(img, target, region)
            frac = Q.target_hit_fraction(img, target, region, tol=hit_tol)
            row[f"hit_fraction_{label}"] = frac
            row[f"hit_{label}"] = bool(frac >= hit_min_fraction)
        rows.append(row)
    per_edit = pd.DataFrame(rows)
    imp = []
    for name in protected.index:
        a = read_image(prepared_dir / f"{name}.png")
        b = read_image(protected_dir / f"{name}.png")
        imp.append(
            {
                "name": name,
                "content": protected.loc[name, "content"],
                "psnr": Q.psnr(b, a),
                "ssim": Q.ssim(b, a),
                "linf_8bit": float(np.abs(b - a).max() * 255),
                "seconds": float(protected.loc[name, "seconds"]),
            }
            | ({"lpips": Q.lpips_distance(b, a, lpips_model)} if lpips_model is not None else {})
        )
    return per_edit, pd.DataFrame(imp)


def clip_fid_by_scenario(
    prepared_dir, edited_dir, weights: str | None, device="cpu", resamples: int = 200
) -> dict:
    """CLIP-FID of edited outputs against the original images, per scenario and condition.

    The reference set is the prepared originals; both sets hold the same ``n_images`` images.
    Features and the Fréchet distance are clean-fid's ``clip_vit_b_32`` (:class:`metrics.ClipFeatures`).
    CLIP-FID is set-level and unstable with few images (n below the 512 feature dimensions makes
    the covariances singular and biases it upwards): ``_low``/``_high`` are the 2.5/97.5
    percentiles over ``resamples`` resamplings of the images (with replacement, the same images
    in both sets, seeded). Needs pretrained CLIP ViT-B/32 weights; without them returns
    ``{"available": False, "reason": ...}`` — never a number from random weights.
    """
    try:
        model = Q.load_clip(weights, device=device)
    except Q.ClipUnavailable as err:
        return {"available": False, "reason": str(err)}
    prepared_dir, edited_dir = Path(prepared_dir), Path(edited_dir)
    edits = read_folder(edited_dir)
    names = sorted(edits["name"].unique())
    originals = Q.clip_features([read_image(prepared_dir / f"{n}.png") for n in names], model)
    out: dict = {
        "available": True, "n_images": len(names), "reference": "prepared originals",
        "features": f"clean-fid clip_vit_b_32 preprocessing, open_clip {model.model_name} ({model.weights})",
        "resamples": resamples,
    }  # fmt: skip
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(names), len(names)) for _ in range(resamples)]
    for scenario in SCENARIOS:
        for label in ("clean", "protected"):
            imgs = [read_image(edited_dir / label / f"{n}__{scenario}.png") for n in names]
            feats = Q.clip_features(imgs, model)
            key = f"{scenario}_{label}"
            out[key] = Q.fid_from_features(feats, originals)
            spread = [Q.fid_from_features(feats[d], originals[d]) for d in draws]
            out[f"{key}_low"], out[f"{key}_high"] = (
                float(v) for v in np.percentile(spread, [2.5, 97.5])
            )
    return out


def summarize(per_edit: pd.DataFrame, imperceptibility: pd.DataFrame, clip: dict) -> dict:
    """The flat ``reports/metrics.json`` (DVC metrics): means over images."""
    out: dict = {"n_images": int(imperceptibility.shape[0])}

    def put(name: str, values) -> None:
        """The mean over images and its 95 % interval (``_low``, ``_high``)."""
        e = estimate(np.asarray(values, dtype=float))
        out[name], out[f"{name}_low"], out[f"{name}_high"] = e.mean, e.low, e.high

    for scenario, g in per_edit.groupby("scenario"):
        kind = "malicious" if scenario in MALICIOUS else "benign"
        key = f"{kind}_{scenario}"
        for label in ("clean", "protected"):
            put(f"{key}_hit_rate_{label}", g[f"hit_{label}"])
            put(f"{key}_hit_fraction_{label}", g[f"hit_fraction_{label}"])
            put(f"{key}_ssim_vs_original_{label}", g[f"ssim_vs_original_{label}"])
        put(f"{key}_ssim_vs_clean_edit", g["ssim_vs_clean_edit"])
        put(f"{key}_ssim_region_vs_clean_edit", g["ssim_region_vs_clean_edit"])
        put(f"{key}_target_mse_clean", g["target_mse_clean"])
        put(f"{key}_target_mse_protected", g["target_mse_protected"])
        # An identical edit has infinite PSNR: counted as 100 dB so that means stay finite.
        finite = g["psnr_vs_clean_edit"].replace(np.inf, 100.0)
        put(f"{key}_psnr_vs_clean_edit", finite)
        out[f"{key}_psnr_vs_clean_edit_min"] = float(finite.min())
        put(
            f"{key}_psnr_region_vs_clean_edit",
            g["psnr_region_vs_clean_edit"].replace(np.inf, 100.0),
        )
        for column in ("lpips_vs_clean_edit", "lpips_region_vs_clean_edit"):
            if column in g:
                put(f"{key}_{column}", g[column])
    put("protection_psnr", imperceptibility["psnr"])
    out["protection_psnr_min"] = float(imperceptibility["psnr"].min())
    put("protection_ssim", imperceptibility["ssim"])
    out["lpips_available"] = "lpips" in imperceptibility
    if out["lpips_available"]:
        put("protection_lpips", imperceptibility["lpips"])
    out["protection_linf_8bit_max"] = float(imperceptibility["linf_8bit"].max())
    out["protection_seconds_per_image"] = float(imperceptibility["seconds"].mean())
    out["clip_fid_available"] = bool(clip.get("available", False))
    for k, v in clip.items():
        if k not in ("available", "reason", "reference", "features"):
            out[f"clip_fid_{k}"] = v
    return out


def run(
    reports_dir="reports",
    *,
    prepared_dir="data/prepared",
    protected_dir="data/protected",
    edited_dir="data/edited",
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    clip_weights: str = "",
    lpips_backbone: str = "",
    device: str = "auto",
) -> dict:
    """The stage: ``per_edit.csv``, ``imperceptibility.csv``, ``clip_fid.json``, ``metrics.json``.

    ``lpips_backbone``: torchvision AlexNet weights for LPIPS-alex ("" = none); without them the
    LPIPS columns are absent and ``metrics.json`` says why (``lpips_unavailable``)."""
    dev = resolve_device(device)
    lpips_model, lpips_reason = None, "no backbone given (evaluate.lpips_backbone)"
    if lpips_backbone:
        try:
            lpips_model = Q.load_lpips("alex", lpips_backbone, device=dev)
        except Q.LpipsUnavailable as err:
            print(f"LPIPS unavailable: {err}")
            lpips_reason = "no backbone: runtime-backdoor weights fetch lpips-alex"
    per_edit, imperceptibility = evaluate_folder(
        prepared_dir, protected_dir, edited_dir, hit_tol=hit_tol,
        hit_min_fraction=hit_min_fraction, lpips_model=lpips_model,
    )  # fmt: skip
    clip = clip_fid_by_scenario(prepared_dir, edited_dir, clip_weights or None, device=dev)
    summary = summarize(per_edit, imperceptibility, clip)
    if lpips_model is None:
        summary["lpips_unavailable"] = lpips_reason  # short: metrics.json holds flat values
    reports = Path(reports_dir)
    write_csv(reports / "per_edit.csv", per_edit)
    write_csv(reports / "imperceptibility.csv", imperceptibility)
    write_json(reports / "clip_fid.json", clip)
    write_json(reports / "metrics.json", summary)
    write_headline(reports / "headline.json", summary, "evaluate")  # what `dvc metrics show` shows
    return {
        "per_edit": per_edit,
        "imperceptibility": imperceptibility,
        "clip": clip,
        "summary": summary,
    }
