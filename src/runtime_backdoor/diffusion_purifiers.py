"""Diffusion-based purifiers (real weights only; :mod:`runtime_backdoor.purifiers` documents
each one and re-exports everything here, so ``purifiers.diffpure`` etc. keep working).

- DiffPure, GrIDPure and (noisy) upscaling: see :mod:`runtime_backdoor.purifiers`;
- ``img2img-denoise:S``: the off-the-shelf image-to-image denoiser of Pleimling et al.
  (SaTML 2026, arXiv 2602.22197): SD 1.5 image-to-image (weights ``sd15``) at strength S
  (default 0.15) with the prompt :data:`DENOISE_PROMPT` against the negative prompt
  :data:`DENOISE_NEGATIVE_PROMPT`, diffusers' own defaults otherwise (guidance 7.5,
  50 steps, so int(50·S) denoising steps: 7 at 0.15), on the scheduler of
  :func:`load_img2img` (DDIM, η = 0);
- ``vae-roundtrip``: SD 1.5's VAE (the ``sd15`` set's ``vae/``): the image mapped to
  [-1, 1], encoded, the posterior's mode decoded, mapped back (:func:`vae_roundtrip`);
  deterministic. A different autoencoder from any editor that is not SD-based (LaMa); the
  SD 1.5 inpainting editor ships the same VAE.

Each one draws its noise from CPU generators seeded per image with ``seed``, so the output of
an image does not depend on the batch it is in; outputs are stored in 8 bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .model_paths import fetch_command, models_dir
from .robustness import gaussian_noise as _robust_noise
from .robustness import to_8bit

#: the neutral prompt of the upscaler (guidance 9 against the empty negative prompt)
UPSCALE_PROMPT = "a high quality photograph"
#: Gaussian noise added to the ×4-downscaled image by ``noisy-upscale`` (on [0, 1])
UPSCALE_NOISE_SIGMA = 0.1

# GrIDPure's settings
GRID_TILE, GRID_STRIDE, GRID_ITERATIONS, GRID_BLEND = 256, 128, 20, 0.1
#: DiffPure's schedule: strength T runs round(T · DIFFPURE_STEPS) DDIM steps
DIFFPURE_STEPS = 100


#: the off-the-shelf denoiser's prompts (Pleimling et al., 2026) and diffusers' defaults
DENOISE_PROMPT = "Denoise the image"
DENOISE_NEGATIVE_PROMPT = "Add adversarial perturbation to the image"
DENOISE_STRENGTH, DENOISE_STEPS, DENOISE_GUIDANCE = 0.15, 50, 7.5


class WeightsUnavailable(FileNotFoundError):
    """A diffusion purifier's weights are not on this machine (one line, with the fetch command)."""


def unavailable_message(weights_name: str) -> str:
    """The stage's status of a purifier whose weights are missing."""
    return f"unavailable: weights ({fetch_command(weights_name)})"


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


def denoise_model(model: DiffusionModel) -> DiffusionModel:
    """``model``'s image-to-image pipeline with the embeddings of :data:`DENOISE_PROMPT` and
    :data:`DENOISE_NEGATIVE_PROMPT` (its tokenizer and text encoder embed them)."""
    pipe = model.pipe
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError("img2img-denoise needs the pipeline's tokenizer and text encoder")
    embeds, negative = _encode(pipe, DENOISE_PROMPT, DENOISE_NEGATIVE_PROMPT, True)
    return DiffusionModel(pipe, embeds, negative, model.weights)


def img2img_denoise(
    image: torch.Tensor,
    model: DiffusionModel,
    strength: float = DENOISE_STRENGTH,
    steps: int = DENOISE_STEPS,
    guidance: float = DENOISE_GUIDANCE,
    seed: int = 0,
) -> torch.Tensor:
    """The off-the-shelf image-to-image denoiser (Pleimling et al., 2026), 8-bit: SD
    image-to-image at ``strength`` in (0, 1), ``steps`` scheduled steps of which
    int(steps·strength) run, classifier-free guidance ``guidance`` with ``model``'s prompt
    against its negative prompt (``model``: :func:`denoise_model` of :func:`load_img2img`)."""
    if not 0 < strength < 1:
        raise ValueError(f"img2img-denoise strength must be in (0, 1), got {strength}")
    if model.negative_prompt_embeds is None:
        raise ValueError("img2img-denoise needs the negative prompt's embeddings (denoise_model)")
    kwargs = {"strength": float(strength), "num_inference_steps": int(steps)}
    return to_8bit(_run(model, image, float(guidance), seed, **kwargs))


def vae_roundtrip(image: torch.Tensor, vae: Any) -> torch.Tensor:
    """Encode with ``vae`` (a diffusers ``AutoencoderKL``), decode the posterior's mode, 8-bit:
    ``decode(encode(2x - 1).latent_dist.mode()) / 2 + 1/2``. The scaling factor is left out
    (it would cancel). Sides must fit the VAE's downsampling (multiples of 8 for SD 1.5)."""
    x = image.to(vae.device, vae.dtype) * 2 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    if y.shape != image.shape:
        raise ValueError(
            f"vae-roundtrip returned {tuple(y.shape[-2:])} for {tuple(image.shape[-2:])}: "
            "sides must be multiples of the VAE's downsampling (8 for SD 1.5)"
        )
    return to_8bit((y.to(image.device, torch.float32) / 2 + 0.5).clamp(0, 1))


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


__all__ = [
    "DENOISE_GUIDANCE",
    "DENOISE_NEGATIVE_PROMPT",
    "DENOISE_PROMPT",
    "DENOISE_STEPS",
    "DENOISE_STRENGTH",
    "DIFFPURE_STEPS",
    "GRID_BLEND",
    "GRID_ITERATIONS",
    "GRID_STRIDE",
    "GRID_TILE",
    "LOADERS",
    "SD_COMPONENTS",
    "UPSCALE_NOISE_SIGMA",
    "UPSCALE_PROMPT",
    "DiffusionModel",
    "WeightsUnavailable",
    "denoise_model",
    "diffpure",
    "diffpure_raw",
    "downscale",
    "gridpure",
    "img2img_denoise",
    "load_img2img",
    "load_upscaler",
    "tile_starts",
    "unavailable_message",
    "upscale",
    "vae_roundtrip",
    "weights_status",
]
