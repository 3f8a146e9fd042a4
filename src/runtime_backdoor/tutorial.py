"""Helpers of ``notebooks/tutorial.ipynb``: one image through the method, step by step, as figures.

The notebook stays thin: each cell calls one of these and shows the figure it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import masks as M
from .data import list_pairs, read_pair
from .figures import loss_plot, plt  # figures selects the non-interactive backend
from .implant import ImplantResult, Sensitivity, implant, masked_mse
from .study import to_array, to_mask_tensor, to_tensor
from .targets import make_target


def sample_image(name: str, size: int, folder: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (1, 3, S, S) and protected region (1, 1, S, S) of embedded sample ``name``.

    ``name`` is ``{watermark,logo,face}_{k:02d}``; the sample is drawn into ``folder``.
    """
    from .samples import make_sample

    content, _, k = name.rpartition("_")
    if not k.isdigit():
        raise ValueError(f"image {name!r}: expected CONTENT_NN such as logo_01")
    make_sample(folder, n_per_type=int(k) + 1, size=size)
    pairs = {n: (img, msk) for n, img, msk in list_pairs(folder)}
    if name not in pairs:
        raise ValueError(f"image {name!r} is not in the embedded sample; known: {sorted(pairs)}")
    image, mask = read_pair(*pairs[name])
    return to_tensor(image), to_mask_tensor(mask)


def hole_error(fill: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean |fill - target| over the hole: 0 when the fill is exactly the target colour."""
    area = mask.flatten(1).sum(1).clamp_min(1) * fill.shape[1]
    return ((fill - target).abs() * mask).flatten(1).sum(1) / area


@dataclass
class Frame:
    step: int  #: forward passes run: the image is the one pass ``step`` saw (``step - 1`` updates)
    protected: torch.Tensor  #: (B, 3, H, W) what ``implant(..., steps=step)`` returns, 8-bit
    fill: torch.Tensor  #: (B, 3, H, W) the editor's output when the protected region is edited
    error: torch.Tensor  #: (B,) :func:`hole_error` of that fill


def implant_frames(
    editor, image: torch.Tensor, mask: torch.Tensor, steps: list[int], **implant_kwargs
) -> tuple[list[Frame], ImplantResult]:
    """The protected image ``implant`` returns for each number of steps in ``steps``, its fill
    of the hole, and the longest run's result.

    As in the official loop, ``implant(..., steps=k)`` returns the image its k-th forward
    pass saw (δ after k − 1 Adam updates; k = 0 and 1 both give δ₀). The optimisation is
    deterministic (fixed δ₀ seed), so the frames are the states of one run.
    """
    frames, result = [], None
    for k in sorted(set(steps)):
        result = implant(editor, image, mask, steps=k, progress=False, **implant_kwargs)
        with torch.no_grad():
            fill = editor(result.protected, mask)
        frames.append(Frame(k, result.protected, fill, hole_error(fill, result.target, mask)))
    return frames, result


def _panel(ax, img, title: str, region: np.ndarray | None = None, **kwargs) -> None:
    ax.imshow(img, **kwargs)
    if region is not None:
        ax.contour(region.astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def regions_figure(image: torch.Tensor, mask: torch.Tensor, kernel: int, target: str = "solid"):
    """The image, its protected region m, the expansion E(m), the ring E(m) − m and the target φ."""
    x, m = image[:1].cpu(), mask[:1].cpu()
    big, band = M.expand(m, kernel), M.ring(m, kernel)
    region = m[0, 0].numpy() > 0.5
    panels = [
        (to_array(x), "image (m outlined)", region, {}),
        (m[0, 0].numpy(), "protected region m", None, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        (big[0, 0].numpy(), f"expansion E(m), {kernel} px box", None, {"cmap": "gray"}),
        (band[0, 0].numpy(), "ring E(m) − m", None, {"cmap": "gray", "vmin": 0, "vmax": 1}),
        (to_array(make_target(x, target)), f"target φ ({target})", None, {}),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.6))
    for ax, (img, title, outline, kwargs) in zip(axes, panels, strict=True):
        _panel(ax, img, title, outline, **kwargs)
    fig.tight_layout()
    return fig


def loss_terms_figure(
    editor, images: dict[str, torch.Tensor], mask: torch.Tensor, kernel: int, target="solid"
):
    """What each loss term compares: one row per image (the editor's output under the term's
    mask, with the term's value) and a last row with what the term wants it to be."""
    m = mask[:1]
    first = next(iter(images.values()))[:1]
    big, band = M.expand(m, kernel), M.ring(m, kernel)
    phi = make_target(first, target)
    with torch.no_grad():
        clean_ring = editor(first, band)
    terms = [
        ("implant", m, phi, "φ inside m"),
        ("incomplete", big, phi, "φ inside E(m)"),
        ("hide", band, clean_ring, "the clean image's\nring edit, in the ring"),
    ]
    rows = len(images) + 1
    fig, axes = plt.subplots(rows, 3, figsize=(7.2, 2.5 * rows), squeeze=False)
    for r, (label, x) in enumerate(images.items()):
        for c, (term, region, reference, _) in enumerate(terms):
            with torch.no_grad():
                out = editor(x[:1], region)
            value = float(masked_mse(out, reference, region)[0])
            title = f"{label}: edit under {('m', 'E(m)', 'ring')[c]}\n{term} = {value:.4f}"
            _panel(axes[r, c], to_array(out), title, region[0, 0].cpu().numpy() > 0.5)
    for c, (term, region, reference, wants) in enumerate(terms):
        outline = region[0, 0].cpu().numpy() > 0.5
        _panel(axes[-1, c], to_array(reference), f"{term} wants\n{wants}", outline)
    fig.tight_layout()
    return fig


def frames_figure(image: torch.Tensor, mask: torch.Tensor, frames: list[Frame], amplify=20):
    """A strip over the forward passes: δ (× ``amplify``, grey = 0) above the fill of the hole."""
    x, region = image[:1], mask[0, 0].cpu().numpy() > 0.5
    fig, axes = plt.subplots(2, len(frames), figsize=(1.9 * len(frames), 4.2), squeeze=False)
    for c, f in enumerate(frames):
        delta = 0.5 + amplify * (to_array(f.protected[:1]) - to_array(x))
        _panel(axes[0, c], np.clip(delta, 0, 1), f"pass {f.step}: δ ×{amplify}")
        _panel(axes[1, c], to_array(f.fill[:1]), f"fill, error {float(f.error[0]):.2f}", region)
    fig.tight_layout()
    return fig


def loss_curves(result: ImplantResult):
    """The three loss terms of ``result`` over the Adam steps (``figures.loss_plot``)."""
    steps = result.losses["total"].shape[0]
    frame = pd.concat(
        pd.DataFrame(
            {"name": str(i), "step": np.arange(steps)}
            | {k: v[:, i].cpu().numpy() for k, v in result.losses.items()}
        )
        for i in range(result.losses["total"].shape[1])
    )
    return loss_plot(frame)


def gain_figure(sensitivities: dict[str, Sensitivity]):
    """Per editor: the first-order gain towards φ against the gain reaching φ needs (log scale)."""
    labels = list(sensitivities)
    gain = [float(s.gain[0]) for s in sensitivities.values()]
    needed = [float(s.needed[0]) for s in sensitivities.values()]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels), 3.4))
    pos = np.arange(len(labels))
    floor = 0.05  # a log axis cannot show 0: smaller gains are drawn at the floor, labelled
    ax.bar(pos - 0.2, np.maximum(gain, floor), 0.4, label="gain of the editor", color="tab:blue")
    ax.bar(pos + 0.2, needed, 0.4, label="gain needed to reach φ", color="tab:grey")
    for p, g, n in zip(pos, gain, needed, strict=True):
        ax.text(p - 0.2, max(g, floor), f"{g:.2g}", ha="center", va="bottom", fontsize=8)
        ax.text(p + 0.2, n, f"{n:.2g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(floor, 10 * max(gain + needed))  # headroom for the legend
    ax.set_xticks(pos, labels)
    ax.set_yscale("log")
    ax.set_ylabel("mean fill change per unit of ε")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
