"""AdverseCleaner (lllyasviel, 2023): the classical purifier ``adverse-cleaner``.

64 bilateral filters (diameter 5, σ_color 8, σ_space 8, in 8-bit units), then 4 guided filters
(radius 4, eps 16 in 8-bit² units) guided by the input, in OpenCV (``cv2.bilateralFilter``,
``cv2.ximgproc.guidedFilter``) on float images in [0, 255]; the result is rounded to 8 bits
(AdverseCleaner truncates). :mod:`runtime_backdoor.purifiers` names it in its suite.
"""

from __future__ import annotations

import numpy as np
import torch

from .robustness import to_8bit

# AdverseCleaner's settings (8-bit units)
BILATERAL_PASSES, BILATERAL_DIAMETER, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE = 64, 5, 8.0, 8.0
GUIDED_PASSES, GUIDED_RADIUS, GUIDED_EPS = 4, 4, 16.0


def bilateral_passes(
    image: np.ndarray,
    passes: int = BILATERAL_PASSES,
    diameter: int = BILATERAL_DIAMETER,
    sigma_color: float = BILATERAL_SIGMA_COLOR,
    sigma_space: float = BILATERAL_SIGMA_SPACE,
) -> np.ndarray:
    """``passes`` OpenCV bilateral filters of an H x W x 3 float32 image in [0, 255]."""
    import cv2

    y = np.ascontiguousarray(image, dtype=np.float32)
    for _ in range(passes):
        y = cv2.bilateralFilter(y, diameter, sigma_color, sigma_space)
    return y


def guided_passes(
    guide: np.ndarray,
    image: np.ndarray,
    passes: int = GUIDED_PASSES,
    radius: int = GUIDED_RADIUS,
    eps: float = GUIDED_EPS,
) -> np.ndarray:
    """``passes`` OpenCV guided filters of ``image`` guided by ``guide`` (float32, [0, 255])."""
    import cv2

    g = np.ascontiguousarray(guide, dtype=np.float32)
    y = np.ascontiguousarray(image, dtype=np.float32)
    for _ in range(passes):
        y = cv2.ximgproc.guidedFilter(g, y, radius, eps)
    return y


def adverse_cleaner(
    image: torch.Tensor,
    bilateral: int = BILATERAL_PASSES,
    diameter: int = BILATERAL_DIAMETER,
    sigma_color: float = BILATERAL_SIGMA_COLOR,
    sigma_space: float = BILATERAL_SIGMA_SPACE,
    guided: int = GUIDED_PASSES,
    radius: int = GUIDED_RADIUS,
    eps: float = GUIDED_EPS,
) -> torch.Tensor:
    """AdverseCleaner: bilateral filters, then guided filters guided by the input (8-bit units)."""
    arr = (to_8bit(image) * 255).permute(0, 2, 3, 1).detach().cpu().numpy().astype(np.float32)
    out = []
    for a in arr:
        y = bilateral_passes(a, bilateral, diameter, sigma_color, sigma_space)
        out.append(guided_passes(a, y, guided, radius, eps))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255
    return to_8bit(y.to(image.device, image.dtype))
