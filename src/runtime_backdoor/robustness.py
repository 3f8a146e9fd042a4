"""Fair test masks, image transformations before editing, and expectation over transformations.

Three tools for testing a protection beyond the official scenarios:

- **Fair masks** (:func:`fair_masks`): masks an editing user would draw, computed from the
  protected region ``m`` alone and never from the optimisation masks ``E(m)`` / ``R``: a loose
  box, a brush stroke painted over the content, a tight mask of another shape (convex hull,
  covering ellipse), the hull shifted by a few pixels, and benign boxes of several sizes placed
  at random away from the content.
- **Transforms** (:class:`Transform`, :func:`parse_transform`): what can happen to a protected
  image before someone edits it — JPEG (a real PIL round trip), downscale and back, Gaussian
  blur, Gaussian noise, a border crop. Outputs are 8-bit, as the image would be stored. Specs
  are the one vocabulary of :mod:`runtime_backdoor.transforms` (forms
  :data:`~runtime_backdoor.transforms.BEYOND`: ``jpeg:75``, ``resize:0.5``, ``blur:1``,
  ``noise:2`` in 8-bit levels, ``crop:6px`` per side).
- **EOT ops** (:func:`jpeg_straight_through`, :func:`resize_differentiable`): the
  differentiable stand-ins that :class:`runtime_backdoor.eot.EOTEditor` draws from.

Masks are float (B, 1, H, W) tensors of 0/1 as in :mod:`runtime_backdoor.masks`; images are
(B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import transforms as T
from .masks import check_mask, free_squares

#: Fair malicious scenarios: each covers (most of) the protected content.
FAIR_MALICIOUS = ("fair_box", "fair_brush", "fair_hull", "fair_ellipse", "fair_hull_shifted")
#: Fair benign scenarios: boxes placed at random away from the protected content.
FAIR_BENIGN = ("benign_small", "benign_medium", "benign_large")
FAIR_SCENARIOS = FAIR_MALICIOUS + FAIR_BENIGN

TRANSFORM_KINDS = ("none", "jpeg", "resize", "blur", "noise", "crop")


# ------------------------------------------------------------------------------- fair masks


def _numpy_masks(mask: torch.Tensor) -> np.ndarray:
    check_mask(mask)
    return mask[:, 0].detach().cpu().numpy() > 0.5


def _as_tensor(arrays, like: torch.Tensor) -> torch.Tensor:
    stacked = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])[:, None]
    return torch.from_numpy(stacked).to(like.device, like.dtype)


def _bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a non-empty bool mask, bottom/right exclusive."""
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def loose_box(
    mask: torch.Tensor, margin: tuple[float, float] = (0.03, 0.1), seed: int = 0
) -> torch.Tensor:
    """The bounding box of ``mask`` grown on each side by a random margin.

    Each of the four margins is drawn uniformly from ``margin`` (fractions of the
    image side), independently per image; the box is clipped to the image.
    """
    lo, hi = margin
    if not 0 <= lo <= hi:
        raise ValueError(f"margin must be (low, high) with 0 <= low <= high, got {margin}")
    rng = np.random.default_rng(seed)
    out = []
    for m in _numpy_masks(mask):
        h, w = m.shape
        t, left, b, r = _bbox(m)
        grow = rng.uniform(lo, hi, size=4) * min(h, w)
        box = np.zeros_like(m)
        t, left = max(0, t - round(grow[0])), max(0, left - round(grow[1]))
        b, r = min(h, b + round(grow[2])), min(w, r + round(grow[3]))
        box[t:b, left:r] = True
        out.append(box)
    return _as_tensor(out, mask)


def brush_stroke(mask: torch.Tensor, width: float = 0.08, seed: int = 0) -> torch.Tensor:
    """A zig-zag brush stroke painted over ``mask``, as a user scribbles over content.

    The brush is ``width`` x the image side wide (at least 3 px). Horizontal passes
    0.6 brush widths apart sweep the content's bounding box, each overshooting its
    ends by a random 0-1 brush width and tilted by a random amount small enough
    that consecutive passes still overlap; the passes are joined at alternate ends.
    The stroke covers the content by construction; a pixel the rasteriser misses at
    a tilted edge is painted too (a user touches up).
    """
    if not 0 < width < 1:
        raise ValueError(f"brush width must be a fraction of the image side in (0, 1), got {width}")
    rng = np.random.default_rng(seed)
    out = []
    for m in _numpy_masks(mask):
        h, w = m.shape
        brush = max(3, round(width * min(h, w)))
        step = max(1, int(0.6 * brush))
        # Tilt bound: consecutive passes stay closer than one brush width.
        tilt = (brush - step) / 4
        t, left, b, r = _bbox(m)
        ys = np.arange(t + step / 2, b - 1 + step, step)
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        points = []
        for k, y in enumerate(ys):
            x0 = left - brush / 2 - rng.uniform(0, brush)
            x1 = r - 1 + brush / 2 + rng.uniform(0, brush)
            y0, y1 = y + rng.uniform(-tilt, tilt), y + rng.uniform(-tilt, tilt)
            pass_ = [(x0, y0), (x1, y1)] if k % 2 == 0 else [(x1, y1), (x0, y0)]
            points.extend(pass_)
        draw.line(points, fill=255, width=brush, joint="curve")
        stroke = np.asarray(canvas) > 127
        out.append(stroke | m)
    return _as_tensor(out, mask)


def convex_hull(mask: torch.Tensor) -> torch.Tensor:
    """The convex hull of each mask (a tight mask of another shape for text and logos)."""
    from skimage.morphology import convex_hull_image

    return _as_tensor([convex_hull_image(m) | m for m in _numpy_masks(mask)], mask)


def covering_ellipse(mask: torch.Tensor) -> torch.Tensor:
    """The ellipse of each mask's second moments, scaled just enough to cover every pixel."""
    out = []
    for m in _numpy_masks(mask):
        h, w = m.shape
        pts = np.argwhere(m).astype(np.float64)
        centre = pts.mean(0)
        # A pixel is a unit square: its own spread (1/12 per axis) keeps thin masks non-singular.
        cov = np.cov((pts - centre).T, bias=True).reshape(2, 2) + np.eye(2) / 12
        inv = np.linalg.inv(cov)
        d = pts - centre
        radius2 = np.einsum("ni,ij,nj->n", d, inv, d).max()
        grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1) - centre
        inside = np.einsum("hwi,ij,hwj->hw", grid, inv, grid) <= radius2 + 1e-9
        out.append(inside | m)
    return _as_tensor(out, mask)


def shift(mask: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate masks by exactly (``dy``, ``dx``) pixels; what leaves the image is lost."""
    h, w = mask.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"shift ({dy}, {dx}) moves the mask out of a {h}x{w} image")
    out = torch.zeros_like(mask)
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = mask[..., src_y, src_x]
    return out


def random_boxes_elsewhere(
    mask: torch.Tensor,
    size: float,
    clearance: int = 4,
    seed: int = 0,
    min_side: int = 4,
) -> torch.Tensor:
    """A square benign mask per image, ``size`` x the image side, at a random free position.

    Free: no pixel within ``clearance`` px of the protected region. When no square of
    that side fits, the side shrinks by 3/4 down to ``min_side``; ``ValueError`` if
    even that does not fit.
    """
    if not 0 < size < 1:
        raise ValueError(f"size must be a fraction of the image side in (0, 1), got {size}")
    rng = np.random.default_rng(seed)
    blocked = F.max_pool2d(mask.float(), 2 * clearance + 1, stride=1, padding=clearance)
    out = []
    for i, m in enumerate(_numpy_masks(mask)):
        h, w = m.shape
        free, side = free_squares(blocked[i : i + 1], round(size * min(h, w)), min_side)
        options = torch.nonzero(free).cpu().numpy()
        if len(options) == 0:
            raise ValueError(
                f"no {side}x{side} benign box fits {clearance} px away from the content of image {i}"
            )
        y, x = options[rng.integers(len(options))]
        box = np.zeros_like(m)
        box[y : y + side, x : x + side] = True
        out.append(box)
    return _as_tensor(out, mask)


def fair_masks(
    mask: torch.Tensor,
    *,
    shift_px: int = 4,
    brush_width: float = 0.08,
    box_margin: tuple[float, float] = (0.03, 0.1),
    benign_sizes: tuple[float, float, float] = (0.1, 0.2, 0.35),
    clearance: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The fair scenarios (:data:`FAIR_SCENARIOS`) for protected regions ``mask``.

    Drawn from ``m`` alone: ``fair_box`` (:func:`loose_box`), ``fair_brush``
    (:func:`brush_stroke`), ``fair_hull`` (:func:`convex_hull`), ``fair_ellipse``
    (:func:`covering_ellipse`), ``fair_hull_shifted`` (the hull moved ``shift_px`` px
    right: it misses a strip of the content and covers a strip beside it), and
    ``benign_{small,medium,large}`` (:func:`random_boxes_elsewhere` of the three
    ``benign_sizes``, ``clearance`` px away from the content).
    """
    if len(benign_sizes) != 3:
        raise ValueError(f"benign_sizes must hold three sizes, got {benign_sizes}")
    hull = convex_hull(mask)
    out = {
        "fair_box": loose_box(mask, box_margin, seed=seed),
        "fair_brush": brush_stroke(mask, brush_width, seed=seed + 1),
        "fair_hull": hull,
        "fair_ellipse": covering_ellipse(mask),
        "fair_hull_shifted": shift(hull, 0, shift_px),
    }
    for j, (label, size) in enumerate(zip(("small", "medium", "large"), benign_sizes, strict=True)):
        out[f"benign_{label}"] = random_boxes_elsewhere(
            mask, size, clearance=clearance, seed=seed + 2 + j
        )
    return out


# ------------------------------------------------------------------------------- transforms


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid in [0, 1] (how a transformed image is stored)."""
    return torch.round(image.clamp(0, 1) * 255) / 255


def _pil_images(image: torch.Tensor) -> list[Image.Image]:
    arr = (to_8bit(image) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _from_pil(images: list[Image.Image], like: torch.Tensor) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.float32) / 255
    return torch.from_numpy(arr).permute(0, 3, 1, 2).to(like.device, like.dtype)


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """A JPEG round trip through PIL (its default 4:2:0 chroma subsampling)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    out = []
    for im in _pil_images(image):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(Image.open(buf))
    return _from_pil(out, image)


def resize_back(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Downscale by ``scale`` and back to the original size (PIL bicubic, antialiased)."""
    if not 0 < scale <= 1:
        raise ValueError(f"resize scale must be in (0, 1], got {scale}")
    h, w = image.shape[-2:]
    small = (max(1, round(w * scale)), max(1, round(h * scale)))
    out = [
        im.resize(small, Image.BICUBIC).resize((w, h), Image.BICUBIC) for im in _pil_images(image)
    ]
    return _from_pil(out, image)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` px (radius 3σ, reflected borders)."""
    if sigma <= 0:
        raise ValueError(f"blur sigma must be positive, got {sigma}")
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = image.shape[1]
    mode = "reflect" if radius < min(image.shape[-2:]) else "replicate"
    x = F.conv2d(
        F.pad(image, (radius, radius, 0, 0), mode=mode),
        k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
        groups=c,
    )
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode=mode),
        k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
        groups=c,
    )


def gaussian_noise(image: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """Add Gaussian noise of standard deviation ``sigma`` (in [0, 1] units), drawn from ``seed``."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(image.shape, generator=gen).to(image.device, image.dtype)
    return (image + sigma * noise).clamp(0, 1)


def crop_border(x: torch.Tensor, px: int) -> torch.Tensor:
    """Remove ``px`` pixels from every side (shifts the image against any editor's grid)."""
    h, w = x.shape[-2:]
    if px < 0 or 2 * px >= min(h, w):
        raise ValueError(f"crop of {px} px per side does not fit a {h}x{w} image")
    return x[..., px : h - px, px : w - px] if px else x


@dataclass(frozen=True)
class Transform:
    """One transformation applied to an image before it is edited.

    ``kind`` is one of :data:`TRANSFORM_KINDS`; ``value`` is in the unit of
    :data:`runtime_backdoor.transforms.TABLE`: the JPEG quality, the resize scale, the blur σ
    in px, the noise σ in 8-bit levels (2 = 2/255) or the crop in px per side (``crop:6px``).
    Calling it returns an 8-bit image; :meth:`frame` maps a mask or a target into the
    transformed image's frame (only ``crop`` changes the geometry).
    """

    kind: str = "none"
    value: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        T.parse(self.name, T.BEYOND)  # one-line ValueError naming the accepted forms

    @property
    def name(self) -> str:
        if self.kind == "none":
            return "none"
        return f"{self.kind}:{T.number(self.value)}{'px' if self.kind == 'crop' else ''}"

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return to_8bit(image)
        if self.kind == "jpeg":
            return jpeg(image, int(self.value))
        if self.kind == "resize":
            return resize_back(image, float(self.value))
        if self.kind == "blur":
            return to_8bit(gaussian_blur(image, float(self.value)))
        if self.kind == "noise":
            return to_8bit(gaussian_noise(image, float(self.value) / 255, seed=self.seed))
        return to_8bit(crop_border(image, int(self.value)))

    def frame(self, spatial: torch.Tensor) -> torch.Tensor:
        """Map a mask or a target image into the transformed image's frame."""
        return crop_border(spatial, int(self.value)) if self.kind == "crop" else spatial


def parse_transform(spec: str | Transform, seed: int = 0) -> Transform:
    """``"none"``, ``"jpeg:75"``, ``"resize:0.5"``, ``"blur:1"``, ``"noise:2"`` (8-bit levels),
    ``"crop:6px"`` (px per side): the forms :data:`runtime_backdoor.transforms.BEYOND`."""
    if isinstance(spec, Transform):
        return spec
    s = T.parse(spec, T.BEYOND)
    return Transform() if s.word == "none" else Transform(s.word, s.value, seed)


def parse_transforms(specs: str | list, seed: int = 0) -> list[Transform]:
    """A space-separated string (as ``params.yaml`` holds it) or a list of specs."""
    items = specs.split() if isinstance(specs, str) else list(specs)
    return [parse_transform(s, seed) for s in items]


# ------------------------------------------------------------------------------- EOT


def jpeg_straight_through(image: torch.Tensor, quality: int) -> torch.Tensor:
    """The real JPEG round trip forward, the identity backward (straight-through)."""
    return image + (jpeg(image.detach(), quality) - image).detach()


def resize_differentiable(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Bilinear (antialiased) downscale by ``scale`` and back; differentiable."""
    h, w = image.shape[-2:]
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    down = F.interpolate(image, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False)


def _translate(x: torch.Tensor, dy: int, dx: int, mode: str) -> torch.Tensor:
    s = max(abs(dy), abs(dx))
    if s == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s), mode=mode)
    return padded[..., s - dy : s - dy + h, s - dx : s - dx + w]


__all__ = [
    "FAIR_BENIGN",
    "FAIR_MALICIOUS",
    "FAIR_SCENARIOS",
    "TRANSFORM_KINDS",
    "Transform",
    "brush_stroke",
    "convex_hull",
    "covering_ellipse",
    "crop_border",
    "fair_masks",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "jpeg_straight_through",
    "loose_box",
    "parse_transform",
    "parse_transforms",
    "random_boxes_elsewhere",
    "resize_back",
    "resize_differentiable",
    "shift",
    "to_8bit",
]
