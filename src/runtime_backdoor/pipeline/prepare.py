"""Stage ``prepare``: validate the raw image/mask pairs and write them square to ``data/prepared``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..data import list_pairs, read_image, read_mask, read_pair, write_csv, write_json, write_png


def _fit(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize the short side to ``size`` and centre-crop to a square (mask: nearest)."""
    h, w = mask.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((nw, nh), Image.BICUBIC)
    msk = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)
    top, left = (nh - size) // 2, (nw - size) // 2
    box = (left, top, left + size, top + size)
    return np.asarray(img.crop(box)) / 255.0, np.asarray(msk.crop(box)) > 127


def prepare(raw_dir, out_dir, size: int = 128, limit: int = 0) -> pd.DataFrame:
    """Validate every image/mask pair of ``raw_dir`` (official layout) and write them square.

    ``size``: side in pixels after resizing (0 keeps the originals, which must then
    share one size); ``limit``: keep the first N images (0 = all). Images whose mask is
    empty after resizing are reported and dropped. Returns the manifest written.
    """
    if size < 0 or limit < 0:
        raise ValueError(f"size and limit must be >= 0, got size={size}, limit={limit}")
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    pairs = list_pairs(raw_dir)
    info = pd.read_csv(raw_dir / "manifest.csv") if (raw_dir / "manifest.csv").is_file() else None
    content = dict(zip(info["name"], info["content"], strict=True)) if info is not None else {}
    if limit:
        pairs = pairs[:limit]
    rows = []
    for name, image_path, mask_path in pairs:
        image, mask = read_pair(image_path, mask_path)
        if size:
            image, mask = _fit(image, mask, size)
        if not mask.any() or mask.all():
            raise ValueError(f"{mask_path}: mask is empty or full after resizing to {size} px")
        write_png(out_dir / f"{name}.png", image, overwrite=True)
        write_png(out_dir / f"{name}_mask.png", mask, overwrite=True)
        rows.append(
            {
                "name": name,
                "content": content.get(name, "unknown"),
                "height": image.shape[0],
                "width": image.shape[1],
                "protected_fraction": float(mask.mean()),
            }
        )
    df = pd.DataFrame(rows)
    if size == 0 and df[["height", "width"]].drop_duplicates().shape[0] > 1:
        raise ValueError(f"{raw_dir}: images differ in size; set prepare.size to resize them")
    write_csv(out_dir / "manifest.csv", df)
    return df


def preview_figure(manifest: pd.DataFrame, out_dir):
    """The first image of each content type over its mask."""
    from ..plots import plt

    firsts = manifest.groupby("content").head(1)["name"].tolist()
    fig, axes = plt.subplots(2, len(firsts), figsize=(2.2 * len(firsts), 4.4), squeeze=False)
    for i, name in enumerate(firsts):
        axes[0, i].imshow(read_image(Path(out_dir) / f"{name}.png"))
        axes[1, i].imshow(read_mask(Path(out_dir) / f"{name}_mask.png"), cmap="gray")
        axes[0, i].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    return fig


def run(raw_dir, out_dir, *, size: int = 128, limit: int = 0) -> dict:
    """The stage: prepared images, ``manifest.csv`` and ``summary.json`` in ``out_dir``."""
    manifest = prepare(raw_dir, out_dir, size=size, limit=limit)
    summary = {"n_images": int(len(manifest)), "size": int(manifest["height"].iloc[0])}
    write_json(Path(out_dir) / "summary.json", summary)
    return {"manifest": manifest, "summary": summary}
