"""Input conversion shared by the metrics: images and masks as checked numpy arrays.

Images: numpy float arrays ``H x W x 3`` in [0, 1] or torch tensors ``3 x H x W`` /
``1 x 3 x H x W``; masks: bool/0-1 arrays ``H x W`` (torch: also ``1 x H x W`` /
``1 x 1 x H x W``). :mod:`runtime_backdoor.metrics` and
:mod:`runtime_backdoor.feature_metrics` read their inputs through these.
"""

from __future__ import annotations

import numpy as np

_RANGE_TOL = 1e-4  # float rounding slack on the [0, 1] range check


def _as_hwc(x, name: str = "image") -> np.ndarray:
    """numpy ``H x W x 3`` or torch ``(1 x) 3 x H x W`` -> float64 ``H x W x 3`` in [0, 1]."""
    if hasattr(x, "detach"):  # torch: channels first, as everywhere else in this package
        t = x.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"{name}: expected a 3 x H x W tensor, got shape {tuple(t.shape)}")
        a = t.permute(1, 2, 0).double().numpy()
    else:
        a = np.asarray(x)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"{name}: expected an H x W x 3 array, got shape {a.shape}")
        if a.dtype == np.uint8:
            raise ValueError(f"{name}: uint8 array; convert to float in [0, 1] (x / 255) first")
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"{name}: values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return a


def _as_mask(m, shape, name: str = "mask") -> np.ndarray:
    """Bool ``H x W`` from bool/0-1 numpy or torch (leading singleton axes allowed)."""
    a = m.detach().cpu().numpy() if hasattr(m, "detach") else np.asarray(m)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: shape {a.shape} does not match the image's {tuple(shape)}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name}: expected a binary mask (bool or 0/1 values)")
        a = a.astype(bool)
    return a


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_hwc(a, "a"), _as_hwc(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return a, b
