"""The embedded sample data set: a small offline stand-in for the paper's data.

Watermarks, logos and faces drawn on photos that ship with scikit-image, written in the official
layout by :func:`make_sample`; :func:`training_images` draws the miniature editor's training crops
from a disjoint set of photos.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .data import IMAGE_SUFFIX, MANIFEST_COLUMNS, MASK_SUFFIX, write_csv, write_png

__all__ = [
    "CONTENT_TYPES",
    "SAMPLE_SOURCES",
    "TRAINING_SOURCES",
    "UNUSED_SOURCES",
    "iter_training_images",
    "load_source",
    "make_sample",
    "training_images",
]

CONTENT_TYPES = ("watermark", "logo", "face")

# Which scikit-image photos feed which side. The two sides share no photo, so a miniature editor
# trained on TRAINING_SOURCES has never seen the images it is evaluated on. ``cat`` is the same
# photo as ``chelsea`` and therefore belongs to the sample side.
SAMPLE_SOURCES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "brick", "gravel", "logo")
TRAINING_SOURCES = (
    "rocket",
    "retina",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
    "camera",
    "coins",
    "moon",
    "grass",
    "clock",
    "cell",
    "page",
    "text",
)
UNUSED_SOURCES = ("cat", "colorwheel", "checkerboard", "horse", "binary_blobs", "lfw_subset")

# Backgrounds for watermarks and logos, and for drawn faces (no real face behind a drawn one).
_BACKGROUNDS = ("coffee", "astronaut", "hubble_deep_field", "chelsea", "brick", "gravel")
_FACE_BACKGROUNDS = ("coffee", "hubble_deep_field", "brick", "gravel")
# Textures look natural under any rotation; photos are only mirrored.
_ROTATABLE = {"hubble_deep_field", "brick", "gravel", "grass", "cell", "moon", "coins", "retina"}

# Fixed regions in the full-resolution source photos, (centre x, centre y, radius x, radius y),
# checked by drawing them on the photos.
_ASTRONAUT_FACE = (222.0, 120.0, 46.0, 60.0)
_ASTRONAUT_PATCH = (172.0, 385.0, 40.0, 39.0)  # the round mission patch on the suit
_CHELSEA_FACE = (245.0, 165.0, 120.0, 110.0)  # eyes, muzzle and nose of the cat
_SKIMAGE_LOGO_DISK = (250.0, 250.0, 246.0, 246.0)  # opaque white outside this disk

_WATERMARK_TEXTS = (
    "© 2024 Studio",
    "SAMPLE",
    "CONFIDENTIAL",
    "© Jane Doe",
    "PREVIEW",
    "© Northwind Images",
    "DRAFT",
    "© A. Rivera 2023",
)
_LOGO_STYLES = ("badge", "skimage", "rings", "plate", "patch", "hexagon", "star")
_FACE_STYLES = ("astronaut", "chelsea", "drawn", "astronaut_wide", "drawn", "drawn")


# ---------------------------------------------------------------------------------------------
# Source photos


@lru_cache(maxsize=32)
def _load_source_cached(name: str) -> np.ndarray:
    from skimage import data as skd

    if name in ("motorcycle_left", "motorcycle_right"):
        a = skd.stereo_motorcycle()[0 if name == "motorcycle_left" else 1]
    elif name == "logo":
        a = skd.logo()[..., :3]  # alpha is opaque everywhere; the white outside is cut by a disk
    else:
        a = getattr(skd, name)()
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"skimage.data.{name}: expected uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a.setflags(write=False)
    return a


def load_source(name: str) -> np.ndarray:
    """A scikit-image photo by name as read-only uint8 ``H x W x 3`` (grey replicated).

    Names are ``skimage.data`` functions, plus ``motorcycle_left``/``motorcycle_right`` for the
    two views of ``stereo_motorcycle``.
    """
    known = SAMPLE_SOURCES + TRAINING_SOURCES + UNUSED_SOURCES
    if name not in known:
        raise ValueError(f"unknown source '{name}'; known: {', '.join(known)}")
    return _load_source_cached(name)


def _crop_box(shape, rng: np.random.Generator, min_frac: float) -> tuple[int, int, int]:
    """Random square ``(x0, y0, side)`` with side in [min_frac, 1] x the short side."""
    h, w = shape[:2]
    short = min(h, w)
    side = int(rng.integers(max(8, int(short * min_frac)), short + 1))
    return int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side


def _crop_resize(a: np.ndarray, box, size: int, resample=Image.BICUBIC) -> np.ndarray:
    x0, y0, side = box
    crop = Image.fromarray(np.ascontiguousarray(a[y0 : y0 + side, x0 : x0 + side]))
    return np.asarray(crop.resize((size, size), resample, reducing_gap=None))


def _ellipse_mask(shape, ellipse) -> np.ndarray:
    cx, cy, rx, ry = ellipse
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


def _random_view(name: str, size: int, rng: np.random.Generator, min_frac: float = 0.45):
    """A random square crop of a source, resized to ``size``, randomly mirrored/rotated."""
    a = load_source(name)
    out = _crop_resize(a, _crop_box(a.shape, rng, min_frac), size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if name in _ROTATABLE:
        out = np.rot90(out, int(rng.integers(0, 4)))
    return np.ascontiguousarray(out)


def _region_view(name, ellipse, size, rng, area_range):
    """Crop of ``name`` containing ``ellipse`` so that it covers ``area_range`` of the crop.

    Returns the resized crop (uint8), the ellipse mask resized with it, and the crop box.
    """
    a = load_source(name)
    h, w = a.shape[:2]
    cx, cy, rx, ry = ellipse
    frac = float(rng.uniform(*area_range))
    side = int(round(np.sqrt(np.pi * rx * ry / frac)))
    side = int(np.clip(side, 2 * max(rx, ry) + 4, min(h, w)))
    # Jitter the position while keeping the whole ellipse inside the crop.
    lo_x, hi_x = max(0, int(cx + rx) + 2 - side), min(w - side, int(cx - rx) - 2)
    lo_y, hi_y = max(0, int(cy + ry) + 2 - side), min(h - side, int(cy - ry) - 2)
    x0 = (
        int(rng.integers(lo_x, hi_x + 1))
        if hi_x >= lo_x
        else int(np.clip(cx - side / 2, 0, w - side))
    )
    y0 = (
        int(rng.integers(lo_y, hi_y + 1))
        if hi_y >= lo_y
        else int(np.clip(cy - side / 2, 0, h - side))
    )
    box = (x0, y0, side)
    img = _crop_resize(a, box, size)
    full = _ellipse_mask(a.shape, ellipse).astype(np.uint8) * 255
    mask = _crop_resize(full, box, size, Image.BILINEAR) >= 128
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


# ---------------------------------------------------------------------------------------------
# Drawing helpers


def _font(size_px: int, bold: bool = True) -> ImageFont.FreeTypeFont:
    import matplotlib

    fname = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / fname
    return ImageFont.truetype(str(path), max(6, int(size_px)))


def _fit_font(text: str, width: float, bold: bool = True) -> ImageFont.FreeTypeFont:
    """Font whose rendering of ``text`` is about ``width`` pixels wide."""
    ref = _font(100, bold)
    x0, _, x1, _ = ref.getbbox(text)
    return _font(100 * width / max(1, x1 - x0), bold)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(im) > 0


def _composite(bg: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """``bg`` uint8 HxWx3, ``colour`` uint8 HxWx3 or RGB triple, ``alpha`` float HxW in [0, 1]."""
    a = alpha[:, :, None].astype(np.float32)
    out = bg.astype(np.float32) * (1 - a) + np.asarray(colour, np.float32) * a
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _supersampled_rgba(size: int, draw_fn, ss: int = 4) -> np.ndarray:
    """Draw with ``draw_fn(ImageDraw, S)`` on a transparent ``S = ss*size`` canvas, downsample."""
    big = Image.new("RGBA", (size * ss, size * ss), (0, 0, 0, 0))
    draw_fn(ImageDraw.Draw(big), size * ss)
    return np.asarray(big.resize((size, size), Image.LANCZOS))


def _paste_rgba(bg: np.ndarray, rgba: np.ndarray, opacity: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = rgba[..., 3].astype(np.float32) / 255.0
    return _composite(bg, rgba[..., :3], alpha * opacity), alpha > 0


# ---------------------------------------------------------------------------------------------
# The three content types


def _make_watermark(i: int, size: int, rng: np.random.Generator):
    source = _BACKGROUNDS[i % len(_BACKGROUNDS)]
    bg = _random_view(source, size, rng)
    text = _WATERMARK_TEXTS[i % len(_WATERMARK_TEXTS)]
    layout = ("centre", "corner", "diagonal", "tiled")[i % 4]
    s = size
    layer = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(layer)
    if layout == "centre":
        font = _fit_font(text, s * rng.uniform(0.6, 0.8))
        draw.text((s / 2, s * rng.uniform(0.4, 0.6)), text, fill=255, font=font, anchor="mm")
    elif layout == "corner":
        font = _fit_font(text, s * rng.uniform(0.55, 0.7), bold=bool(rng.random() < 0.5))
        m = s * 0.04
        left = rng.random() < 0.5
        anchor = "ld" if left else "rd"
        draw.text((m if left else s - m, s - m), text, fill=255, font=font, anchor=anchor)
    elif layout == "diagonal":
        big = Image.new("L", (2 * s, 2 * s), 0)
        font = _fit_font(text, s * rng.uniform(0.8, 1.0))
        ImageDraw.Draw(big).text((s, s), text, fill=255, font=font, anchor="mm")
        big = big.rotate(float(rng.uniform(25, 40)), resample=Image.BICUBIC)
        layer = big.crop((s // 2, s // 2, s // 2 + s, s // 2 + s))
    else:  # tiled: a repeated small line, as on stock-photo previews
        font = _fit_font(text, s * 0.4)
        step_y = s / 3.0
        for r in range(3):
            shift = (r % 2) * s * 0.25
            for c in range(3):
                xy = (s * (0.22 + 0.5 * c) - shift, step_y * (r + 0.5))
                draw.text(xy, text, fill=255, font=font, anchor="mm")
    cover = np.asarray(layer).astype(np.float32) / 255.0
    # Dilate by 1-3 px (128-512 px images) so that the mask covers the antialiased glyph edges.
    mask = _dilate(cover > 0.02, max(1, round(size / 170)))
    lum = bg[mask].astype(np.float32).mean() / 255.0 if mask.any() else 0.5
    colour = (255, 255, 255) if lum < 0.65 else (20, 20, 20)
    img = _composite(bg, colour, cover * float(rng.uniform(0.45, 0.65)))
    return img, mask, source


def _draw_logo(style: str, rng: np.random.Generator, letters: str):
    """Function drawing a logo of ``style`` filling its canvas (for ``_supersampled_rgba``)."""
    hue = rng.integers(30, 230, size=3)
    c1 = tuple(int(v) for v in hue) + (255,)
    c2 = tuple(int(255 - v) for v in hue) + (255,)
    white = (255, 255, 255, 255)

    def badge(d, S):
        d.ellipse([0, 0, S - 1, S - 1], fill=c2)
        d.ellipse([S * 0.08, S * 0.08, S * 0.92, S * 0.92], fill=c1)
        d.text((S / 2, S / 2), letters[:1], fill=white, font=_font(S * 0.6), anchor="mm")

    def rings(d, S):
        w = max(2, int(S * 0.07))
        r = S / 4.2
        for k, cx in enumerate((r + 1, S / 2, S - r - 1)):
            d.ellipse([cx - r, S / 2 - r, cx + r, S / 2 + r], outline=(c1, c2, c1)[k], width=w)

    def plate(d, S):
        d.rounded_rectangle([0, S * 0.25, S - 1, S * 0.75], radius=S * 0.12, fill=c1)
        font = _fit_font(letters, S * 0.8)
        d.text((S / 2, S / 2), letters, fill=white, font=font, anchor="mm")

    def hexagon(d, S):
        pts = [
            (S / 2 + S / 2 * np.cos(a), S / 2 + S / 2 * np.sin(a)) for a in np.arange(6) * np.pi / 3
        ]
        d.polygon(pts, fill=c1)
        d.text((S / 2, S / 2), letters[:2], fill=white, font=_font(S * 0.38), anchor="mm")

    def star(d, S):
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, S / 2, S / 4.5)
        d.polygon(
            [(S / 2 + r * np.cos(a), S / 2 + r * np.sin(a)) for r, a in zip(rad, ang, strict=True)],
            fill=c1,
        )
        d.ellipse([S * 0.4, S * 0.4, S * 0.6, S * 0.6], fill=c2)

    return {"badge": badge, "rings": rings, "plate": plate, "hexagon": hexagon, "star": star}[style]


def _make_logo(i: int, size: int, rng: np.random.Generator):
    style = _LOGO_STYLES[i % len(_LOGO_STYLES)]
    if style == "patch":  # the real mission patch on the astronaut's suit, in place
        img, mask = _region_view("astronaut", _ASTRONAUT_PATCH, size, rng, (0.06, 0.12))
        return img, mask, "astronaut"
    source = _BACKGROUNDS[(i + 3) % len(_BACKGROUNDS)]
    bg = _random_view(source, size, rng)
    side = int(round(size * rng.uniform(0.25, 0.38)))
    if style == "skimage":  # the scikit-image logo: a real logo, cut to its disk
        logo = load_source("logo")
        rgb = _crop_resize(logo, (0, 0, logo.shape[0]), side, Image.LANCZOS)
        disk = _ellipse_mask(logo.shape, _SKIMAGE_LOGO_DISK).astype(np.uint8) * 255
        alpha = _crop_resize(disk, (0, 0, logo.shape[0]), side, Image.LANCZOS)
        rgba = np.dstack([rgb, alpha])
        source = f"{source}+logo"
    else:
        letters = "".join(rng.choice(list("ABCDEFGHKMNPRSTVXZ"), size=4))
        rgba = _supersampled_rgba(side, _draw_logo(style, rng, letters))
    # Corner or centre, a small margin from the edges.
    margin = int(round(size * 0.05))
    spots = {
        "tl": (margin, margin),
        "tr": (size - side - margin, margin),
        "bl": (margin, size - side - margin),
        "br": (size - side - margin, size - side - margin),
        "c": ((size - side) // 2, (size - side) // 2),
    }
    x0, y0 = spots[("tl", "tr", "bl", "br", "c")[int(rng.integers(5))]]
    canvas = np.zeros((size, size, 4), np.uint8)
    canvas[y0 : y0 + side, x0 : x0 + side] = rgba
    opacity = 1.0 if rng.random() < 0.6 else float(rng.uniform(0.7, 0.9))
    img, mask = _paste_rgba(bg, canvas, opacity)
    return img, mask, source


_SKIN = ((241, 194, 160), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))
_HAIR = ((40, 30, 20), (90, 60, 30), (200, 160, 90), (20, 20, 20), (120, 120, 120))


def _make_drawn_face(i: int, size: int, rng: np.random.Generator):
    source = _FACE_BACKGROUNDS[i % len(_FACE_BACKGROUNDS)]
    bg = _random_view(source, size, rng)
    rx = size * rng.uniform(0.17, 0.24)
    ry = rx * rng.uniform(1.2, 1.35)
    cx = size * rng.uniform(0.35, 0.65)
    cy = size * rng.uniform(0.42, 0.58)
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    hair = _HAIR[int(rng.integers(len(_HAIR)))]
    eye = tuple(int(v) for v in rng.integers(20, 120, size=3))

    def draw(d, S):
        k = S / size
        X, Y, RX, RY = cx * k, cy * k, rx * k, ry * k
        d.ellipse([X - RX, Y - RY, X + RX, Y + RY], fill=skin + (255,))
        # Hair as a cap inside the head ellipse keeps the footprint an exact ellipse.
        d.chord([X - RX, Y - RY, X + RX, Y + RY], 180, 360, fill=hair + (255,))
        d.ellipse([X - RX * 0.95, Y - RY * 0.55, X + RX * 0.95, Y + RY * 0.98], fill=skin + (255,))
        for sgn in (-1, 1):
            ex, ey = X + sgn * RX * 0.38, Y - RY * 0.05
            d.ellipse(
                [ex - RX * 0.2, ey - RY * 0.09, ex + RX * 0.2, ey + RY * 0.09],
                fill=(250, 250, 250, 255),
            )
            d.ellipse(
                [ex - RX * 0.09, ey - RY * 0.08, ex + RX * 0.09, ey + RY * 0.08], fill=eye + (255,)
            )
            d.line(
                [ex - RX * 0.22, ey - RY * 0.2, ex + RX * 0.22, ey - RY * 0.22],
                fill=hair + (255,),
                width=max(1, int(RX * 0.07)),
            )
        d.line(
            [X, Y + RY * 0.05, X - RX * 0.08, Y + RY * 0.3, X + RX * 0.05, Y + RY * 0.32],
            fill=(150, 90, 70, 255),
            width=max(1, int(RX * 0.05)),
        )
        d.arc(
            [X - RX * 0.4, Y + RY * 0.2, X + RX * 0.4, Y + RY * 0.6],
            20,
            160,
            fill=(170, 40, 50, 255),
            width=max(1, int(RX * 0.08)),
        )

    rgba = _supersampled_rgba(size, draw)
    # Slight shading so the face is not flat colour: darker towards the ellipse rim.
    yy, xx = np.mgrid[:size, :size]
    r2 = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2
    shade = 1.0 - 0.18 * np.clip(r2, 0, 1)
    rgba = rgba.copy()
    rgba[..., :3] = np.clip(rgba[..., :3] * shade[..., None], 0, 255).astype(np.uint8)
    img, mask = _paste_rgba(bg, rgba, 1.0)
    return img, mask, source


def _make_face(i: int, size: int, rng: np.random.Generator):
    style = _FACE_STYLES[i % len(_FACE_STYLES)]
    if style == "astronaut":
        img, mask = _region_view("astronaut", _ASTRONAUT_FACE, size, rng, (0.12, 0.2))
        return img, mask, "astronaut"
    if style == "astronaut_wide":
        img, mask = _region_view("astronaut", _ASTRONAUT_FACE, size, rng, (0.04, 0.07))
        return img, mask, "astronaut"
    if style == "chelsea":
        img, mask = _region_view("chelsea", _CHELSEA_FACE, size, rng, (0.3, 0.45))
        return img, mask, "chelsea"
    return _make_drawn_face(i, size, rng)


_MAKERS = {"watermark": _make_watermark, "logo": _make_logo, "face": _make_face}


def make_sample(
    out_dir: str | os.PathLike, n_per_type: int = 6, size: int = 128, seed: int = 0
) -> pd.DataFrame:
    """Write the embedded sample set in the official layout and return its manifest.

    ``n_per_type`` images of each content type (watermark, logo, face), square ``size`` px, named
    ``{content}_{k:02d}``; each as ``NAME_example.png`` + ``NAME_example_mask.png`` (0/255) plus
    ``manifest.csv`` with columns ``MANIFEST_COLUMNS``. Deterministic in ``seed``; image ``k`` of a
    type does not depend on ``n_per_type``. Built only from ``SAMPLE_SOURCES``. Existing files of
    the same names are replaced (each write is atomic).
    """
    if not isinstance(n_per_type, (int, np.integer)) or n_per_type < 1:
        raise ValueError(f"n_per_type must be a positive integer, got {n_per_type!r}")
    if not isinstance(size, (int, np.integer)) or size < 64:
        raise ValueError(f"size must be an integer >= 64 (text is unreadable below), got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t, content in enumerate(CONTENT_TYPES):
        for k in range(int(n_per_type)):
            # One stream per image, so image k is the same whatever n_per_type is.
            rng = np.random.default_rng([int(seed), t, k])
            img, mask, source = _MAKERS[content](k, int(size), rng)
            name = f"{content}_{k:02d}"
            write_png(out / f"{name}{IMAGE_SUFFIX}", img, overwrite=True)
            write_png(out / f"{name}{MASK_SUFFIX}", mask, overwrite=True)
            rows.append((name, content, source, int(size), int(mask.sum())))
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    write_csv(out / "manifest.csv", df)
    return df


def training_images(size: int = 128, seed: int = 0, n: int = 64) -> list[np.ndarray]:
    """``n`` float32 ``size x size x 3`` images in [0, 1] from ``TRAINING_SOURCES`` only.

    Random square crops (45-100 % of the short side), mirrored and, for textures, rotated; the
    sources are cycled in order, so each appears about ``n / len(TRAINING_SOURCES)`` times. Grey
    photos are replicated to 3 channels. Deterministic in ``(size, seed, n)``.
    """
    return list(iter_training_images(size, seed, n))


def iter_training_images(
    size: int = 128, seed: int = 0, n: int | None = 64
) -> Iterator[np.ndarray]:
    """Like ``training_images`` but lazy; ``n=None`` yields forever."""
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    k = 0
    while n is None or k < n:
        rng = np.random.default_rng([int(seed), 1000, k])
        name = TRAINING_SOURCES[k % len(TRAINING_SOURCES)]
        yield _random_view(name, int(size), rng).astype(np.float32) / 255.0
        k += 1
