"""Purifiers: what an attacker may run on a protected image before editing it.

Every purifier is a plain function ``image -> image`` on (B, 3, H, W) tensors in [0, 1] that
returns an image of the same size on the 8-bit grid (how a purified image is stored). Every
parameter is stated here; :func:`parse_purifier` names them by compact specs (``jpeg:75``) in
the one vocabulary of :mod:`runtime_backdoor.transforms` (forms
:data:`~runtime_backdoor.transforms.PURIFY`, one unit per word) so that ``params.yaml`` holds a
suite as one string.

Classical, offline (no weights):

- ``none``: the 8-bit image itself (the reference row);
- ``jpeg:Q``: a PIL JPEG round trip of quality Q (:func:`runtime_backdoor.robustness.jpeg`,
  4:2:0 chroma subsampling); the suite runs Q = 95, 75, 50;
- ``noise:σ``: Gaussian noise of standard deviation σ in 8-bit levels, i.e. σ/255 on [0, 1]
  (12.75 and 25.5 = 0.05 and 0.1 on [0, 1]), drawn from a seed; every image of a batch gets the
  same noise field, so a clean image and its protected copy see the same noise whatever the
  batch (:func:`gaussian_noise`, which takes σ on [0, 1]);
- ``crop:P%``: the central ``100 - P`` % of each side kept (P/2 % cut on each side, P = 10)
  and resized back to the full size (bicubic): the only purifier that moves the content, so
  masks and references are mapped into its frame by :meth:`PurifierSpec.frame`;
- ``adverse-cleaner``: AdverseCleaner (lllyasviel, 2023): 64 bilateral filters (diameter 5,
  σ_color 8, σ_space 8, in 8-bit units) then 4 guided filters (radius 4, eps 16 in 8-bit²
  units) guided by the input, in OpenCV (``cv2.bilateralFilter``,
  ``cv2.ximgproc.guidedFilter``) on float images in [0, 255]
  (:func:`runtime_backdoor.adverse_cleaner.adverse_cleaner`, importable from here too); the
  result is rounded to 8 bits (AdverseCleaner truncates).

Diffusion-based, real weights only (never a random stand-in; without the weights the stage
reports the purifier unavailable):

- ``noisy-upscale:L`` / ``upscale:L``: the image downscaled ×4 (bicubic, antialiased), Gaussian
  noise of σ 0.1 added to it (``noisy-upscale`` only: Hönig et al. 2024, "noisy upscaling"), then
  diffusers' ``StableDiffusionUpscalePipeline`` (``stabilityai/stable-diffusion-x4-upscaler``,
  weights ``sd-x4-upscaler``) back to the input size: 75 steps, guidance 9, the prompt
  :data:`UPSCALE_PROMPT` against an empty negative prompt, ``noise_level`` L (the pipeline's
  own noise on the low-resolution input: upstream default 20; 320 is the strong setting, used
  without extra noise);
- ``diffpure:T``: DiffPure with Stable Diffusion 1.5 image-to-image (``stable-diffusion-v1-5/
  stable-diffusion-v1-5``, weights ``sd15``): the image encoded, noised to strength T
  (0.1 and 0.2) and denoised by DDIM, T·100 of 100 steps, empty prompt, no guidance;
- ``gridpure:T``: GrIDPure (Zhao et al., CVPR 2024): DiffPure at strength T (0.1: 10 of
  100 steps) on overlapping 256-px tiles at stride 128 plus the corner tile, tiles averaged
  where they overlap, 20 iterations, each blended with the input image at 0.1
  (``x ← 0.9·purified + 0.1·x₀``). The original runs a pixel-space guided-diffusion model on
  its tiles; here the tiles go through the same SD 1.5 DiffPure (a stated deviation). An image
  smaller than a tile is one tile.

Each diffusion purifier draws its noise from CPU generators seeded per image with ``seed``, so
the output of an image does not depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import transforms as T
from .adverse_cleaner import (
    BILATERAL_DIAMETER,  # noqa: F401 (re-exported: AdverseCleaner's settings)
    BILATERAL_PASSES,  # noqa: F401
    BILATERAL_SIGMA_COLOR,  # noqa: F401
    BILATERAL_SIGMA_SPACE,  # noqa: F401
    GUIDED_EPS,  # noqa: F401
    GUIDED_PASSES,  # noqa: F401
    GUIDED_RADIUS,  # noqa: F401
    adverse_cleaner,
    bilateral_passes,
    guided_passes,
)
from .model_paths import fetch_command, models_dir
from .robustness import gaussian_noise as _robust_noise
from .robustness import jpeg as _robust_jpeg
from .robustness import to_8bit

#: the suite of the ``purify`` stage, classical part (the stage's default)
CLASSICAL = (
    "jpeg:95",
    "jpeg:75",
    "jpeg:50",
    "noise:12.75",
    "noise:25.5",
    "crop:10%",
    "adverse-cleaner",
)
#: the suite's diffusion part (each needs its weights: :data:`WEIGHTS_OF`)
DIFFUSION = ("noisy-upscale:20", "upscale:320", "diffpure:0.1", "diffpure:0.2", "gridpure:0.1")
#: purifier kind -> the weight set of :data:`runtime_backdoor.weights.REGISTRY` it needs
WEIGHTS_OF = {
    "noisy-upscale": "sd-x4-upscaler",
    "upscale": "sd-x4-upscaler",
    "diffpure": "sd15",
    "gridpure": "sd15",
}
#: the weight sets only the purifiers read (no editor does)
WEIGHT_SETS = tuple(dict.fromkeys(WEIGHTS_OF.values()))
#: kinds that take no value / need one, with the default where a value is optional
KINDS = ("none", "jpeg", "noise", "crop", "adverse-cleaner", *WEIGHTS_OF)
DEFAULT_VALUE = {"gridpure": 0.1}

#: the neutral prompt of the upscaler (guidance 9 against the empty negative prompt)
UPSCALE_PROMPT = "a high quality photograph"
#: Gaussian noise added to the ×4-downscaled image by ``noisy-upscale`` (on [0, 1])
UPSCALE_NOISE_SIGMA = 0.1

# GrIDPure's settings
GRID_TILE, GRID_STRIDE, GRID_ITERATIONS, GRID_BLEND = 256, 128, 20, 0.1
#: DiffPure's schedule: strength T runs round(T · DIFFPURE_STEPS) DDIM steps
DIFFPURE_STEPS = 100


class WeightsUnavailable(FileNotFoundError):
    """A diffusion purifier's weights are not on this machine (one line, with the fetch command)."""


def unavailable_message(weights_name: str) -> str:
    """The stage's status of a purifier whose weights are missing."""
    return f"unavailable: weights ({fetch_command(weights_name)})"


# ------------------------------------------------------------------------------- classical


def identity(image: torch.Tensor) -> torch.Tensor:
    """The image as stored (8-bit): the reference row of a suite."""
    return to_8bit(image)


def jpeg(image: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG round trip of ``quality`` (:func:`runtime_backdoor.robustness.jpeg`)."""
    return _robust_jpeg(image, int(quality))


def gaussian_noise(image: torch.Tensor, sigma: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Gaussian noise of σ ``sigma`` on [0, 1], clipped and stored in 8 bits.

    The noise field is drawn from ``seed`` for one image and added to every image of the batch
    (:func:`runtime_backdoor.robustness.gaussian_noise` image by image).
    """
    return to_8bit(
        torch.cat([_robust_noise(image[i : i + 1], sigma, seed) for i in range(image.shape[0])])
    )


def crop_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, kept height, kept width) of the central crop that cuts ``fraction`` of each side."""
    if not 0 <= fraction < 1:
        raise ValueError(f"crop fraction must be in [0, 1), got {fraction}")
    kh, kw = max(1, round(height * (1 - fraction))), max(1, round(width * (1 - fraction)))
    return (height - kh) // 2, (width - kw) // 2, kh, kw


def _crop_resize(x: torch.Tensor, fraction: float, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left, kh, kw = crop_box(h, w, fraction)
    crop = x[..., top : top + kh, left : left + kw]
    if mode == "bicubic":
        return F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


def crop_resize(image: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Keep the central ``1 - fraction`` of each side and resize back (bicubic), 8-bit."""
    return to_8bit(_crop_resize(image, fraction, "bicubic"))


def crop_resize_mask(mask: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """:func:`crop_resize`'s geometry for a 0/1 mask (bilinear, thresholded at 0.5)."""
    return (_crop_resize(mask.float(), fraction, "bilinear") >= 0.5).to(mask.dtype)


# ------------------------------------------------------------------------------- diffusion


@dataclass
class DiffusionModel:
    """A diffusers pipeline and the prompt embeddings a purifier runs it with.

    ``pipe``: ``StableDiffusionImg2ImgPipeline`` (DiffPure, GrIDPure) or
    ``StableDiffusionUpscalePipeline``; ``prompt_embeds`` (1, tokens, dim) and, for guidance,
    ``negative_prompt_embeds`` of the same shape. ``weights``: its registry entry.
    """

    pipe: Any
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    weights: str = ""

    def embeds(self, batch: int, guidance: bool) -> dict:
        device, dtype = self.pipe.device, self.pipe.unet.dtype
        out = {"prompt_embeds": self.prompt_embeds.to(device, dtype).repeat(batch, 1, 1)}
        if guidance:
            if self.negative_prompt_embeds is None:
                raise ValueError("guidance needs negative_prompt_embeds")
            out["negative_prompt_embeds"] = self.negative_prompt_embeds.to(device, dtype).repeat(
                batch, 1, 1
            )
        return out


def _generators(n: int, seed: int) -> list[torch.Generator]:
    # CPU generators, one per image and all seeded alike: an image's noise does not depend on
    # the batch, nor on the device (diffusers draws on the CPU and moves the noise)
    return [torch.Generator().manual_seed(int(seed)) for _ in range(n)]


def _run(model: DiffusionModel, image: torch.Tensor, guidance: float, seed: int, **kwargs):
    pipe = model.pipe
    b = image.shape[0]
    out = pipe(
        image=image.to(pipe.device, pipe.unet.dtype),
        guidance_scale=guidance,
        generator=_generators(b, seed),
        output_type="pt",
        **model.embeds(b, guidance > 1),
        **kwargs,
    ).images
    return out.to(image.device, torch.float32).clamp(0, 1)


def diffpure_raw(
    image: torch.Tensor,
    model: DiffusionModel,
    strength: float = 0.1,
    steps: int = DIFFPURE_STEPS,
    seed: int = 0,
) -> torch.Tensor:
    """DiffPure before 8-bit storage: noise to ``strength``, denoise ``strength·steps`` steps."""
    if not 0 < strength <= 1:
        raise ValueError(f"DiffPure strength must be in (0, 1], got {strength}")
    return _run(model, image, 1.0, seed, strength=float(strength), num_inference_steps=int(steps))


def diffpure(
    image: torch.Tensor,
    model: DiffusionModel,
    strength: float = 0.1,
    steps: int = DIFFPURE_STEPS,
    seed: int = 0,
) -> torch.Tensor:
    """DiffPure with SD image-to-image (``model``: :func:`load_img2img`), 8-bit."""
    return to_8bit(diffpure_raw(image, model, strength, steps, seed))


def tile_starts(side: int, tile: int = GRID_TILE, stride: int = GRID_STRIDE) -> list[int]:
    """Tile offsets along one side: every ``stride`` px, plus the last (corner) tile so the
    tiles reach the end; one tile when the side is not longer than ``tile``."""
    if tile >= side:
        return [0]
    starts = list(range(0, side - tile + 1, stride))
    if starts[-1] + tile < side:
        starts.append(side - tile)
    return starts


def gridpure(
    image: torch.Tensor,
    model: DiffusionModel,
    strength: float = 0.1,
    steps: int = DIFFPURE_STEPS,
    tile: int = GRID_TILE,
    stride: int = GRID_STRIDE,
    iterations: int = GRID_ITERATIONS,
    blend: float = GRID_BLEND,
    seed: int = 0,
) -> torch.Tensor:
    """GrIDPure: DiffPure on overlapping tiles, averaged, ``iterations`` times, each iteration
    blended with the input (``x ← (1 - blend)·purified + blend·x₀``); 8-bit.

    Iteration ``k`` draws its noise from ``seed + k``.
    """
    h, w = image.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    boxes = [(t, s) for t in tile_starts(h, th, stride) for s in tile_starts(w, tw, stride)]
    x0 = image.float()
    x = x0
    b = image.shape[0]
    for k in range(iterations):
        crops = torch.cat([x[..., t : t + th, s : s + tw] for t, s in boxes])
        out = diffpure_raw(crops, model, strength, steps, seed + k).split(b)
        total, count = torch.zeros_like(x), torch.zeros_like(x[:, :1])
        for (t, s), o in zip(boxes, out, strict=True):
            total[..., t : t + th, s : s + tw] += o
            count[..., t : t + th, s : s + tw] += 1
        x = (1 - blend) * total / count + blend * x0
    return to_8bit(x)


def downscale(image: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Bicubic antialiased downscale by ``factor`` (sides must be multiples of it)."""
    h, w = image.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image sides must be multiples of {factor}, got {h}x{w}")
    small = F.interpolate(
        image.float(), size=(h // factor, w // factor), mode="bicubic", antialias=True,
        align_corners=False,
    )  # fmt: skip
    return small.clamp(0, 1)


def upscale(
    image: torch.Tensor,
    model: DiffusionModel,
    noise_level: int = 20,
    noise_sigma: float = 0.0,
    steps: int = 75,
    guidance: float = 9.0,
    seed: int = 0,
) -> torch.Tensor:
    """(Noisy) upscaling: ×4 down, optional Gaussian noise ``noise_sigma`` (seeded), then the SD
    ×4 upscaler (``model``: :func:`load_upscaler`) back to the input size; 8-bit."""
    if not 0 <= noise_level <= model.pipe.config.max_noise_level:
        raise ValueError(
            f"noise_level must be in [0, {model.pipe.config.max_noise_level}], got {noise_level}"
        )
    small = downscale(image)
    if noise_sigma > 0:
        small = torch.cat(
            [_robust_noise(small[i : i + 1], noise_sigma, seed) for i in range(small.shape[0])]
        )
    out = _run(
        model, small, guidance, seed, noise_level=int(noise_level), num_inference_steps=int(steps)
    )
    if out.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"the upscaler returned {tuple(out.shape[-2:])}, not {tuple(image.shape[-2:])}"
        )
    return to_8bit(out)


# ------------------------------------------------------------------------------- weights


def weights_status(name: str, root: Path | None = None) -> tuple[bool, str]:
    """(available, status) of a purifier weight set: whether its diffusers folder
    (``model_index.json``) is at ``root/NAME`` (default ``models/``); never downloads, and
    checks no checksum (``runtime-backdoor weights verify`` does). The status of a missing set
    is :func:`unavailable_message`."""
    ok = (Path(root or models_dir()) / name / "model_index.json").is_file()
    return ok, "ok" if ok else unavailable_message(name)


#: the components with weights of the diffusion purifiers' folders: safetensors only
SD_COMPONENTS = ("unet", "vae", "text_encoder")


def _folder(name: str, folder: str | Path | None) -> Path:
    path = Path(folder) if folder is not None else models_dir() / name
    if not (path / "model_index.json").is_file():
        raise WeightsUnavailable(
            f"{name}: no diffusers folder at {path} (run `{fetch_command(name)}`)"
        )
    return path


def _encode(pipe, prompt: str, negative: str, guidance: bool):
    with torch.no_grad():
        embeds, negative_embeds = pipe.encode_prompt(prompt, pipe.device, 1, guidance, negative)
    return embeds, negative_embeds


def load_img2img(
    folder: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionModel:
    """SD 1.5 image-to-image from the ``sd15`` folder, with a DDIM scheduler (deterministic,
    η = 0) and the empty prompt's embeddings; no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from .editors.diffusion import refuse_pickle_weights

    path = _folder("sd15", folder)
    refuse_pickle_weights(path, SD_COMPONENTS)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        path, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=True, use_safetensors=True,
    )  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = _encode(pipe, "", "", False)
    return DiffusionModel(pipe, embeds, None, "sd15")


def load_upscaler(
    folder: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt: str = UPSCALE_PROMPT,
) -> DiffusionModel:
    """The SD ×4 upscaler from the ``sd-x4-upscaler`` folder, with ``prompt``'s and the empty
    negative prompt's embeddings."""
    from diffusers import StableDiffusionUpscalePipeline

    from .editors.diffusion import refuse_pickle_weights

    path = _folder("sd-x4-upscaler", folder)
    refuse_pickle_weights(path, SD_COMPONENTS)
    pipe = StableDiffusionUpscalePipeline.from_pretrained(
        path, local_files_only=True, use_safetensors=True
    )
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = _encode(pipe, prompt, "", True)
    return DiffusionModel(pipe, embeds, negative, "sd-x4-upscaler")


LOADERS: dict[str, Callable[..., DiffusionModel]] = {
    "sd15": load_img2img,
    "sd-x4-upscaler": load_upscaler,
}


# ------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class PurifierSpec:
    """A purifier named in ``params.yaml``: ``kind`` or ``kind:value``, ``value`` in the unit of
    :data:`runtime_backdoor.transforms.TABLE` (noise σ in 8-bit levels, crop in % of the side)."""

    kind: str
    value: float | None = None

    @property
    def name(self) -> str:
        return T.Spec(self.kind, self.value, "%" if self.kind == "crop" else "").name

    @property
    def family(self) -> str:
        return "diffusion" if self.kind in WEIGHTS_OF else "classical"

    @property
    def weights(self) -> str | None:
        """The weight set it needs (``None``: none)."""
        return WEIGHTS_OF.get(self.kind)

    def frame(self, spatial: torch.Tensor, mask: bool = False) -> torch.Tensor:
        """Map an image (or a 0/1 mask) into the purified image's frame: only ``crop`` moves
        the content; every other purifier keeps the geometry."""
        if self.kind != "crop":
            return spatial
        fraction = self.value / 100
        return crop_resize_mask(spatial, fraction) if mask else crop_resize(spatial, fraction)


def parse_purifier(text: str | PurifierSpec) -> PurifierSpec:
    """``none``, ``jpeg:75``, ``noise:12.75`` (σ in 8-bit levels), ``crop:10%``,
    ``adverse-cleaner``, ``noisy-upscale:20``, ``upscale:320``, ``diffpure:0.1``, ``gridpure``
    (= ``gridpure:0.1``): the forms :data:`runtime_backdoor.transforms.PURIFY`."""
    if isinstance(text, PurifierSpec):
        return text
    s = T.parse(text, T.PURIFY, what="purifier", defaults=DEFAULT_VALUE)
    return PurifierSpec(s.word, s.value)


def parse_purifiers(text: str | list) -> list[PurifierSpec]:
    """A space-separated string of specs (or a list); names must be unique."""
    items = text.split() if isinstance(text, str) else list(text)
    specs = [parse_purifier(s) for s in items]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"purifiers must be unique, got {names}")
    return specs


def build_purifier(
    spec: str | PurifierSpec, *, seed: int = 0, models: dict[str, DiffusionModel] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``image -> purified image`` of ``spec``; diffusion purifiers take their
    pipeline from ``models`` (weight set name -> :class:`DiffusionModel`)."""
    spec = parse_purifier(spec)
    k, v = spec.kind, spec.value
    if k == "none":
        return identity
    if k == "jpeg":
        return partial(jpeg, quality=int(v))
    if k == "noise":
        return partial(gaussian_noise, sigma=v / 255, seed=seed)
    if k == "crop":
        return partial(crop_resize, fraction=v / 100)
    if k == "adverse-cleaner":
        return adverse_cleaner
    model = (models or {}).get(spec.weights)
    if model is None:
        raise WeightsUnavailable(f"{spec.name}: {unavailable_message(spec.weights)}")
    if k == "noisy-upscale":
        return partial(
            upscale, model=model, noise_level=int(v), noise_sigma=UPSCALE_NOISE_SIGMA, seed=seed
        )
    if k == "upscale":
        return partial(upscale, model=model, noise_level=int(v), noise_sigma=0.0, seed=seed)
    if k == "diffpure":
        return partial(diffpure, model=model, strength=v, seed=seed)
    return partial(gridpure, model=model, strength=v, seed=seed)


# ------------------------------------------------------------------------------- adaptive


def jpeg_differentiable(image: torch.Tensor, quality: float) -> torch.Tensor:
    """kornia's differentiable JPEG (sides padded to multiples of 16 by replication)."""
    import kornia

    h, w = image.shape[-2:]
    pad = ((-h) % 16, (-w) % 16)
    x = F.pad(image, (0, pad[1], 0, pad[0]), mode="replicate") if any(pad) else image
    q = torch.full((x.shape[0],), float(quality), device=x.device, dtype=x.dtype)
    return kornia.enhance.jpeg_codec_differentiable(x, q)[..., :h, :w]


def straight_through(image: torch.Tensor, purify: Callable) -> torch.Tensor:
    """``purify`` forward, the identity backward (BPDA, for the non-differentiable filters)."""
    return image + (purify(image.detach()) - image).detach()


def _uncrop(out: torch.Tensor, image: torch.Tensor, fraction: float) -> torch.Tensor:
    """Map an edit of the crop-resized image back into the original frame (differentiably);
    the cut border keeps the original pixels."""
    h, w = image.shape[-2:]
    top, left, kh, kw = crop_box(h, w, fraction)
    small = F.interpolate(out, size=(kh, kw), mode="bilinear", align_corners=False, antialias=True)
    back = image.clone()
    back[..., top : top + kh, left : left + kw] = small
    return back


__all__ = [
    "CLASSICAL",
    "DIFFUSION",
    "LOADERS",
    "UPSCALE_PROMPT",
    "WEIGHTS_OF",
    "WEIGHT_SETS",
    "DiffusionModel",
    "PurifierSpec",
    "WeightsUnavailable",
    "adverse_cleaner",
    "bilateral_passes",
    "build_purifier",
    "crop_box",
    "crop_resize",
    "crop_resize_mask",
    "diffpure",
    "downscale",
    "gaussian_noise",
    "gridpure",
    "guided_passes",
    "identity",
    "jpeg",
    "jpeg_differentiable",
    "load_img2img",
    "load_upscaler",
    "parse_purifier",
    "parse_purifiers",
    "straight_through",
    "tile_starts",
    "unavailable_message",
    "upscale",
    "weights_status",
]
