"""Target images ``φ`` the backdoor fills the protected region with."""

from __future__ import annotations

import torch

#: Candidate solid colours in the official order: green, red, blue.
SOLID_COLOURS = {"green": (0.0, 1.0, 0.0), "red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0)}

TARGET_KINDS = ("solid", "anti")


def solid_colour(image: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Per image, the candidate colour farthest (squared distance) from its mean colour.

    Returns the colours (B, 3) and their names. As in the official scripts, the mean
    colour is truncated to whole 8-bit values first (``astype(int)``) and ties go to
    the earlier candidate (green, then red, then blue): for near-grey images the
    truncation decides the tie.
    """
    # + 1e-3: a mean that is a whole 8-bit value must not truncate to the one below.
    mean = torch.floor(image.mean(dim=(2, 3)) * 255 + 1e-3) / 255  # (B, 3)
    candidates = torch.tensor(list(SOLID_COLOURS.values()), dtype=image.dtype, device=image.device)
    dist = ((mean[:, None, :] - candidates[None]) ** 2).sum(-1)  # (B, 3)
    # argmax returns the first maximum: the official tie-break.
    index = dist.argmax(dim=1)
    names = list(SOLID_COLOURS)
    return candidates[index], [names[int(i)] for i in index]


def make_target(image: torch.Tensor, kind: str | torch.Tensor = "solid") -> torch.Tensor:
    """The target ``φ`` (B, 3, H, W) for ``image`` (B, 3, H, W).

    ``kind`` is ``"solid"`` (the paper's default), ``"anti"`` (the inverted
    image ``1 - x``), or a user-supplied image tensor (3, H, W) or (B, 3, H, W).
    """
    if isinstance(kind, torch.Tensor):
        target = kind.to(image.device, image.dtype)
        if target.ndim == 3:
            target = target.unsqueeze(0)
        if target.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"target image of shape {tuple(target.shape)} does not match image {tuple(image.shape)}"
            )
        return target.expand_as(image).clone()
    if kind == "solid":
        colours, _ = solid_colour(image)
        return colours[:, :, None, None].expand_as(image).clone()
    if kind == "anti":
        return 1 - image
    raise ValueError(f"unknown target {kind!r}: use one of {TARGET_KINDS} or an image")
