"""The candidate purifiers beyond the default suite (runtime_backdoor.chains,
runtime_backdoor.diffusion_purifiers): the composed chains against Pillow itself, the
off-the-shelf img2img denoiser against diffusers' own img2img call and the VAE round trip
against diffusers' own AutoencoderKL, both on tiny random pipelines saved by the test.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from runtime_backdoor import purifiers as P
from runtime_backdoor import transforms as T
from runtime_backdoor.pipeline.purify import _eot_draws
from runtime_backdoor.robustness import to_8bit


def natural(h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """A smooth random 8-bit image (1, 3, h, w) with some texture."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return to_8bit(x + 0.08 * torch.rand(x.shape, generator=g))


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def pil_jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def levels(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def on_8bit_grid(x: torch.Tensor) -> bool:
    return bool(torch.allclose(x * 255, torch.round(x * 255), atol=1e-4))


# ------------------------------------------------------------------------------- chains


def test_chain_specs_round_trip_and_are_classical():
    for spec in P.CANDIDATES:
        s = P.parse_purifier(spec)
        assert s.kind == "chain" and s.name == spec and s.family == "classical"
        assert s.weights is None and P.parse_purifier(s.name) == s
    assert P.CANDIDATES == ("jpeg:75+lanczos:0.5", "resize:0.75+jpeg:90")
    assert P.parse_purifier("jpeg:75.0+lanczos:0.50").name == "jpeg:75+lanczos:0.5"
    steps = P.parse_purifier("jpeg:75+lanczos:0.5").steps
    assert steps == (P.PurifierSpec("jpeg", 75.0), P.PurifierSpec("lanczos", 0.5))
    # the whole suite string, as params.yaml would hold it
    names = [s.name for s in P.parse_purifiers(" ".join((*P.CLASSICAL, *P.CANDIDATES)))]
    assert names == [*P.CLASSICAL, *P.CANDIDATES]


def test_jpeg75_lanczos_chain_is_pillow_itself():
    """Sun et al.'s chain: JPEG 75, Lanczos to 0.5x, Lanczos back to the size."""
    x = natural()
    ref = pil_jpeg(to_pil(x), 75).resize((24, 20), Image.LANCZOS).resize((48, 40), Image.LANCZOS)
    y = P.build_purifier("jpeg:75+lanczos:0.5")(x)
    assert y.shape == x.shape and on_8bit_grid(y)
    assert np.array_equal(levels(y), np.asarray(ref))


def test_resize_jpeg90_chain_is_pillow_itself():
    """The screenshot-like chain: bicubic to 0.75x and back, then JPEG 90."""
    x = natural(seed=1)
    small = to_pil(x).resize((36, 30), Image.BICUBIC).resize((48, 40), Image.BICUBIC)
    ref = pil_jpeg(small, 90)
    y = P.build_purifier("resize:0.75+jpeg:90")(x)
    assert np.array_equal(levels(y), np.asarray(ref))


def test_chains_and_lone_steps_compose_the_single_purifiers():
    x = torch.cat([natural(seed=2), natural(seed=3)])
    lanczos = P.build_purifier("lanczos:0.5")
    assert torch.equal(P.build_purifier("jpeg:75+lanczos:0.5")(x), lanczos(P.jpeg(x, 75)))
    assert torch.equal(lanczos(x), P.lanczos_back(x, 0.5))
    # a step with its own seed (noise) is seeded like the lone purifier
    chain = P.build_purifier("noise:12.75+jpeg:90", seed=5)
    assert torch.equal(chain(x), P.jpeg(P.build_purifier("noise:12.75", seed=5)(x), 90))
    y = P.build_purifier("resize:0.75+jpeg:90")(x)
    assert torch.equal(y[1:], P.build_purifier("resize:0.75+jpeg:90")(x[1:]))  # per image
    m = torch.zeros(1, 1, 40, 48)
    assert P.parse_purifier("jpeg:75+lanczos:0.5").frame(m, mask=True) is m  # geometry kept


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("jpeg:75+", "empty step"),
        ("+jpeg:75", "empty step"),
        ("jpeg:75++lanczos:0.5", "empty step"),
        ("jpeg:75+0.5", "unknown word '0.5'"),
        ("jpeg:75+lanczos", "'lanczos' needs a value"),
        ("jpeg:75+lanczos:2", "lanczos:S must be scale, (0, 1]"),
        ("jpeg:75+crop:10%", "'crop' is not taken here"),
        ("jpeg:75+diffpure:0.1", "'diffpure' is not taken here"),
        ("none+jpeg:75", "'none' is not taken here"),
        ("jpeg:75+ lanczos:0.5", "no spaces"),
    ],
)
def test_ambiguous_chains_are_refused_in_one_line_naming_the_step_forms(bad, why):
    with pytest.raises(ValueError) as err:
        P.parse_purifier(bad)
    message = str(err.value)
    assert "\n" not in message and why in message and repr(bad) in message
    assert "jpeg:75+lanczos:0.5" in message and "lanczos:S (scale, (0, 1])" in message


def test_chains_are_refused_where_not_taken_and_chain_words_are_named():
    with pytest.raises(ValueError, match="a chain .* is not taken here"):
        T.parse("jpeg:75+resize:0.5", T.BEYOND)
    with pytest.raises(ValueError, match="chain of classical steps, e.g. jpeg:75\\+lanczos:0.5"):
        P.parse_purifier("chain:jpeg75")
    with pytest.raises(ValueError, match="at least two steps"):
        T.parse_chain("jpeg:75")


def test_the_adaptive_defence_draws_only_what_eot_takes():
    classical = P.parse_purifiers(" ".join((*P.CLASSICAL, *P.CANDIDATES, "lanczos:0.5")))
    assert _eot_draws(classical) == list(P.CLASSICAL)
    assert _eot_draws(P.parse_purifiers(list(P.CLASSICAL))) == list(P.CLASSICAL)


# ------------------------------------------------------------------------------- diffusion


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny random SD img2img folder (UNet, 8x VAE, tokenizer, text encoder), saved as
    `weights fetch` leaves it, and loaded by the purifiers' own loader."""
    pytest.importorskip("diffusers")
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )

    from runtime_backdoor.editors.diffusion import (
        SD_NOISE_SCHEDULE,
        TINY_UNET_CONFIG,
        TINY_VAE_CONFIG,
    )
    from test_purifiers import tiny_text

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 4})
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    tokenizer, text_encoder = tiny_text()
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_NOISE_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("weights") / "sd15"
    pipe.save_pretrained(folder)
    return folder, P.load_img2img(folder)


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.cat([natural(size, size, seed=k) for k in range(batch)])


def test_new_diffusion_kinds_parse_need_sd15_and_say_how_to_fetch_it():
    assert P.parse_purifier("img2img-denoise") == P.parse_purifier("img2img-denoise:0.15")
    for spec in P.DIFFUSION_CANDIDATES:
        s = P.parse_purifier(spec)
        assert s.name == spec and s.family == "diffusion" and s.weights == "sd15"
        with pytest.raises(P.WeightsUnavailable, match="weights fetch sd15"):
            P.build_purifier(spec)
    for bad in ("img2img-denoise:0", "img2img-denoise:1", "vae-roundtrip:1", "img2img-denoise:x"):
        with pytest.raises(ValueError, match="purifier"):
            P.parse_purifier(bad)
    assert P.DIFFUSION_CANDIDATES == ("img2img-denoise:0.15", "vae-roundtrip")
    assert set(P.WEIGHT_SETS) == {"sd15", "sd-x4-upscaler"}  # no new weight set


def test_img2img_denoise_is_diffusers_img2img_with_the_papers_prompts(sd15):
    folder, model = sd15
    fn = P.build_purifier("img2img-denoise", models={"sd15": model}, seed=3)
    assert fn.func is P.img2img_denoise and fn.keywords["strength"] == 0.15
    denoiser = fn.keywords["model"]
    assert denoiser.negative_prompt_embeds.shape == denoiser.prompt_embeds.shape == (1, 77, 32)
    x = images()
    calls = []
    handle = model.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        y = fn(x)
    finally:
        handle.remove()
    assert len(calls) == 7  # int(50 · 0.15) of 50 DDIM steps, guidance batched
    assert y.shape == x.shape and on_8bit_grid(y) and 0 <= float(y.min()) <= float(y.max()) <= 1
    assert torch.equal(y, fn(x))  # seeded
    assert not torch.equal(y, P.build_purifier("img2img-denoise", models={"sd15": model})(x))
    # the reference: diffusers' own call with the prompts, strength, seed and its defaults
    for i in range(2):
        ref = model.pipe(
            prompt="Denoise the image",
            negative_prompt="Add adversarial perturbation to the image",
            image=x[i : i + 1], strength=0.15, guidance_scale=7.5, num_inference_steps=50,
            generator=torch.Generator().manual_seed(3), output_type="pt",
        ).images  # fmt: skip
        alone = fn(x[i : i + 1])
        assert torch.equal(alone, to_8bit(ref.float()))
        # in the batch: the same up to float round-off of batched convolutions
        d = (y[i : i + 1] - alone).abs()
        assert float(d.max()) <= 1 / 255 + 1e-6 and float((d > 0).float().mean()) < 0.01
    with pytest.raises(ValueError, match="strength"):
        P.img2img_denoise(x, denoiser, strength=1.0)


def test_vae_roundtrip_is_diffusers_autoencoder_encode_mode_decode(sd15):
    from diffusers import AutoencoderKL

    folder, model = sd15
    fn = P.build_purifier("vae-roundtrip", models={"sd15": model})
    x = images(2, 32)
    y = fn(x)
    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
    with torch.no_grad():
        ref = vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample
    assert torch.equal(y, to_8bit((ref / 2 + 0.5).clamp(0, 1)))
    assert y.shape == x.shape and on_8bit_grid(y) and torch.equal(y, fn(x))
    with pytest.raises(ValueError, match="multiples"):
        fn(x[..., :30, :30])
