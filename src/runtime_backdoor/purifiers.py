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
  result is rounded to 8 bits (AdverseCleaner truncates);
- ``resize:S`` / ``lanczos:S``: downscale by S and back to the size, PIL bicubic / Lanczos;
- chains ``step+step``: classical steps run in order, each stored in 8 bits
  (:mod:`runtime_backdoor.chains`): ``jpeg:75+lanczos:0.5`` (JPEG 75, then 0.5× Lanczos down
  and back: Sun et al. 2026) and ``resize:0.75+jpeg:90`` (a screenshot-like rescale then a
  JPEG re-encode) are the candidates :data:`CANDIDATES`.

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

- ``img2img-denoise:S``: the off-the-shelf denoiser (Pleimling et al., SaTML 2026): SD 1.5
  image-to-image (weights ``sd15``) at strength S (bare: 0.15), "Denoise the image" against the
  negative prompt "Add adversarial perturbation to the image", guidance 7.5, 50 scheduled
  DDIM steps (int(50·S) run);
- ``vae-roundtrip``: SD 1.5's VAE (``sd15``), encode, posterior mode, decode (deterministic).

They live in :mod:`runtime_backdoor.diffusion_purifiers` and are re-exported here.
Each diffusion purifier draws its noise from CPU generators seeded per image with ``seed``, so
the output of an image does not depend on the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

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
from .chains import CHAINS, compose, lanczos_back
from .diffusion_purifiers import (  # noqa: F401 (re-exported: the diffusion purifiers)
    DENOISE_GUIDANCE,
    DENOISE_NEGATIVE_PROMPT,
    DENOISE_PROMPT,
    DENOISE_STEPS,
    DENOISE_STRENGTH,
    DIFFPURE_STEPS,
    GRID_BLEND,
    GRID_ITERATIONS,
    GRID_STRIDE,
    GRID_TILE,
    LOADERS,
    SD_COMPONENTS,
    UPSCALE_NOISE_SIGMA,
    UPSCALE_PROMPT,
    DiffusionModel,
    WeightsUnavailable,
    denoise_model,
    diffpure,
    diffpure_raw,
    downscale,
    gridpure,
    img2img_denoise,
    load_img2img,
    load_upscaler,
    tile_starts,
    unavailable_message,
    upscale,
    vae_roundtrip,
    weights_status,
)
from .robustness import gaussian_noise as _robust_noise
from .robustness import jpeg as _robust_jpeg
from .robustness import resize_back, to_8bit

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
    "img2img-denoise": "sd15",
    "vae-roundtrip": "sd15",
}
#: candidates beyond the default suite (not in ``params.yaml``): the classical chains and the
#: off-the-shelf diffusion purifiers
CANDIDATES = CHAINS
DIFFUSION_CANDIDATES = ("img2img-denoise:0.15", "vae-roundtrip")
#: the weight sets only the purifiers read (no editor does)
WEIGHT_SETS = tuple(dict.fromkeys(WEIGHTS_OF.values()))
#: kinds that take no value / need one, with the default where a value is optional
KINDS = ("none", "jpeg", "noise", "crop", "adverse-cleaner", "resize", "lanczos", "chain",
         *WEIGHTS_OF)  # fmt: skip
DEFAULT_VALUE = {"gridpure": 0.1, "img2img-denoise": DENOISE_STRENGTH}


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


# ------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class PurifierSpec:
    """A purifier named in ``params.yaml``: ``kind`` or ``kind:value``, ``value`` in the unit of
    :data:`runtime_backdoor.transforms.TABLE` (noise σ in 8-bit levels, crop in % of the side);
    a chain (``a+b``) is ``kind="chain"`` with its classical ``steps``."""

    kind: str
    value: float | None = None
    steps: tuple[PurifierSpec, ...] = ()

    @property
    def name(self) -> str:
        if self.kind == "chain":
            return "+".join(s.name for s in self.steps)
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
    (= ``gridpure:0.1``), ``resize:0.75``, ``lanczos:0.5``, ``img2img-denoise:0.15`` (bare:
    0.15), ``vae-roundtrip``: the forms :data:`runtime_backdoor.transforms.PURIFY`; and chains
    of classical steps, ``jpeg:75+lanczos:0.5`` (:func:`runtime_backdoor.transforms.parse_chain`,
    steps :data:`runtime_backdoor.transforms.CHAIN`)."""
    if isinstance(text, PurifierSpec):
        return text
    if "+" in str(text):
        steps = T.parse_chain(text, T.CHAIN, what="purifier chain")
        return PurifierSpec("chain", None, tuple(PurifierSpec(s.word, s.value) for s in steps))
    try:
        s = T.parse(text, T.PURIFY, what="purifier", defaults=DEFAULT_VALUE)
    except ValueError as err:
        raise ValueError(
            f"{err}; or a chain of classical steps, e.g. jpeg:75+lanczos:0.5"
        ) from None
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
    if k == "resize":
        return partial(resize_back, scale=v)
    if k == "lanczos":
        return partial(lanczos_back, scale=v)
    if k == "chain":
        return partial(compose, steps=tuple(build_purifier(s, seed=seed) for s in spec.steps))
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
    if k == "img2img-denoise":
        return partial(img2img_denoise, model=denoise_model(model), strength=v, seed=seed)
    if k == "vae-roundtrip":
        return partial(vae_roundtrip, vae=model.pipe.vae)
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
    "CANDIDATES",
    "CLASSICAL",
    "DIFFUSION",
    "DIFFUSION_CANDIDATES",
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
    "denoise_model",
    "diffpure",
    "downscale",
    "gaussian_noise",
    "gridpure",
    "guided_passes",
    "identity",
    "img2img_denoise",
    "jpeg",
    "jpeg_differentiable",
    "lanczos_back",
    "load_img2img",
    "load_upscaler",
    "parse_purifier",
    "parse_purifiers",
    "straight_through",
    "tile_starts",
    "unavailable_message",
    "upscale",
    "vae_roundtrip",
    "weights_status",
]
