"""The purifiers (runtime_backdoor.purifiers): classical ones against references, diffusion ones on
tiny random diffusers pipelines built from configs (no weights, never in the stage), the weight
sets in the registry, and the adaptive (EOT) editor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime_backdoor import cli, weights
from runtime_backdoor import purifiers as P
from runtime_backdoor.editors.simple import GlobalMixEditor
from runtime_backdoor.eot import EOTEditor
from runtime_backdoor.robustness import jpeg as robust_jpeg
from runtime_backdoor.robustness import to_8bit


def astronaut(size: int = 64) -> torch.Tensor:
    """A natural 8-bit image (scikit-image's astronaut, offline) as (1, 3, size, size)."""
    from skimage import data, transform

    a = transform.resize(data.astronaut(), (size, size), anti_aliasing=True)
    return to_8bit(torch.from_numpy(a).permute(2, 0, 1)[None].float())


def perturbed(x: torch.Tensor, eps_8bit: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return to_8bit(x + (torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * eps_8bit / 255)


def same_but_round_off(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal but for a few 8-bit roundings flipped by float round-off."""
    d = (a - b).abs()
    return bool(d.max() <= 1 / 255 + 1e-6 and (d > 0).float().mean() < 0.01)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def on_8bit_grid(x: torch.Tensor) -> bool:
    return bool(torch.allclose(x * 255, torch.round(x * 255), atol=1e-4))


# ------------------------------------------------------------------------------- specs


def test_specs_parse_name_and_family():
    assert [s.name for s in P.parse_purifiers(" ".join(P.CLASSICAL))] == list(P.CLASSICAL)
    assert [s.name for s in P.parse_purifiers(" ".join(P.DIFFUSION))] == list(P.DIFFUSION)
    assert {s.family for s in P.parse_purifiers(list(P.CLASSICAL))} == {"classical"}
    assert {s.weights for s in P.parse_purifiers(list(P.DIFFUSION))} == {"sd15", "sd-x4-upscaler"}
    assert P.parse_purifier("gridpure") == P.parse_purifier("gridpure:0.1")
    assert P.parse_purifier("none").family == "classical"


@pytest.mark.parametrize(
    "bad", ["blur:1", "jpeg", "jpeg:101", "jpeg:7.5", "noise:-0.1", "crop:1", "diffpure:0",
            "adverse-cleaner:3", "upscale:x", "noise:0.05", "crop:0.1", "crop:100%", "crop:6px"],
)  # fmt: skip
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError, match="purifier"):
        P.parse_purifier(bad)


def test_duplicate_specs_are_refused():
    with pytest.raises(ValueError, match="unique"):
        P.parse_purifiers("jpeg:75 jpeg:75.0")


# ------------------------------------------------------------------------------- classical


def test_jpeg_is_the_robustness_round_trip():
    x = astronaut(32)
    for q in (95, 75, 50):
        assert torch.equal(P.build_purifier(f"jpeg:{q}")(x), robust_jpeg(x, q))


def test_noise_is_seeded_batch_independent_and_of_the_stated_sigma():
    grey = torch.full((2, 3, 64, 64), 0.5)
    a = P.build_purifier("noise:12.75", seed=3)(grey)  # σ 12.75 levels = 0.05 on [0, 1]
    assert torch.equal(a, P.build_purifier("noise:12.75", seed=3)(grey))
    assert torch.equal(a[1:], P.gaussian_noise(grey[1:], 0.05, seed=3))  # batch-independent
    assert not torch.equal(a, P.build_purifier("noise:12.75", seed=4)(grey))
    assert on_8bit_grid(a)
    # σ of the added noise within 5 % (12 288 draws; rounding to 8 bits adds 1/(255·√12))
    for sigma in (0.05, 0.1):
        d = P.gaussian_noise(grey[:1], sigma, seed=0) - 0.5
        assert abs(float(d.std()) - sigma) < 0.05 * sigma


def test_crop_resize_keeps_the_size_and_maps_masks_like_images():
    x = astronaut(64)
    y = P.crop_resize(x, 0.1)
    assert y.shape == x.shape and on_8bit_grid(y)
    assert P.crop_box(128, 128, 0.1) == (6, 6, 115, 115)
    const = torch.full((1, 3, 40, 40), 0.4)
    assert torch.allclose(P.crop_resize(const, 0.1), to_8bit(const))
    # a centred square grows by 1/0.9 about the centre; the mask follows the same geometry
    m = torch.zeros(1, 1, 64, 64)
    m[..., 16:48, 16:48] = 1
    framed = P.parse_purifier("crop:10%").frame(m, mask=True)
    side = int(framed[0, 0, 32].sum())
    assert abs(side - 32 / 0.9) <= 2
    img = m.repeat(1, 3, 1, 1)
    assert (P.crop_resize(img, 0.1)[:, :1] >= 0.5).float().sub(framed).abs().sum() <= 8


def numpy_bilateral(x: np.ndarray, diameter: int, sigma_color: float, sigma_space: float):
    """OpenCV's documented bilateral filter for 3-channel float images, written out: a circular
    window of radius diameter // 2, spatial weight exp(-r²/2σs²), colour weight
    exp(-d²/2σc²) with d the L1 colour distance, reflect-101 borders."""
    r = diameter // 2
    h, w, _ = x.shape
    p = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    num, den = np.zeros((h, w, 3)), np.zeros((h, w, 1))
    for i in range(-r, r + 1):
        for j in range(-r, r + 1):
            if i * i + j * j > r * r:
                continue
            q = p[r + i : r + i + h, r + j : r + j + w]
            dist = np.abs(q - x).sum(-1, keepdims=True)
            wgt = np.exp(-(i * i + j * j) / (2 * sigma_space**2)) * np.exp(
                -(dist**2) / (2 * sigma_color**2)
            )
            num += wgt * q
            den += wgt
    return num / den


def test_bilateral_matches_the_written_out_definition():
    x = (astronaut(48)[0].permute(1, 2, 0).numpy() * 255).astype(np.float32)
    x = np.clip(x + np.random.default_rng(0).normal(0, 6, x.shape), 0, 255).astype(np.float32)
    ours = P.bilateral_passes(x, passes=1)
    # measured: 4e-5 in 8-bit units (OpenCV interpolates exp in a table)
    assert np.abs(ours - numpy_bilateral(x, 5, 8.0, 8.0)).max() < 1e-3


def test_guided_filter_matches_kornia():
    import kornia

    guide = (astronaut(64)[0].permute(1, 2, 0).numpy() * 255).astype(np.float32)
    src = np.clip(guide + np.random.default_rng(1).normal(0, 6, guide.shape), 0, 255)
    ours = P.guided_passes(guide, src.astype(np.float32), passes=1)
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).permute(2, 0, 1)[None]  # noqa: E731
    ref = kornia.filters.guided_blur(t(guide), t(src), 2 * P.GUIDED_RADIUS + 1, P.GUIDED_EPS)
    diff = np.abs(ours - ref[0].permute(1, 2, 0).numpy())
    # borders differ (OpenCV reflects with the edge, kornia without), so compare 8 px inside;
    # measured inside: max 0.17, mean 0.003 in 8-bit units (OpenCV computes in float32)
    inside = diff[8:-8, 8:-8]
    assert inside.max() < 0.5 and inside.mean() < 0.02
    assert diff.mean() < 0.2


def test_adverse_cleaner_is_deterministic_and_removes_a_perturbation():
    x = astronaut(64)
    xp = perturbed(x)
    a, b = P.adverse_cleaner(xp), P.adverse_cleaner(xp)
    assert torch.equal(a, b) and a.shape == x.shape and on_8bit_grid(a)
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    # the ±6/255 perturbation: 32.8 dB before, 35.8 dB between the cleaned images (measured)
    assert psnr(a, P.adverse_cleaner(x)) > psnr(xp, x) + 2
    # and the cleaner keeps the image: 40.8 dB (measured)
    assert psnr(P.adverse_cleaner(x), x) > 36


def test_every_classical_purifier_keeps_shape_range_and_grid():
    x = torch.cat([astronaut(32), perturbed(astronaut(32))])
    for spec in ("none", *P.CLASSICAL):
        y = P.build_purifier(spec)(x)
        assert y.shape == x.shape and on_8bit_grid(y), spec
        assert float(y.min()) >= 0 and float(y.max()) <= 1, spec
        assert torch.equal(y[1:], P.build_purifier(spec)(x[1:])), spec  # batch-independent


# ------------------------------------------------------------------------------- diffusion


@pytest.fixture(scope="module")
def tiny():
    """Tiny random SD img2img and ×4 upscaler pipelines, built from configs offline."""
    pytest.importorskip("diffusers")
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    from runtime_backdoor.editors.diffusion import (
        SD_DDIM_SCHEDULE,
        TINY_UNET_CONFIG,
        TINY_VAE_CONFIG,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 4})
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    img2img = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler(**SD_DDIM_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    # the upscaler: 4 latent + 3 image channels, noise level as class label, a ×4 VAE
    up_unet = UNet2DConditionModel(
        **{**TINY_UNET_CONFIG, "in_channels": 7, "num_class_embeds": 400}
    )
    up_vae = AutoencoderKL(
        **{**TINY_VAE_CONFIG, "block_out_channels": (8, 8, 16), "scaling_factor": 0.08333,
           "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3}
    )  # fmt: skip
    upscaler = StableDiffusionUpscalePipeline(
        vae=up_vae, text_encoder=None, tokenizer=None, unet=up_unet,
        low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(**SD_DDIM_SCHEDULE),
        max_noise_level=350,
    )  # fmt: skip
    for pipe in (img2img, upscaler):
        pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    dim = TINY_UNET_CONFIG["cross_attention_dim"]
    return {
        "img2img": P.DiffusionModel(img2img, torch.randn(1, 8, dim, generator=g), None, "sd15"),
        "upscaler": P.DiffusionModel(
            upscaler, torch.randn(1, 8, dim, generator=g), torch.randn(1, 8, dim, generator=g),
            "sd-x4-upscaler",
        ),
    }  # fmt: skip


def count_unet_calls(model: P.DiffusionModel):
    calls = []
    handle = model.pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def images(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.cat([astronaut(size), perturbed(astronaut(size))])[:batch]


def test_diffpure_runs_strength_times_steps_and_is_deterministic(tiny):
    model, x = tiny["img2img"], images()
    calls, handle = count_unet_calls(model)
    try:
        y = P.diffpure(x, model, strength=0.1)
        assert len(calls) == 10  # 10 of 100 DDIM steps
        calls.clear()
        P.diffpure(x[:1], model, strength=0.2, steps=20)
        assert len(calls) == 4
    finally:
        handle.remove()
    assert y.shape == x.shape and on_8bit_grid(y) and 0 <= float(y.min()) <= float(y.max()) <= 1
    assert torch.equal(y, P.diffpure(x, model, strength=0.1))  # seeded
    # batch-independent noise: alone, the same image comes out the same up to float round-off
    # of batched convolutions, which may flip an 8-bit rounding
    assert same_but_round_off(y[1:], P.diffpure(x[1:], model, strength=0.1))
    assert not torch.equal(y, P.diffpure(x, model, strength=0.1, seed=1))
    with pytest.raises(ValueError, match="strength"):
        P.diffpure(x, model, strength=0.0)


def test_gridpure_tiles_cover_the_image_and_blend_with_the_input(tiny):
    assert P.tile_starts(512) == [0, 128, 256]
    assert P.tile_starts(300) == [0, 44]  # 0 and the corner tile
    assert P.tile_starts(600) == [0, 128, 256, 344]
    assert P.tile_starts(128) == [0]  # smaller than a tile: one tile
    model, x = tiny["img2img"], images(48)
    calls, handle = count_unet_calls(model)
    try:
        y = P.gridpure(x, model, strength=0.1, steps=20, tile=32, stride=16, iterations=3)
    finally:
        handle.remove()
    # 2 x 2 tiles per image (0 and the corner 16), 2 DDIM steps each, one batched call per
    # step and iteration: 3 iterations x 2 steps
    assert len(calls) == 3 * 2
    assert y.shape == x.shape and on_8bit_grid(y)
    same = P.gridpure(x, model, strength=0.1, steps=20, tile=32, stride=16, iterations=3)
    assert torch.equal(y, same)
    # blend 1: the input comes back whatever the model does
    kept = P.gridpure(x, model, strength=0.1, steps=20, tile=32, stride=16, iterations=2, blend=1.0)
    assert torch.equal(kept, to_8bit(x))


def test_upscale_returns_the_input_size_seeded_and_checks_the_noise_level(tiny):
    model, x = tiny["upscaler"], images(64)
    calls, handle = count_unet_calls(model)
    try:
        y = P.upscale(x, model, noise_level=20, noise_sigma=P.UPSCALE_NOISE_SIGMA, steps=3)
    finally:
        handle.remove()
    assert len(calls) == 3  # guidance 9: one batched call (negative + prompt) per step
    assert y.shape == x.shape and on_8bit_grid(y) and 0 <= float(y.min()) <= float(y.max()) <= 1
    again = P.upscale(x, model, noise_level=20, noise_sigma=P.UPSCALE_NOISE_SIGMA, steps=3)
    assert torch.equal(y, again)
    alone = P.upscale(x[1:], model, noise_level=20, noise_sigma=P.UPSCALE_NOISE_SIGMA, steps=3)
    assert same_but_round_off(y[1:], alone)
    plain = P.upscale(x, model, noise_level=320, steps=3)
    assert plain.shape == x.shape and not torch.equal(plain, y)
    with pytest.raises(ValueError, match="noise_level"):
        P.upscale(x, model, noise_level=351, steps=3)
    with pytest.raises(ValueError, match="multiples of 4"):
        P.upscale(x[..., :62, :62], model, steps=3)


def test_build_purifier_binds_the_stated_settings(tiny):
    models = {"sd15": tiny["img2img"], "sd-x4-upscaler": tiny["upscaler"]}
    fn = P.build_purifier("noisy-upscale:20", models=models, seed=2)
    assert fn.keywords == {
        "model": tiny["upscaler"], "noise_level": 20, "noise_sigma": 0.1, "seed": 2,
    }  # fmt: skip
    assert fn.func is P.upscale and P.upscale.__defaults__[2:4] == (75, 9.0)  # steps, guidance
    assert P.build_purifier("upscale:320", models=models).keywords["noise_sigma"] == 0.0
    assert P.build_purifier("diffpure:0.2", models=models).keywords["strength"] == 0.2
    grid = P.build_purifier("gridpure", models=models)
    assert grid.func is P.gridpure and grid.keywords["strength"] == 0.1
    assert (P.GRID_TILE, P.GRID_STRIDE, P.GRID_ITERATIONS, P.GRID_BLEND) == (256, 128, 20, 0.1)
    with pytest.raises(P.WeightsUnavailable, match="weights fetch sd15"):
        P.build_purifier("diffpure:0.1")


def tiny_text():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(2)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    return tokenizer, CLIPTextModel(config).eval()


def test_loaders_read_a_saved_folder_offline(tiny, tmp_path, monkeypatch):
    """A diffusers folder as `weights fetch` leaves it: the loaders embed the prompts with its
    tokenizer and text encoder and switch img2img to DDIM; no weights are downloaded."""
    from diffusers import DDIMScheduler, PNDMScheduler

    from runtime_backdoor.editors.diffusion import SD_NOISE_SCHEDULE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer, text_encoder = tiny_text()
    img2img = tiny["img2img"].pipe
    pipe = type(img2img)(
        vae=img2img.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=img2img.unet,
        scheduler=PNDMScheduler(**SD_NOISE_SCHEDULE), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "sd15")
    model = P.load_img2img(tmp_path / "sd15")
    assert isinstance(model.pipe.scheduler, DDIMScheduler) and model.weights == "sd15"
    assert model.prompt_embeds.shape == (1, 77, 32)
    assert P.diffpure(images(32), model, strength=0.1, steps=20).shape == (2, 3, 32, 32)
    up = tiny["upscaler"].pipe
    upscaler = type(up)(
        vae=up.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=up.unet,
        low_res_scheduler=up.low_res_scheduler, scheduler=up.scheduler, max_noise_level=350,
    )  # fmt: skip
    upscaler.save_pretrained(tmp_path / "up")
    model = P.load_upscaler(tmp_path / "up")
    assert model.negative_prompt_embeds.shape == model.prompt_embeds.shape == (1, 77, 32)
    assert P.upscale(images(32), model, steps=2).shape == (2, 3, 32, 32)
    with pytest.raises(P.WeightsUnavailable, match="weights fetch sd-x4-upscaler"):
        P.load_upscaler(tmp_path / "nothing")


# ------------------------------------------------------------------------------- weights


def test_weight_sets_are_registered_and_listed(capsys):
    for name, source in (
        ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ("sd-x4-upscaler", "stabilityai/stable-diffusion-x4-upscaler"),
    ):
        spec = weights.REGISTRY[name]
        assert spec.kind == "hub" and spec.source == source
        assert "model_index.json" in spec.hub_files and "unet/config.json" in spec.hub_files
    assert "low_res_scheduler/scheduler_config.json" in weights.REGISTRY["sd-x4-upscaler"].hub_files
    assert set(P.WEIGHT_SETS) == {"sd15", "sd-x4-upscaler"}
    assert cli.main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "sd15:" in out and "sd-x4-upscaler:" in out


def test_missing_weights_say_how_to_fetch_them(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.MODELS_ENV, str(tmp_path / "models"))
    for name in P.WEIGHT_SETS:
        ok, line = P.weights_status(name)
        assert not ok and line == f"unavailable: weights (runtime-backdoor weights fetch {name})"
        ok, line = weights.verify(name)
        assert not ok and f"runtime-backdoor weights fetch {name}" in line and "\n" not in line
    with pytest.raises(P.WeightsUnavailable) as err:
        P.load_img2img()
    assert "runtime-backdoor weights fetch sd15" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------- adaptive


def test_jpeg_differentiable_is_close_to_the_real_round_trip_and_has_gradients():
    x = astronaut(48).requires_grad_(True)
    y = P.jpeg_differentiable(x, 75)
    assert y.shape == x.shape
    assert psnr(y.detach().clamp(0, 1), robust_jpeg(x.detach(), 75)) > 32  # measured 38.8 dB
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    odd = P.jpeg_differentiable(astronaut(40), 75)  # padded to 48 inside, cropped back
    assert odd.shape == (1, 3, 40, 40)


def test_adaptive_editor_draws_purifiers_and_passes_gradients():
    editor = GlobalMixEditor(gain=50, reach=3).requires_grad_(False)
    eot = EOTEditor(editor, P.CLASSICAL, pick="one", jpeg_grad="kornia", seed=0)
    x = astronaut(32).repeat(4, 1, 1, 1).requires_grad_(True)
    m = torch.zeros(4, 1, 32, 32)
    m[..., 10:20, 10:20] = 1
    out = eot(x, m)
    assert out.shape == x.shape
    assert torch.equal(out.detach() * (1 - m), x.detach() * (1 - m))  # composited
    (out * m).sum().backward()
    assert float(x.grad.abs().sum()) > 0
    with torch.no_grad():  # the optimiser's clean reference: the plain editor
        assert torch.equal(eot(x, m), editor(x, m))
    with pytest.raises(ValueError, match="'diffpure' is not taken here"):
        EOTEditor(editor, ["diffpure:0.1"], pick="one")
