"""Image/mask input-output in the official layout, with validation.

The official repository stores each protected image as ``NAME_example.png`` (RGB, 8-bit) next to
``NAME_example_mask.png`` (8-bit grey, 255 = protected region). This module reads and writes that
layout with validation; :mod:`runtime_backdoor.samples` generates the embedded stand-in for the
paper's data in it.

Images in memory are float32 arrays ``H x W x 3`` in [0, 1]; masks are bool arrays ``H x W``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIX",
    "MANIFEST_COLUMNS",
    "MASK_SUFFIX",
    "list_pairs",
    "load_prepared",
    "mask_path_for",
    "read_folder",
    "read_image",
    "read_mask",
    "read_pair",
    "scan_pairs",
    "temp_file_for",
    "to_array",
    "to_mask_tensor",
    "to_tensor",
    "write_csv",
    "write_json",
    "write_png",
]

IMAGE_SUFFIX = "_example.png"
MASK_SUFFIX = "_example_mask.png"
MANIFEST_COLUMNS = ("name", "content", "source", "size", "protected_pixels")


# ---------------------------------------------------------------------------------------------
# Reading and writing


def mask_path_for(image_path: str | os.PathLike) -> Path:
    """Mask path of an image in the official layout (``X_example.png`` -> ``X_example_mask.png``)."""
    p = Path(image_path)
    if not p.name.endswith(IMAGE_SUFFIX):
        raise ValueError(f"{p}: expected a name ending in '{IMAGE_SUFFIX}'")
    return p.with_name(p.name[: -len(".png")] + "_mask.png")


def scan_pairs(
    folder: str | os.PathLike, *, orphans: bool = True
) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, str]]]:
    """The one folder reader: ``(name, image_path, mask_path)`` of every complete
    ``NAME_example.png`` + ``NAME_example_mask.png`` pair, sorted, and ``(name, problem)`` (one
    line) of every image without its mask and, with ``orphans``, every mask without its image."""
    folder = Path(folder)
    pairs, problems = [], []
    for img in sorted(folder.glob("*" + IMAGE_SUFFIX)):
        name, mask = img.name[: -len(IMAGE_SUFFIX)], mask_path_for(img)
        if mask.is_file():
            pairs.append((name, img, mask))
        else:
            problems.append((name, f"{img}: no mask next to it (expected {mask.name})"))
    for mask in sorted(folder.glob("*" + MASK_SUFFIX)) if orphans else []:
        name = mask.name[: -len(MASK_SUFFIX)]
        if not (folder / (name + IMAGE_SUFFIX)).exists():
            problems.append((name, f"{mask}: a mask without its image {name}{IMAGE_SUFFIX}"))
    return pairs, problems


def list_pairs(folder: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(name, image_path, mask_path)`` for every ``NAME_example.png`` in ``folder``, sorted
    (:func:`scan_pairs`, strict).

    Raises ``FileNotFoundError`` if the folder is missing, holds no image, or an image has no mask.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    pairs, problems = scan_pairs(folder, orphans=False)
    if problems:
        raise FileNotFoundError(problems[0][1])
    if not pairs:
        raise FileNotFoundError(f"{folder}: no '*{IMAGE_SUFFIX}' images")
    return pairs


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    try:
        with Image.open(p) as src:
            src.load()
            frames = getattr(src, "n_frames", 1)
            im = src.copy()  # detached from the file, which is closed on leaving the block
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{p}: cannot read {what} ({e})") from e
    if frames > 1:
        warnings.warn(f"{p}: {frames} frames; using the first", stacklevel=3)
    return im


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _to_unit(a: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Integer/bool pixel values -> float32 in [0, 1], scaled by the type's full range."""
    if a.dtype == bool:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype in (np.uint16, np.int32):
        # Pillow reads 16-bit grey PNG/TIFF as 'I;16' or 'I' (int32 holding 0..65535).
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{path}: {what} values outside 0..65535; unsupported integer image")
        return (a.astype(np.float64) / 65535.0).astype(np.float32)
    raise ValueError(f"{path}: unsupported {what} pixel type {a.dtype} (use 8- or 16-bit PNG)")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as float32 ``H x W x 3`` in [0, 1].

    8-bit values are divided by 255, 16-bit grey by 65535; 16-bit RGB PNGs are read at 8-bit
    precision (Pillow keeps the high byte; a warning says so). Grey and bilevel images are
    replicated to 3 channels, palette images expanded. An alpha channel is DROPPED (the stored
    colour values are kept, not composited), with a warning when some pixel is not opaque.
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file.
    """
    p = Path(path)
    im = _open(p, "image")
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            frac = float((alpha < 255).mean())
            warnings.warn(
                f"{p}: alpha channel dropped ({frac:.1%} of pixels not opaque); "
                "colour values are used as stored, not composited",
                stacklevel=2,
            )
        im = im.convert("RGB") if mode not in ("LA", "La") else im.convert("L")
        mode = im.mode
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im, mode = im.convert("RGB"), "RGB"
    if mode == "RGB" and _png_bit_depth(p) == 16:
        warnings.warn(f"{p}: 16-bit RGB PNG read at 8-bit precision", stacklevel=2)
    if mode not in ("RGB", "L", "1", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(f"{p}: unsupported image mode '{mode}'")
    a = np.asarray(im)
    if mode.startswith("I;16"):
        a = a.astype(np.uint16)
    x = _to_unit(a, p, "image")
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] != 3 or min(x.shape[:2]) < 1:
        raise ValueError(f"{p}: expected an H x W x 3 image, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def read_mask(path: str | os.PathLike, threshold: float = 0.5) -> np.ndarray:
    """Read a protected-region mask as bool ``H x W`` (True = protected).

    Expects 8-bit grey with values 0/255 (16-bit grey, bilevel and grey stored as RGB are
    accepted). Other values are thresholded at ``threshold`` of full scale (``>=``) with a warning
    naming the file and the fraction of intermediate values. Raises ``ValueError`` for colour
    masks, masks with transparency, and masks that are empty or cover the whole image.
    """
    p = Path(path)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    im = _open(p, "mask")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if np.asarray(im.getchannel("A")).min() < 255:
            raise ValueError(
                f"{p}: mask has transparent pixels; save it as 8-bit grey (0 = free, 255 = protected)"
            )
        im = im.convert("RGB") if im.mode != "LA" else im.convert("L")
    if im.mode == "RGB":
        rgb = np.asarray(im)
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise ValueError(f"{p}: mask has colour; expected grey (0 = free, 255 = protected)")
        a = rgb[..., 0]
    elif im.mode in ("L", "1", "I", "I;16", "I;16B", "I;16L"):
        a = np.asarray(im)
        if im.mode.startswith("I;16"):
            a = a.astype(np.uint16)
    else:
        raise ValueError(f"{p}: unsupported mask mode '{im.mode}'")
    v = _to_unit(a, p, "mask")
    intermediate = float(((v != 0) & (v != 1)).mean())
    if intermediate > 0:
        warnings.warn(
            f"{p}: mask is not binary ({intermediate:.2%} of pixels between 0 and max); "
            f"thresholded at {threshold:.0%}",
            stacklevel=2,
        )
    m = v >= threshold
    if not m.any():
        raise ValueError(f"{p}: mask is empty (no pixel >= {threshold:.0%} of full scale)")
    if m.all():
        raise ValueError(f"{p}: mask covers the whole image; nothing is left unprotected")
    return m


def read_pair(
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Read an image and its mask (default: the official-layout mask next to it), checking sizes."""
    image_path = Path(image_path)
    mask_path = mask_path_for(image_path) if mask_path is None else Path(mask_path)
    x = read_image(image_path)
    m = read_mask(mask_path, threshold=threshold)
    if m.shape != x.shape[:2]:
        raise ValueError(
            f"mask {mask_path} is {m.shape[1]}x{m.shape[0]} (WxH) but image {image_path} is "
            f"{x.shape[1]}x{x.shape[0]}"
        )
    return x, m


def _to_uint8(array, path: Path) -> np.ndarray:
    a = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        hint = " (for a 3 x H x W tensor use .permute(1, 2, 0))" if a.ndim == 3 else ""
        raise ValueError(f"{path}: expected H x W x 3 or H x W array, got shape {a.shape}{hint}")
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: array has NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{path}: float values must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        # Round to nearest: the 8-bit value closest to the float image.
        return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"{path}: unsupported dtype {a.dtype} (use float in [0, 1], uint8 or bool)")


def temp_file_for(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A temporary file next to ``path`` for an atomic write, with the usual permissions.

    ``mkstemp`` creates files readable by the owner only; outputs should follow the umask
    like any other file, so the mode is reset before the rename publishes the file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def write_png(path: str | os.PathLike, array, overwrite: bool = False) -> Path:
    """Write an 8-bit PNG atomically (temporary file in the same folder, then rename).

    ``array``: float in [0, 1] (rounded to the nearest 8-bit value), uint8, or bool (0/255);
    ``H x W x 3`` (RGB) or ``H x W`` (grey). Refuses to replace an existing file unless
    ``overwrite=True`` (``FileExistsError``), so an original image cannot be clobbered by mistake.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: write_png writes .png files only")
    a = _to_uint8(array, path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(a).save(f, format="PNG")
        _publish(Path(tmp), path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    # A hard link fails if the target appeared since the check, closing the race.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write ``df`` to ``path`` as CSV atomically (no index); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically; creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=float)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------------
# Stage folders: NAME.png (+ NAME_mask.png) with a manifest.csv


def read_folder(folder: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a stage folder (``manifest.csv``)."""
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes {folder} first")
    return pd.read_csv(path)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 float array -> (1, 3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()


def to_mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """H x W bool array -> (1, 1, H, W) float tensor."""
    return torch.from_numpy(mask.astype(np.float32))[None, None]


def to_array(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) tensor -> H x W x 3 float array."""
    return t.detach().float().cpu().reshape(3, *t.shape[-2:]).permute(1, 2, 0).numpy()


def load_prepared(folder, names=None) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """Manifest, images (N, 3, H, W) and masks (N, 1, H, W) of a prepared folder."""
    folder = Path(folder)
    df = read_folder(folder)
    if names is not None:
        df = df[df["name"].isin(names)].reset_index(drop=True)
    images = torch.cat([to_tensor(read_image(folder / f"{n}.png")) for n in df["name"]])
    masks = torch.cat([to_mask_tensor(read_mask(folder / f"{n}_mask.png")) for n in df["name"]])
    return df, images, masks
