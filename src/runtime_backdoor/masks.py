"""Masks of the method: protected region ``m``, expansion ``E(m)``, ring ``R``, halves.

All functions take and return float tensors of shape (B, 1, H, W) holding 0/1,
so that the optimizer and the editors can use them directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Box-dilation kernel of the paper (17 x 17: 8 px each side at 512 px).
PAPER_EXPAND_KERNEL = 17

HALF_MODES = ("diagonal", "horizontal", "vertical")


def check_mask(mask: torch.Tensor, name: str = "mask") -> None:
    """Raise ``ValueError`` unless ``mask`` is a binary, non-empty, non-full (B, 1, H, W) mask."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{name} must hold only 0 and 1 (threshold it first)")
    area = mask.flatten(1).sum(1)
    if torch.any(area == 0):
        raise ValueError(
            f"{name} is empty for image(s) {torch.nonzero(area == 0).flatten().tolist()}"
        )
    full = area == mask[0].numel()
    if torch.any(full):
        raise ValueError(
            f"{name} covers the whole image for image(s) {torch.nonzero(full).flatten().tolist()}: "
            "nothing would be left to protect against"
        )


def expand(mask: torch.Tensor, kernel: int = PAPER_EXPAND_KERNEL) -> torch.Tensor:
    """``E(m)``: box dilation with a ``kernel`` x ``kernel`` square (odd, in pixels)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"expansion kernel must be a positive odd number of pixels, got {kernel}")
    return F.max_pool2d(mask, kernel_size=kernel, stride=1, padding=kernel // 2)


def ring(mask: torch.Tensor, kernel: int = PAPER_EXPAND_KERNEL) -> torch.Tensor:
    """``R = clip(E(m) - m, 0, 1)``: the non-trigger band around the protected region."""
    return (expand(mask, kernel) - mask).clamp(0, 1)


def half(mask: torch.Tensor, mode: str = "diagonal") -> torch.Tensor:
    """Keep the first ``floor(n / 2)`` of each mask's ``n`` pixels.

    Pixels are ordered by ``row + column`` (``diagonal``, the official scripts'
    choice), by row (``horizontal``: the top half) or by column (``vertical``:
    the left half); ties keep raster order, so the result is deterministic.
    """
    if mode not in HALF_MODES:
        raise ValueError(f"half-mask mode must be one of {HALF_MODES}, got {mode!r}")
    b, _, h, w = mask.shape
    rows = torch.arange(h, device=mask.device).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=mask.device).view(1, w).expand(h, w)
    key = {"diagonal": rows + cols, "horizontal": rows, "vertical": cols}[mode].flatten()
    # Stable ordering: primary key, then raster index.
    order = torch.argsort(key * (h * w) + torch.arange(h * w, device=mask.device))
    out = torch.zeros_like(mask).flatten(1)
    flat = mask.flatten(1)
    for i in range(b):
        members = order[flat[i, order] > 0.5]
        out[i, members[: members.numel() // 2]] = 1
    return out.view_as(mask)


def incomplete(mask: torch.Tensor, kernel: int = PAPER_EXPAND_KERNEL, mode: str = "diagonal"):
    """The official "incomplete" malicious mask: ``half(m) ∪ half(E(m))``."""
    return torch.maximum(half(mask, mode), half(expand(mask, kernel), mode))


def box_elsewhere(
    mask: torch.Tensor,
    kernel: int = PAPER_EXPAND_KERNEL,
    size: float = 0.2,
    margin: int = 2,
    min_side: int = 4,
) -> torch.Tensor:
    """A square benign mask, ``size`` x the image side, that does not touch ``E(m)``.

    Per image, takes the free position least surrounded by the protected region
    (deterministic); when no square of that side fits, the side shrinks by 3/4 down
    to ``min_side`` px. Raises ``ValueError`` if even that does not fit.
    """
    b, _, h, w = mask.shape
    blocked = expand(expand(mask, kernel), 2 * margin + 1)
    big = min(h, w) // 2 * 2 + 1
    crowd = window_mean_01(expand(mask, kernel), big)
    out = torch.zeros_like(mask)
    for i in range(b):
        free, side = free_squares(blocked[i : i + 1], round(size * min(h, w)), min_side)
        if not free.any():
            raise ValueError(
                f"no {side}x{side} benign box fits outside the expanded protected region of image {i}"
            )
        score = F.avg_pool2d(crowd[i : i + 1], side, stride=1)[0, 0]
        score = torch.where(free, score, torch.full_like(score, float("inf")))
        y, x = divmod(int(torch.argmin(score)), score.shape[1])
        out[i, 0, y : y + side, x : x + side] = 1
    return out


def window_sums(x: torch.Tensor, win: int, pad: int = 0) -> torch.Tensor:
    """Sums of ``x`` (B, C, H, W) over ``win`` x ``win`` windows at stride 1, after ``pad``
    zeros on each side, as float64 through an integral image: exact for 0/1 masks (every
    partial sum is an integer below 2**53), and one pass instead of win² additions per pixel."""
    x = F.pad(x.double(), (pad, pad, pad, pad))
    c = F.pad(x.cumsum(-1), (1, 0))
    x = c[..., win:] - c[..., :-win]
    c = F.pad(x.cumsum(-2), (0, 0, 1, 0))
    return c[..., win:, :] - c[..., :-win, :]


def window_mean_01(mask: torch.Tensor, win: int) -> torch.Tensor:
    """``F.avg_pool2d(mask, win, stride=1, padding=win // 2, count_include_pad=False)`` of a
    0/1 mask, bit for bit (both divide the same exact integer sums by the same exact counts in
    ``mask``'s dtype; tests/test_masks.py compares them), without its win² cost per pixel: at
    128 px the image-wide window (129 px) took about 1.5 s per call of 18 masks."""
    sums = window_sums(mask, win, win // 2)
    counts = window_sums(torch.ones_like(mask[:1, :1]), win, win // 2)
    return sums.to(mask.dtype) / counts.to(mask.dtype)


def free_squares(blocked: torch.Tensor, side: int, min_side: int) -> tuple[torch.Tensor, int]:
    """Where a square avoids ``blocked`` (1, 1, H, W): (top-left corners as a bool map, side).

    The side starts at ``side`` and shrinks by 3/4, down to ``min_side``, while no
    square fits; the map is empty if even that does not fit.
    """
    side = max(min_side, side)
    while True:
        free = window_sums(blocked, side)[0, 0] == 0
        if free.any() or side <= min_side:
            return free, side
        side = max(min_side, int(side * 0.75))


def scaled_kernel(size: int, paper_kernel: int = PAPER_EXPAND_KERNEL, paper_size: int = 512) -> int:
    """The odd kernel that expands by the same fraction of the image as 17 px at 512 px."""
    per_side = round((paper_kernel // 2) * size / paper_size)
    return 2 * max(1, per_side) + 1


# ------------------------------------------------------------------------------- edit scenarios

#: the official evaluation scenarios: malicious ones edit the protected content, benign ones not
MALICIOUS = ("mask", "expanded", "incomplete")
BENIGN = ("ring", "half_ring", "elsewhere")
SCENARIOS = MALICIOUS + BENIGN


def scenario_masks(
    mask: torch.Tensor,
    kernel: int,
    elsewhere_size: float = 0.2,
) -> dict:
    """The editing scenarios for protected regions ``mask`` (B, 1, H, W).

    Malicious (they edit the protected content): ``mask`` = m, ``expanded`` = E(m),
    ``incomplete`` = half(m) ∪ half(E(m)). Benign: ``ring`` = E(m) - m, ``half_ring``
    = half(ring) (the official "wot"), ``elsewhere`` = a square that does not touch E(m).
    """
    band = ring(mask, kernel)
    return {
        "mask": mask,
        "expanded": expand(mask, kernel),
        "incomplete": incomplete(mask, kernel),
        "ring": band,
        "half_ring": half(band),
        "elsewhere": box_elsewhere(mask, kernel, size=elsewhere_size),
    }
