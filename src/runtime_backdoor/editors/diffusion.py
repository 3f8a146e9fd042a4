"""Stable Diffusion inpainting as a differentiable editor.

diffusers' ``StableDiffusionInpaintPipeline.__call__`` runs under
``torch.no_grad()``, so this module runs its own sampler with the pipeline's
conventions (checked against the pipeline in ``tests/editors/test_diffusion.py``):

1. ``x`` in [0, 1] is mapped to [-1, 1]; the hole is binarised (``mask >= 0.5``)
   and blanked: ``masked = (2x - 1) * (mask < 0.5)`` (mid-grey in the hole).
2. ``masked`` is VAE-encoded and scaled by ``vae.config.scaling_factor``. We take
   the posterior mean where the pipeline draws a sample: an attack needs a
   deterministic function of the image. The two differ by the posterior's spread.
3. The binary mask is resized to latent size with nearest-neighbour sampling.
4. Strength 1: start from noise ``* scheduler.init_noise_sigma``. The noise is
   drawn on the CPU from ``seed`` for the latent shape and shared by every image
   of a batch, so a clean and a protected image (or the three masks of one
   optimisation step) see the same noise whatever the batch composition.
5. ``steps`` scheduler steps on the UNet input ``[latents, mask, masked latents]``
   (9 channels, that order) with classifier-free guidance
   ``eps_u + g (eps_c - eps_u)`` when ``guidance_scale > 1``.
6. Decode ``latents / scaling_factor``, map to [0, 1] and clamp.

How gradients flow. The only path from the input pixels to the fill is the
masked-image latents of step 2: they condition every UNet call, so the gradient
runs through the VAE encoder and through the whole chain of ``steps`` UNet
calls and scheduler updates (each latent depends on the previous one), then
through the decoder. Pixels inside the hole get zero gradient (they are
blanked before encoding); the mask is not differentiated. We backpropagate the
full chain of a short sampler (2-4 steps) rather than a truncated chain (e.g.
only the last step) or a surrogate (e.g. the encoder alone, as in PhotoGuard):
what is optimised is then exactly what a user running that sampler gets.
The cost is memory linear in ``steps``;
``gradient_checkpointing=True`` wraps each UNet call in
``torch.utils.checkpoint`` (and turns on the VAE's own checkpointing) to trade
memory for one more forward per step.
The paper claims SD-inpainting results but released no diffusion code, so its
sampler, step count, guidance and gradient path are unknown; these are our
choices, exposed as parameters.

SDXL inpainting (two text encoders, pooled embeddings, size/crop
conditioning) is not supported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .base import Editor

#: scheduler names accepted by :func:`load_sd_inpainting` -> diffusers class names
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}

#: SD 1.x's noise schedule (its scheduler_config.json), for schedulers built without a download
SD_NOISE_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)
#: SD 1.x's DDIM sampler settings (``DDIMScheduler(**SD_DDIM_SCHEDULE)``)
SD_DDIM_SCHEDULE = dict(clip_sample=False, set_alpha_to_one=False, **SD_NOISE_SCHEDULE)
#: a randomly initialised SD-inpainting stack small enough for CPU tests and benchmarks: the
#: same family as SD 1.x inpainting (9-channel UNet with cross-attention, 8x VAE); set
#: ``sample_size`` to the latent side (UNet) and the image side (VAE)
TINY_UNET_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    sample_size=8,
    in_channels=9,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    norm_num_groups=8,
)
TINY_VAE_CONFIG = dict(
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)

_SDXL_MESSAGE = (
    "SDXL inpainting (e.g. diffusers/stable-diffusion-xl-1.0-inpainting-0.1) is not "
    "supported: it needs two text encoders, pooled text embeddings and size/crop "
    "conditioning. Use an SD 1.x/2.x inpainting checkpoint such as "
    "stable-diffusion-v1-5/stable-diffusion-inpainting or "
    "stabilityai/stable-diffusion-2-inpainting."
)


class DiffusionInpaintEditor(Editor):
    """A latent-diffusion inpainting model (SD 1.x/2.x) run by a differentiable sampler.

    ``unet`` must take 9 input channels (latents, mask, masked-image latents).
    ``prompt_embeds`` / ``negative_prompt_embeds`` are text-encoder outputs of
    shape (1, tokens, dim); the negative ones are needed when ``guidance_scale > 1``.
    ``scheduler`` is a diffusers scheduler; the editor keeps its own copy (schedulers
    hold per-run state). Device and dtype are those of ``unet``: inputs must be on
    that device; they are cast to that dtype and outputs back to the input dtype.
    """

    name = "sd-inpainting"

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler: Any,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        *,
        steps: int = 4,
        guidance_scale: float = 7.5,
        seed: int = 0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_unet_config(unet.config)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(
                f"prompt_embeds must have shape (1, tokens, dim), got {tuple(prompt_embeds.shape)}"
            )
        if guidance_scale > 1:
            if negative_prompt_embeds is None:
                raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and "
                    f"prompt_embeds {tuple(prompt_embeds.shape)} differ in shape"
                )
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.seed = int(seed)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        # Without it the VAE's activations dominate the memory of a checkpointed chain. Set
        # both ways: components shared with an earlier editor may carry its setting.
        switch = "enable" if self.gradient_checkpointing else "disable"
        if hasattr(self.vae, f"{switch}_gradient_checkpointing"):
            getattr(self.vae, f"{switch}_gradient_checkpointing")()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale_factor
        dtype, device = unet.dtype, unet.device
        # buffers, so that .to(device/dtype) moves them with the models
        self.register_buffer("prompt_embeds", prompt_embeds.to(device, dtype), persistent=False)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
        self.register_buffer("negative_prompt_embeds", negative_prompt_embeds, persistent=False)

    @classmethod
    def from_components(
        cls,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler: Any,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        **options: Any,
    ) -> DiffusionInpaintEditor:
        """Build from in-memory diffusers components; ``options`` as in the constructor."""
        return cls(unet, vae, scheduler, prompt_embeds, negative_prompt_embeds, **options)

    @property
    def do_guidance(self) -> bool:
        return self.guidance_scale > 1

    def initial_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise for one image's latents of ``shape`` (C, h, w): a function of seed and shape only."""
        generator = torch.Generator("cpu").manual_seed(self.seed)
        noise = torch.randn((1, *shape), generator=generator, dtype=torch.float32)
        return noise.to(self.unet.device, self.unet.dtype)

    def encode_masked(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """UNet conditioning (B, 1 + C, h, w): latent-size mask and masked-image latents."""
        dtype = self.unet.dtype
        hole = (mask >= 0.5).to(dtype)
        masked = (image.to(dtype) * 2 - 1) * (1 - hole)
        latents = self.vae.encode(masked).latent_dist.mode() * self.vae.config.scaling_factor
        hole = F.interpolate(hole, size=latents.shape[-2:], mode="nearest")
        return torch.cat([hole, latents], dim=1)

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch = image.shape[0]
        cond = self.encode_masked(image, mask)
        shape = (self.vae.config.latent_channels, *cond.shape[-2:])
        latents = self.initial_noise(shape).expand(batch, -1, -1, -1)
        embeds = self.prompt_embeds.expand(batch, -1, -1)
        if self.do_guidance:
            # one UNet call per step for both branches: [unconditional; conditional]
            embeds = torch.cat([self.negative_prompt_embeds.expand(batch, -1, -1), embeds])
            cond = torch.cat([cond, cond])

        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps, device=latents.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # strength 1: all timesteps, as the pipeline sets it
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, latents]) if self.do_guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            eps = self._unet(torch.cat([model_input, cond], dim=1), t, embeds)
            if self.do_guidance:
                eps_uncond, eps_text = eps.chunk(2)
                eps = eps_uncond + self.guidance_scale * (eps_text - eps_uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]

        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (decoded / 2 + 0.5).clamp(0, 1).to(image.dtype)

    @torch.no_grad()
    def reference(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The same fill computed by diffusers' own ``StableDiffusionInpaintPipeline``.

        Same components, scheduler, embeddings, steps, guidance and initial noise as
        :meth:`predict`, without gradients: the two differ by round-off and by the VAE
        posterior's spread (the pipeline samples it where :meth:`predict` takes its
        mean). Sides must be multiples of the VAE's downsampling factor.
        """
        from diffusers import StableDiffusionInpaintPipeline

        pipe = StableDiffusionInpaintPipeline(
            vae=self.vae,
            text_encoder=None,
            tokenizer=None,
            unet=self.unet,
            scheduler=type(self.scheduler).from_config(self.scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        batch, (h, w) = image.shape[0], image.shape[-2:]
        f = self.vae_scale_factor
        noise = self.initial_noise((self.vae.config.latent_channels, h // f, w // f))
        negative = self.negative_prompt_embeds
        return pipe(
            prompt_embeds=self.prompt_embeds.expand(batch, -1, -1),
            negative_prompt_embeds=None if negative is None else negative.expand(batch, -1, -1),
            image=image,
            mask_image=mask,
            height=h,
            width=w,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            latents=noise.expand(batch, -1, -1, -1),
            output_type="pt",
        ).images

    def _unet(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        def run(x: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
            return self.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(run, x, embeds, use_reentrant=False)
        return run(x, embeds)


def encode_prompt(tokenizer: Any, text_encoder: torch.nn.Module, prompt: str) -> torch.Tensor:
    """Text embeddings (1, tokens, dim) of ``prompt``, padded to the tokenizer's maximum length."""
    tokens = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = tokens.attention_mask.to(text_encoder.device)
    ids = tokens.input_ids.to(text_encoder.device)
    with torch.no_grad():
        return text_encoder(ids, attention_mask=attention_mask)[0]


def load_sd_inpainting(
    model: str | os.PathLike,
    *,
    steps: int = 4,
    guidance_scale: float = 7.5,
    prompt: str = "",
    negative_prompt: str = "",
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    scheduler: str = "ddim",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    local_files_only: bool | None = None,
) -> DiffusionInpaintEditor:
    """Load an SD 1.x/2.x inpainting checkpoint (hub id or local diffusers folder) as an editor.

    Loads ``unet``, ``vae`` and the ``scheduler`` config; the tokenizer and text
    encoder only to embed the prompts whose embeddings are not given, once, here.
    ``scheduler``: one of :data:`SCHEDULERS`. ``local_files_only`` defaults to
    True for folders and when ``HF_HUB_OFFLINE`` is set; a hub id that is not
    cached then fails at once with ``OSError`` saying how to download it. Cached
    files are used as they are (no update check).
    Weights are read from safetensors only (``use_safetensors=True``, whatever the libraries'
    defaults): a folder whose components hold only pickles is refused
    (:func:`refuse_pickle_weights`).
    Raises ``NotImplementedError`` for SDXL and ``ValueError`` for a non-inpainting UNet or
    pickle weights.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source, is_folder = _checked_source(model, scheduler)
    if local_files_only is None:
        local_files_only = is_folder or _hub_offline()
    load = _component_loader(source, is_folder, local_files_only)
    if is_folder:
        refuse_pickle_weights(source, ("unet", "vae"))

    # the config first: reject SDXL / non-inpainting UNets before loading any weights
    _check_unet_config(load(UNet2DConditionModel.load_config, "unet"))
    unet = load(UNet2DConditionModel.from_pretrained, "unet", torch_dtype=dtype, use_safetensors=True)  # fmt: skip
    unet = unet.to(device)
    vae = load(AutoencoderKL.from_pretrained, "vae", torch_dtype=dtype, use_safetensors=True)
    vae = vae.to(device)
    scheduler_cls = getattr(diffusers, SCHEDULERS[scheduler])
    scheduler_obj = scheduler_cls.from_config(load(scheduler_cls.load_config, "scheduler"))

    need_negative = guidance_scale > 1 and negative_prompt_embeds is None
    if prompt_embeds is None or need_negative:
        from transformers import CLIPTextModel

        if is_folder:
            refuse_pickle_weights(source, ("text_encoder",))
        tokenizer = load(_load_tokenizer, "tokenizer")
        text_encoder = load(CLIPTextModel.from_pretrained, "text_encoder", use_safetensors=True)
        text_encoder = text_encoder.to(device, dtype).eval()
        if prompt_embeds is None:
            prompt_embeds = encode_prompt(tokenizer, text_encoder, prompt)
        if need_negative:
            negative_prompt_embeds = encode_prompt(tokenizer, text_encoder, negative_prompt)

    return DiffusionInpaintEditor(
        unet,
        vae,
        scheduler_obj,
        prompt_embeds,
        negative_prompt_embeds,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        gradient_checkpointing=gradient_checkpointing,
    )


#: weight files that are pickles (loading one can run code stored in it): never read from a
#: diffusers folder, which must hold safetensors
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def refuse_pickle_weights(folder: str | os.PathLike, subfolders: tuple[str, ...]) -> None:
    """Raise a one-line ``ValueError`` naming the first of ``folder``'s ``subfolders`` (or
    ``folder`` itself, when it has none of them: a lone ``.ckpt``) that holds pickle weights
    (:data:`PICKLE_SUFFIXES`) and no ``.safetensors``, saying to convert it. Nothing is read."""
    folder = Path(folder)
    places = [folder / s for s in subfolders if (folder / s).is_dir()] or [folder]
    for where in places:
        files = [p for p in where.iterdir() if p.is_file()]
        if any(p.name.endswith(".safetensors") for p in files):
            continue
        pickles = sorted(p.name for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            shown = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
            raise ValueError(
                f"{where} holds only pickle weights ({shown}), which are refused (loading a "
                "pickle can run code stored in it): convert the folder to safetensors "
                "(diffusers' save_pretrained(..., safe_serialization=True), where you trust "
                "the file) or download the safetensors files"
            )


def _checked_source(model: str | os.PathLike, scheduler: str) -> tuple[str, bool]:
    """``(source, is_folder)``: a local folder (expanded) or a hub id (``owner/name``), not
    SDXL, with a known ``scheduler``."""
    source = str(model)
    is_folder = Path(source).expanduser().is_dir()
    if is_folder:
        source = str(Path(source).expanduser())
    if not is_folder and (source.count("/") != 1 or source.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{source} is neither a folder nor a hub id (owner/name)")
    if not is_folder and "xl" in source.rsplit("/", 1)[-1].lower():
        raise NotImplementedError(_SDXL_MESSAGE)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}")
    return source, is_folder


def _component_loader(source: str, is_folder: bool, local_files_only: bool):
    """``load(loader, subfolder, **kwargs)``: one component of ``source`` through ``loader``
    (``from_pretrained``, ``load_config``), or an ``OSError`` saying how to get it."""

    def load(loader: Any, subfolder: str, **kwargs: Any) -> Any:
        # the cache first, even when downloads are allowed: without network a hub
        # look-up retries for tens of seconds before falling back to the cache
        for cache_only in (True,) if local_files_only else (True, False):
            try:
                return loader(source, subfolder=subfolder, local_files_only=cache_only, **kwargs)
            except OSError as err:
                error = err
        raise OSError(_missing_message(source, subfolder, is_folder, local_files_only)) from error

    return load


def _load_tokenizer(source: str, **kwargs: Any) -> Any:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(source, **kwargs)
    if len(tokenizer) <= len(tokenizer.all_special_ids):
        # transformers 5 builds an empty tokenizer from a missing folder instead of failing
        raise OSError(f"no tokenizer files under {source}/{kwargs.get('subfolder', '')}")
    return tokenizer


def _check_unet_config(config: dict[str, Any]) -> None:
    if config.get("addition_embed_type") == "text_time":
        raise NotImplementedError(_SDXL_MESSAGE)
    if config.get("in_channels") != 9:
        raise ValueError(
            f"not an inpainting UNet: in_channels={config.get('in_channels')}, expected 9 "
            "(noisy latents, mask, masked-image latents); load an inpainting checkpoint "
            "such as stable-diffusion-v1-5/stable-diffusion-inpainting"
        )


def _hub_offline() -> bool:
    import huggingface_hub.constants

    # the constant is read once at import: also honour a variable set later (tests, notebooks)
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or flag in {"1", "ON", "YES", "TRUE"}


def _missing_message(source: str, subfolder: str, is_folder: bool, local_files_only: bool) -> str:
    if is_folder:
        return (
            f"could not load '{subfolder}' from the folder {source}: it should hold a diffusers "
            "inpainting pipeline (unet/, vae/, scheduler/, text_encoder/, tokenizer/), as "
            "written by save_pretrained or `hf download`"
        )
    import huggingface_hub.constants

    if local_files_only:
        reason = (
            "it is not in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) and downloads are off here "
            "(HF_HUB_OFFLINE is set or local_files_only=True)"
        )
    else:
        reason = "downloading it failed (no access to huggingface.co from this machine?)"
    return (
        f"could not load '{subfolder}' of the model '{source}': {reason}. On a machine with "
        f"internet, run `hf download {source} --local-dir <folder>` (older clients: "
        f"`huggingface-cli download {source} --local-dir <folder>`), copy the folder here "
        "and pass its path instead of the hub id."
    )


def point_posterior_(vae: torch.nn.Module) -> torch.nn.Module:
    """Shrink ``vae``'s posterior to nearly a point (std = exp(-15)), in place.

    The pipeline samples the posterior where the editor takes its mean; with a near-zero
    spread the two agree, so a random VAE can be compared with the pipeline.
    """
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -60.0  # log-variance, clamped to -30 by diffusers
    return vae


def tiny_sd_inpainting(
    seed: int = 0, steps: int = 2, size: int = 64, *, point_posterior: bool = False, **options: Any
) -> DiffusionInpaintEditor:
    """A randomly initialised miniature SD-inpainting stack (:data:`TINY_UNET_CONFIG`,
    :data:`TINY_VAE_CONFIG`, DDIM), for CPU runs.

    Same architecture family as SD 1.x inpainting (9-channel UNet, 8x VAE, DDIM) but
    tiny and untrained: it exercises the diffusion code paths (the encoder attack,
    LaMa ↔ SD transfer) without any download; its numbers say nothing about real SD.
    ``size``: the image side it is configured for. Random prompt embeddings (and negative
    ones when ``guidance_scale > 1``); ``options`` as in :class:`DiffusionInpaintEditor`
    (default ``guidance_scale`` 1).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "sample_size": size // 8})
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": size})
    if point_posterior:
        point_posterior_(vae)
    options = {"guidance_scale": 1.0, "seed": seed, **options}
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 8, TINY_UNET_CONFIG["cross_attention_dim"], generator=g)
    negative = torch.randn(embeds.shape, generator=g) if options["guidance_scale"] > 1 else None
    return DiffusionInpaintEditor.from_components(
        unet, vae, DDIMScheduler(**SD_DDIM_SCHEDULE), embeds, negative, steps=steps, **options
    )
