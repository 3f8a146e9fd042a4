"""Composed classical purifiers: ``step+step+...`` specs (:func:`runtime_backdoor.transforms.
parse_chain`) run one step after the other, each step storing its result in 8 bits.

The two chains of the ``purify`` stage's candidates (:data:`CHAINS`):

- ``jpeg:75+lanczos:0.5``: a JPEG round trip at quality 75, then a 0.5× Lanczos downscale and
  a Lanczos resize back to the size for the editor (the re-encoding chain of Sun et al. 2026,
  arXiv 2604.23688);
- ``resize:0.75+jpeg:90``: a screenshot-like rescale (0.75×, bicubic, and back) then a JPEG
  re-encode at quality 90.

Resizes are PIL's (``Image.LANCZOS`` / ``Image.BICUBIC``, antialiased on the way down), sizes
rounded to the nearest pixel (at least 1); JPEG is PIL's at 4:2:0 chroma subsampling
(:func:`runtime_backdoor.robustness.jpeg`). Every step keeps the geometry, so a chain maps
masks and references like the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .robustness import _from_pil, _pil_images

#: candidate chains for ``purify.purifiers`` (not in the stage's default suite)
CHAINS = ("jpeg:75+lanczos:0.5", "resize:0.75+jpeg:90")


def lanczos_back(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Downscale by ``scale`` and back to the original size (PIL Lanczos), 8-bit."""
    if not 0 < scale <= 1:
        raise ValueError(f"lanczos scale must be in (0, 1], got {scale}")
    h, w = image.shape[-2:]
    small = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = [
        im.resize(small, Image.LANCZOS).resize((w, h), Image.LANCZOS) for im in _pil_images(image)
    ]
    return _from_pil(out, image)


def compose(image: torch.Tensor, steps: Sequence[Callable]) -> torch.Tensor:
    """``steps`` applied in order (each one ``image -> 8-bit image``)."""
    for step in steps:
        image = step(image)
    return image


__all__ = ["CHAINS", "compose", "lanczos_back"]
