"""The editor interface every inpainting model in this package implements.

An editor is a frozen, differentiable ``torch.nn.Module``::

    edited = editor(image, mask)

- ``image``: (B, 3, H, W) float in [0, 1]
- ``mask``:  (B, 1, H, W) float, 1 = pixels to fill, 0 = pixels to keep
- ``edited``: (B, 3, H, W) in [0, 1], ``mask * fill + (1 - mask) * image``

Subclasses implement :meth:`Editor.predict` at a size that is a multiple of
``size_multiple``; padding to that multiple, cropping back and compositing are
done here, once, so that every editor treats borders and known pixels alike.
Gradients flow from ``edited`` back to ``image`` (the run-time backdoor needs
them); device and dtype follow the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_image_mask(image: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``image``/``mask`` follow the editor interface."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    if image.shape[0] != mask.shape[0] or image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and mask {tuple(mask.shape)} differ in batch or size"
        )


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> torch.Tensor:
    """Pad the bottom/right of ``x`` (B, C, H, W) so H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    if mode == "reflect" and (pad_h >= h or pad_w >= w):
        mode = "replicate"  # reflect needs the pad to be smaller than the side
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


class Editor(nn.Module):
    """Base class: pads, calls :meth:`predict`, crops and composites."""

    #: name in the editor registry (``runtime_backdoor.editors.EDITORS``)
    name: str = "editor"
    #: ``predict`` receives images whose height and width are multiples of this
    size_multiple: int = 1

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the model's raw output (B, 3, H', W') for padded inputs.

        ``image`` still holds the original pixels inside the hole: an editor
        that expects the hole blanked out blanks it itself (``image * (1 - mask)``).
        """
        raise NotImplementedError

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_image_mask(image, mask)
        mask = mask.to(image.dtype)
        h, w = image.shape[-2:]
        m = self.size_multiple
        pred = self.predict(pad_to_multiple(image, m), pad_to_multiple(mask, m, mode="constant"))
        pred = pred[..., :h, :w]
        return mask * pred + (1 - mask) * image


def state_dict_problems(state: dict, expected: dict, shown: int = 5) -> list[str]:
    """What keeps ``state`` (name -> tensor) from loading strictly into ``expected``
    (name -> shape): missing, unexpected and wrong-shape entries, a few of each named."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    return [
        f"{label} ({len(keys)}): {', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if keys
    ]
