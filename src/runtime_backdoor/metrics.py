"""Image-quality and protection metrics.

Per-image metrics take numpy float arrays ``H x W x 3`` in [0, 1] (the primary form) or torch
tensors ``3 x H x W`` / ``1 x 3 x H x W``; masks are bool/0-1 arrays ``H x W`` (torch: also
``1 x H x W`` / ``1 x 1 x H x W``), True = pixel counted (:mod:`runtime_backdoor.image_inputs`).

The metrics computed on pretrained networks' features (the Fréchet distance, CLIP-FID, LPIPS)
are defined in :mod:`runtime_backdoor.feature_metrics` and importable from here too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .feature_metrics import (
    CLIP_MODEL,  # noqa: F401 (re-exported)
    CLIP_WEIGHTS_ENV,
    DEFAULT_CLIP_DIR,
    FID,
    LPIPS_BACKBONES,  # noqa: F401 (re-exported: tests/editors/test_registry.py)
    ClipFeatures,
    ClipUnavailable,
    LpipsUnavailable,
    clip_features,
    clip_fid,
    feature_stats,
    fid_from_features,
    frechet_distance,
    load_clip,
    load_lpips,
    lpips_batch,
    lpips_distance,
    try_load_clip,
)
from .image_inputs import _RANGE_TOL, _as_hwc, _as_mask, _pair

__all__ = [
    "CLIP_WEIGHTS_ENV",
    "DEFAULT_CLIP_DIR",
    "ClipFeatures",
    "ClipUnavailable",
    "FID",
    "clip_features",
    "clip_fid",
    "feature_stats",
    "fid_from_features",
    "frechet_distance",
    "hit_fraction_batch",
    "hits_batch",
    "linf",
    "linf_8bit",
    "load_clip",
    "load_lpips",
    "lpips_batch",
    "lpips_distance",
    "LpipsUnavailable",
    "masked_mse",
    "psnr",
    "psnr_batch",
    "reduce_ssim",
    "ssim",
    "ssim_batch",
    "ssim_map",
    "ssim_reference",
    "target_hit",
    "target_hit_fraction",
    "try_load_clip",
]


# ---------------------------------------------------------------------------------------------
# Per-image metrics


def masked_mse(a, b, mask) -> float:
    """Mean squared error over the pixels where ``mask`` is True and all 3 channels."""
    a, b = _pair(a, b)
    m = _as_mask(mask, a.shape[:2])
    if not m.any():
        raise ValueError("mask is empty: the masked MSE is undefined")
    return float(np.mean((a[m] - b[m]) ** 2))


def psnr(a, b, mask=None) -> float:
    """PSNR in dB for data range 1: ``10 log10(1 / MSE)``; MSE over ``mask`` pixels if given.

    ``inf`` for identical images.
    """
    if mask is None:
        a, b = _pair(a, b)
        mse = float(np.mean((a - b) ** 2))
    else:
        mse = masked_mse(a, b, mask)
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def ssim(a, b, mask=None) -> float:
    """Mean SSIM (scikit-image ``structural_similarity``, ``channel_axis=2``, ``data_range=1``).

    scikit-image defaults: 7 x 7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance; each
    channel separately, then averaged. Without ``mask`` the mean excludes a 3-px border (as
    scikit-image does); with ``mask`` it is the mean of the SSIM map over the mask pixels.
    Images must be at least 7 x 7. :func:`ssim_batch` is the same for batches of tensors.
    """
    from skimage.metrics import structural_similarity

    a, b = _pair(a, b)
    if min(a.shape[:2]) < 7:
        raise ValueError(f"SSIM needs images of at least 7 x 7 px, got {a.shape[:2]}")
    if mask is None:
        return float(structural_similarity(a, b, channel_axis=2, data_range=1.0))
    m = _as_mask(mask, a.shape[:2])
    if not m.any():
        raise ValueError("mask is empty: the masked SSIM is undefined")
    _, smap = structural_similarity(a, b, channel_axis=2, data_range=1.0, full=True)
    return float(smap.mean(axis=2)[m].mean())


def _symmetric_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    # scipy.ndimage's "reflect" (edge repeated), which scikit-image's SSIM filter uses
    x = torch.cat([x[..., :p].flip(-1), x, x[..., -p:].flip(-1)], dim=-1)
    return torch.cat([x[..., :p, :].flip(-2), x, x[..., -p:, :].flip(-2)], dim=-2)


def _box_mean(x: torch.Tensor, win: int) -> torch.Tensor:
    """Mean over ``win`` x ``win`` windows of an already padded map (valid positions only)."""
    return F.avg_pool2d(x, win, stride=1)


#: scikit-image's SSIM window (uniform, 7 x 7) and the padding that keeps the image size
SSIM_WIN, SSIM_PAD = 7, 3


def ssim_reference(b: torch.Tensor) -> tuple:
    """What :func:`ssim_map` computes of its second image: to compare several images with one
    reference (every protection's edit with the clean image's) without recomputing it."""
    bp = _symmetric_pad(b.double(), SSIM_PAD)
    return bp, _box_mean(bp, SSIM_WIN), _box_mean(bp * bp, SSIM_WIN)


def ssim_map(a: torch.Tensor, b: torch.Tensor | None = None, reference=None) -> torch.Tensor:
    """(B, 1, H, W) SSIM map of (B, 3, H, W) images, averaged over channels (float64).

    scikit-image's definition, as :func:`ssim` uses it: 7x7 uniform window, sample
    covariance, K1 0.01, K2 0.03, data range 1, symmetric padding. The same numbers as
    :func:`ssim` to rounding (1e-9, tested), computed in torch for whole batches.
    ``reference``: :func:`ssim_reference` of ``b``, given instead of ``b`` (the same numbers,
    bit for bit: every window mean is taken per channel in the same order either way).
    """
    bp, ub, bb = reference if reference is not None else ssim_reference(b)
    ap = _symmetric_pad(a.double(), SSIM_PAD)
    ua, aa, ab = (_box_mean(x, SSIM_WIN) for x in (ap, ap * ap, ap * bp))
    norm = SSIM_WIN * SSIM_WIN / (SSIM_WIN * SSIM_WIN - 1)
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
    """(B,) SSIM of (B, 3, H, W) images: :func:`ssim`, batched (see :func:`ssim_map`)."""
    return reduce_ssim(ssim_map(a, b), mask)


def _target_array(target, shape) -> np.ndarray:
    t = np.asarray(target.detach().cpu() if hasattr(target, "detach") else target)
    if t.shape == (3,):  # a solid colour given as an RGB triple in [0, 1]
        t = np.broadcast_to(t.astype(np.float64), shape)
        if t.min() < -_RANGE_TOL or t.max() > 1 + _RANGE_TOL:
            raise ValueError(f"target colour must be in [0, 1], got {target}")
        return t
    return _as_hwc(target, "target")


def target_hit_fraction(edited, target, mask, tol: float = 0.1) -> float:
    """Share of ``mask`` pixels whose 3 channels are all within ``tol`` of ``target``.

    ``target``: an image like ``edited`` or an RGB triple in [0, 1] (solid colour).
    """
    e = _as_hwc(edited, "edited")
    t = _target_array(target, e.shape)
    if t.shape != e.shape:
        raise ValueError(f"target shape {t.shape} does not match edited {e.shape}")
    m = _as_mask(mask, e.shape[:2])
    if not m.any():
        raise ValueError("mask is empty: the target-hit fraction is undefined")
    hit = np.all(np.abs(e[m] - t[m]) <= tol, axis=1)
    return float(hit.mean())


def target_hit(edited, target, mask, tol: float = 0.1, min_fraction: float = 0.5) -> bool:
    """Whether at least ``min_fraction`` of the mask pixels reached the target (see above)."""
    return target_hit_fraction(edited, target, mask, tol) >= min_fraction


# Batched versions of the reference metrics above (torch, (B, 3, H, W) on any device); the
# stages use these. tests/test_metrics.py checks them against the references.


def hit_fraction_batch(
    edited: torch.Tensor, target: torch.Tensor, region: torch.Tensor, tol: float = 0.1
) -> torch.Tensor:
    """(B,) :func:`target_hit_fraction` of a batch: the share of ``region``'s pixels (a 0/1
    (B, 1, H, W) mask) whose 3 channels are all within ``tol`` of ``target`` (B, 3, H, W).

    Computed in the inputs' dtype: float64 inputs give the reference bit for bit; float32
    inputs compare in float32 (``tol`` rounded to float32, which for 0.1 is what the stages'
    former ``<= tol + 1e-9`` was in float32 too). An empty region gives 0 (the reference
    raises).
    """
    on = ((edited - target).abs().amax(1, keepdim=True) <= tol).to(region.dtype)
    return (on * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)


def hits_batch(
    edited: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor,
    tol: float = 0.1,
    min_fraction: float = 0.5,
) -> torch.Tensor:
    """(B,) bool :func:`target_hit` of a batch: at least ``min_fraction`` of the region on
    target (:func:`hit_fraction_batch`)."""
    return hit_fraction_batch(edited, target, region, tol) >= min_fraction


def psnr_batch(a: torch.Tensor, b: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """(B,) float64 :func:`psnr` of (B, 3, H, W) images (data range 1), capped at ``cap`` dB
    (identical images: ``cap``, where the reference gives inf). The MSE is a float64 mean in
    torch's summation order: it matches the reference to ~1e-12 dB, not bit for bit."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-30))).clamp(max=cap)


def linf(a, b, mask=None) -> float:
    """Largest absolute difference over pixels (``mask`` pixels if given) and channels, in [0, 1]."""
    a, b = _pair(a, b)
    d = np.abs(a - b)
    if mask is not None:
        m = _as_mask(mask, a.shape[:2])
        if not m.any():
            raise ValueError("mask is empty: the masked L-inf distance is undefined")
        d = d[m]
    return float(d.max())


def linf_8bit(a, b, mask=None) -> float:
    """``linf`` in 8-bit units (x 255): ε = 0.025 is 6.375."""
    return linf(a, b, mask) * 255.0
