"""Training the embedded miniature LaMa from scratch (its files: :mod:`runtime_backdoor.editors.mini`).

The miniature is LaMa's own generator (:class:`~runtime_backdoor.editors.lama.FFCResNetGenerator`)
with a small :class:`~runtime_backdoor.editors.lama.LamaConfig`, trained on photos that ship with
scikit-image (:func:`runtime_backdoor.samples.training_images`, never the evaluation sample) with
random box, stroke, ellipse and text masks. The losses follow Big-LaMa's recipe in kind
(``configs/training/big-lama.yaml``): L1 on the known pixels only, a perceptual loss, and
optionally a patch discriminator with feature matching. Big-LaMa's perceptual network is a
pretrained segmentation ResNet; no weights can be downloaded here, so the perceptual loss uses a
fixed, seeded random convolutional network (random features still compare local structure,
which is what keeps the fill from collapsing to a smooth average)::

    editor, history = train_miniature(training_images(64, n=256), config=LamaConfig(...),
                                      steps=600, size=64)
    save_miniature(editor, "models/mini-lama/mini-lama.safetensors", meta=history["meta"])
    editor = load_miniature("models/mini-lama/mini-lama.safetensors")

:func:`train_miniature` is one long function on purpose: the committed miniature was trained by
it, and its weights cannot be reproduced bit for bit across CPUs (docs/reproducibility.md), so a
refactor could not be checked against them; it stays as it is until the miniature is retrained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from tqdm.auto import tqdm

from .editors.lama import FFCResNetGenerator, LamaConfig, LamaEditor


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that determines a trained miniature; ``params.yaml`` mirrors these fields."""

    ngf: int = 16
    n_downsampling: int = 2
    n_blocks: int = 3
    global_ratio: float = 0.75
    steps: int = 300  #: optimiser steps (the run also stops at ``max_seconds``)
    max_seconds: float | None = None  #: wall-clock budget; None = steps only (reproducible)
    batch_size: int = 8
    size: int = 64  #: training crops, px (the generator is fully convolutional + FFT)
    n_images: int = 256  #: distinct training crops drawn by ``samples.training_images``
    lr: float = 1e-3
    l1_known: float = 10.0  #: Big-LaMa: 10 on known pixels
    l1_hole: float = 0.0  #: Big-LaMa: 0 on the hole
    perceptual: float = 30.0  #: Big-LaMa's ResNet perceptual weight; here random features
    adversarial: float = 10.0  #: Big-LaMa: 10 (patch discriminator, non-saturating)
    feature_matching: float = 100.0  #: Big-LaMa: 100 (discriminator features)
    seed: int = 0

    def config(self) -> LamaConfig:
        return LamaConfig(
            ngf=self.ngf,
            n_downsampling=self.n_downsampling,
            n_blocks=self.n_blocks,
            global_ratio=self.global_ratio,
        )


#: The recipe of the pipeline's ``editor`` stage (``params.yaml`` mirrors it).
DEFAULT_RECIPE = TrainingRecipe()

_LOSS_NAMES = ("l1_known", "l1_hole", "perceptual", "adversarial", "feature_matching")


# --------------------------------------------------------------------------- masks


def random_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random training hole, bool ``size x size``: boxes, strokes, ellipses or text.

    Mirrors the shapes users erase (LaMa's irregular strokes and boxes) and the shapes the
    protection covers (watermark text, round logos, faces). Covers roughly 3-40 % of the image.
    """
    ss = 2  # draw at twice the size, then downsample: smooth shapes, same rng use at any size
    s = size * ss
    im = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(im)
    kind = rng.choice(("box", "stroke", "ellipse", "text"), p=(0.25, 0.25, 0.25, 0.25))
    if kind == "box":
        for _ in range(int(rng.integers(1, 3))):
            w, h = rng.uniform(0.1, 0.45, 2) * s
            x, y = rng.uniform(0, s - w), rng.uniform(0, s - h)
            draw.rectangle((x, y, x + w, y + h), fill=255)
    elif kind == "stroke":
        for _ in range(int(rng.integers(1, 4))):
            width = int(rng.uniform(0.03, 0.1) * s)
            pts = [tuple(rng.uniform(0, s, 2))]
            for _ in range(int(rng.integers(2, 6))):
                angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.35) * s
                x, y = pts[-1]
                pts.append(
                    (
                        float(np.clip(x + length * math.cos(angle), 0, s)),
                        float(np.clip(y + length * math.sin(angle), 0, s)),
                    )
                )
            draw.line(pts, fill=255, width=width, joint="curve")
            for x, y in pts:
                draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    elif kind == "ellipse":
        for _ in range(int(rng.integers(1, 3))):
            rx, ry = rng.uniform(0.06, 0.25, 2) * s
            cx, cy = rng.uniform(rx, s - rx), rng.uniform(ry, s - ry)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    else:
        font = _font(max(8, int(rng.uniform(0.08, 0.2) * s)))
        letters = "ABCDEFGHJKLMNPRSTUVWXYZ©0123456789 "
        for _ in range(int(rng.integers(1, 4))):
            text = "".join(rng.choice(list(letters), int(rng.integers(3, 10))))
            draw.text(
                tuple(rng.uniform(-0.1, 0.8, 2) * s),
                text,
                fill=255,
                font=font,
                stroke_width=max(1, s // 64),
                stroke_fill=255,
            )
    m = np.asarray(im.resize((size, size), Image.BILINEAR)) >= 128
    if not m.any() or m.all():  # degenerate draw (text off-image): fall back to a centred box
        m = np.zeros((size, size), bool)
        m[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    return m


def _font(px: int) -> ImageFont.ImageFont:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        return ImageFont.truetype(str(path), px)
    except (ImportError, OSError):
        return ImageFont.load_default()


# --------------------------------------------------------------------------- losses


class RandomFeatures(nn.Module):
    """A fixed random conv net (seeded, He init) whose multi-scale features define a perceptual loss."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128), seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, cin = [], 3
        for i, w in enumerate(widths):
            conv = nn.Conv2d(
                cin, w, 3, stride=1 if i == 0 else 2, padding=1, padding_mode="reflect"
            )
            with torch.no_grad():
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=g) * math.sqrt(2 / (cin * 9))
                )
                conv.bias.zero_()
            layers.append(conv)
            cin = w
        self.convs = nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], (x - 0.5) / 0.25
        for conv in self.convs:
            h = F.relu(conv(h))
            feats.append(h)
        return feats


def perceptual_loss(net: RandomFeatures, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the feature MSE, each normalised by the target features' mean square."""
    loss = pred.new_zeros(())
    for fp, ft in zip(net(pred), net(target), strict=True):
        loss = loss + F.mse_loss(fp, ft) / ft.pow(2).mean().clamp_min(1e-6)
    return loss / len(net.convs)


class PatchDiscriminator(nn.Module):
    """LaMa's ``NLayerDiscriminator`` in miniature: strided 4x4 convs, one logit per patch."""

    def __init__(self, ndf: int = 32, n_layers: int = 3) -> None:
        super().__init__()
        blocks, cin = [], 3
        for i in range(n_layers):
            cout = ndf * 2 ** min(i, 3)
            norm = nn.BatchNorm2d(cout) if i else nn.Identity()
            blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 4, 2, 1), norm, nn.LeakyReLU(0.2)))
            cin = cout
        blocks.append(nn.Sequential(nn.Conv2d(cin, 1, 3, 1, 1)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return x, feats[:-1]


# --------------------------------------------------------------------------- training


def _batches(images: np.ndarray, size: int, batch_size: int, rng: np.random.Generator):
    n, h, w, _ = images.shape
    while True:
        idx = rng.integers(0, n, batch_size)
        out = np.empty((batch_size, size, size, 3), np.float32)
        for j, i in enumerate(idx):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            crop = images[i, y : y + size, x : x + size]
            out[j] = crop[:, ::-1] if rng.random() < 0.5 else crop
        masks = np.stack([random_mask(size, rng) for _ in range(batch_size)])
        yield (
            torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(masks[:, None].astype(np.float32)),
        )


def train_miniature(
    images: Sequence[np.ndarray] | np.ndarray,
    *,
    config: LamaConfig,
    steps: int = DEFAULT_RECIPE.steps,
    max_seconds: float | None = DEFAULT_RECIPE.max_seconds,
    batch_size: int = DEFAULT_RECIPE.batch_size,
    size: int = DEFAULT_RECIPE.size,
    lr: float = DEFAULT_RECIPE.lr,
    l1_known: float = DEFAULT_RECIPE.l1_known,
    l1_hole: float = DEFAULT_RECIPE.l1_hole,
    perceptual: float = DEFAULT_RECIPE.perceptual,
    adversarial: float = DEFAULT_RECIPE.adversarial,
    feature_matching: float = DEFAULT_RECIPE.feature_matching,
    seed: int = DEFAULT_RECIPE.seed,
    callback: Callable[[int, LamaEditor], dict] | None = None,
    callback_every: int = 0,
    progress: bool = True,
) -> tuple[LamaEditor, dict]:
    """Train an :class:`FFCResNetGenerator` from scratch on CPU or GPU; return ``(editor, history)``.

    ``images``: float ``H x W x 3`` arrays in [0, 1], all of one size ``>= size`` (random
    ``size`` crops are taken, mirrored at random). Each step draws a batch and one random hole per
    image (:func:`random_mask`). Losses, weighted by the arguments: masked L1 on known and hole
    pixels of the raw prediction, the random-feature perceptual loss, and, when ``adversarial`` or
    ``feature_matching`` > 0, a patch discriminator trained alongside (non-saturating loss; the
    discriminator sees the composited fill, holes labelled fake). Training stops after ``steps``
    or ``max_seconds``, whichever comes first; for a fixed ``seed`` and ``steps`` (no time limit)
    the weights are reproducible on one machine. ``callback(step, editor)`` runs at step 0 and
    every ``callback_every`` steps (and at the end); its dicts are collected in
    ``history["evals"]``. The editor is returned frozen, in eval mode, on the CPU.
    """
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative whole number, got {steps}")
    if batch_size < 1 or size < 2**config.n_downsampling or size % 2**config.n_downsampling:
        raise ValueError(
            f"size must be a multiple of 2**n_downsampling = {2**config.n_downsampling}, got {size}"
        )
    weights = dict(
        zip(
            _LOSS_NAMES, (l1_known, l1_hole, perceptual, adversarial, feature_matching), strict=True
        )
    )
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"loss weights must be non-negative and not all zero, got {weights}")
    arr = np.stack([np.asarray(a, np.float32) for a in images])
    if arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape[1:3]) < size:
        raise ValueError(f"images must be H x W x 3 arrays of one size >= {size}, got {arr.shape}")

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = FFCResNetGenerator(config)
        use_disc = adversarial > 0 or feature_matching > 0
        disc = PatchDiscriminator() if use_disc else None
    features = RandomFeatures(seed=seed) if perceptual > 0 else None
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.9, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.9, 0.999)) if disc else None

    def evaluate(step: int) -> None:
        if callback is None:
            return
        editor = LamaEditor(generator)  # shares the weights; eval mode for the callback only
        out = callback(step, editor)
        generator.requires_grad_(True)  # LamaEditor froze it
        generator.train()
        evals.append({"step": step, "seconds": round(time.perf_counter() - start, 2), **out})

    history: dict = {"step": [], "loss": [], **{k: [] for k in weights if weights[k]}}
    evals: list[dict] = []
    batches = _batches(arr, size, batch_size, rng)
    start = time.perf_counter()
    generator.train()
    evaluate(0)
    bar = tqdm(range(int(steps)), desc="train mini-lama", disable=not progress)
    done = 0
    for step in bar:
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
        img, mask = batches.__next__()
        pred = generator(torch.cat([img * (1 - mask), mask], dim=1))
        inpainted = mask * pred + (1 - mask) * img
        terms: dict[str, torch.Tensor] = {}
        err = (pred - img).abs()
        if l1_known:
            terms["l1_known"] = (err * (1 - mask)).mean()
        if l1_hole:
            terms["l1_hole"] = (err * mask).mean()
        if features is not None:
            terms["perceptual"] = perceptual_loss(features, pred, img)
        if disc is not None:
            # discriminator step: real images real, holes of the composited fill fake
            fake_logits, _ = disc(inpainted.detach())
            real_logits, _ = disc(img)
            hole = F.adaptive_max_pool2d(mask, fake_logits.shape[-2:])
            d_loss = (
                F.softplus(-real_logits).mean()
                + (F.softplus(fake_logits) * hole + F.softplus(-fake_logits) * (1 - hole)).mean()
            )
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            disc.requires_grad_(False)
            fake_logits, fake_feats = disc(inpainted)
            if adversarial:
                terms["adversarial"] = (
                    F.softplus(-fake_logits) * hole
                ).sum() / hole.sum().clamp_min(1)
            if feature_matching:
                with torch.no_grad():
                    _, real_feats = disc(img)
                terms["feature_matching"] = sum(
                    F.l1_loss(a, b) for a, b in zip(fake_feats, real_feats, strict=True)
                ) / len(real_feats)
            disc.requires_grad_(True)
        loss = sum(weights[k] * v for k, v in terms.items())
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        done = step + 1
        history["step"].append(done)
        history["loss"].append(float(loss.detach()))
        for k, v in terms.items():
            history[k].append(float(v.detach()))
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if callback_every and done % callback_every == 0:
            evaluate(done)
    seconds = time.perf_counter() - start
    if callback is not None and (not evals or evals[-1]["step"] != done):
        evaluate(done)
    history["evals"] = evals
    history["meta"] = {
        "steps": done,
        "seconds": round(seconds, 2),
        "seed": seed,
        "batch_size": batch_size,
        "size": size,
        "lr": lr,
        "n_images": len(arr),
        "losses": {k: v for k, v in weights.items()},
        "threads": torch.get_num_threads(),
    }
    return LamaEditor(generator), history


def train_recipe(recipe: TrainingRecipe = DEFAULT_RECIPE, progress: bool = True, **kwargs):
    """Train with ``recipe`` on ``samples.training_images(recipe.size, recipe.seed, recipe.n_images)``."""
    from .samples import training_images

    images = training_images(recipe.size, recipe.seed, recipe.n_images)
    options = {f.name: getattr(recipe, f.name) for f in fields(recipe)}
    for key in ("ngf", "n_downsampling", "n_blocks", "global_ratio", "n_images"):
        options.pop(key)
    editor, history = train_miniature(
        images, config=recipe.config(), progress=progress, **options, **kwargs
    )
    history["meta"]["recipe"] = asdict(recipe)
    return editor, history


__all__ = [
    "DEFAULT_RECIPE",
    "PatchDiscriminator",
    "RandomFeatures",
    "TrainingRecipe",
    "perceptual_loss",
    "random_mask",
    "train_miniature",
    "train_recipe",
]
