"""Tests of the differentiable SD-inpainting editor on tiny random components.

The reference is diffusers' own ``StableDiffusionInpaintPipeline`` built from
the same components, run with the same initial latents.
"""

from __future__ import annotations

import shutil
import time

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from runtime_backdoor.editors.diffusion import (  # noqa: E402
    SD_DDIM_SCHEDULE,
    SD_NOISE_SCHEDULE,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    DiffusionInpaintEditor,
    encode_prompt,
    load_sd_inpainting,
    point_posterior_,
)

SCHEDULERS = {
    "ddim": DDIMScheduler(**SD_DDIM_SCHEDULE),
    "dpm": DPMSolverMultistepScheduler(**SD_NOISE_SCHEDULE),
    "euler": EulerDiscreteScheduler(**SD_NOISE_SCHEDULE),
}


def tiny_unet(in_channels: int = 9) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": in_channels})


def tiny_vae() -> AutoencoderKL:
    """An 8x-downsampling VAE whose posterior is nearly a point (see ``point_posterior_``)."""
    torch.manual_seed(1)
    return point_posterior_(AutoencoderKL(**TINY_VAE_CONFIG))


def tiny_text() -> tuple[CLIPTokenizer, CLIPTextModel]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(2)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return tokenizer, CLIPTextModel(config).eval()


@pytest.fixture(scope="module")
def parts():
    torch.set_num_threads(1)
    tokenizer, text_encoder = tiny_text()
    return {
        "unet": tiny_unet(),
        "vae": tiny_vae(),
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "embeds": encode_prompt(tokenizer, text_encoder, "a photo of a cat"),
        "negative": encode_prompt(tokenizer, text_encoder, "blurry"),
    }


def make_editor(parts, scheduler="ddim", **options) -> DiffusionInpaintEditor:
    return DiffusionInpaintEditor.from_components(
        parts["unet"],
        parts["vae"],
        SCHEDULERS[scheduler],
        parts["embeds"],
        parts["negative"],
        **options,
    )


def images_and_masks(size: int, batch: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g)
    mask = torch.zeros(batch, 1, size, size)
    # holes not aligned to the 8-px latent grid exercise the mask resizing convention
    mask[0, :, 5 : size // 2 + 3, 9 : size // 2 + 7] = 1
    if batch > 1:
        mask[1:, :, size // 3 :, : size // 2 + 1] = 1
    return image, mask


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_matches_diffusers_pipeline(parts, scheduler):
    steps, guidance, size = 3, 7.5, 64
    editor = make_editor(parts, scheduler, steps=steps, guidance_scale=guidance)
    image, mask = images_and_masks(size)
    with torch.no_grad():
        ours = editor.predict(image, mask)
    theirs = editor.reference(image, mask)  # diffusers' StableDiffusionInpaintPipeline
    assert ours.shape == theirs.shape == (2, 3, size, size)
    assert 0.05 < theirs.std() < 0.45  # not saturated: the comparison means something
    # measured max abs diff: 2.7e-6 (float32 round-off through guidance 7.5)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.fixture(scope="module")
def editor64(parts):
    """A float64 copy of the tiny components: the finite-difference test needs it."""
    unet, vae = tiny_unet().double(), tiny_vae().double()
    return DiffusionInpaintEditor.from_components(
        unet,
        vae,
        SCHEDULERS["ddim"],
        parts["embeds"].double(),
        parts["negative"].double(),
        steps=2,
        guidance_scale=3.0,
    )


def test_gradient_matches_finite_differences(editor64):
    image, mask = images_and_masks(32, batch=1)
    image = image.double().requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (editor64(x, mask.double()) * weights * mask).sum()  # the fill only

    loss(image).backward()
    grad = image.grad
    outside = [(0, 1, 1), (1, 20, 3), (2, 30, 30), (0, 12, 25)]  # (channel, row, col), mask = 0
    assert all(mask[0, 0, r, c] == 0 for _, r, c in outside)
    step = 1e-4  # smaller steps drown in round-off, larger in curvature
    for ch, r, c in outside:
        plus, minus = image.detach().clone(), image.detach().clone()
        plus[0, ch, r, c] += step
        minus[0, ch, r, c] -= step
        with torch.no_grad():
            numeric = (loss(plus) - loss(minus)) / (2 * step)
        assert grad[0, ch, r, c].abs() > 1e-4  # the fill does depend on known pixels
        assert torch.isclose(grad[0, ch, r, c], numeric, rtol=1e-6, atol=0)  # measured <= 1e-7
    # pixels inside the hole are blanked before encoding: no influence at all
    assert torch.all(grad[0][:, mask[0, 0] == 1] == 0)


def test_gradient_checkpointing_gives_the_same_gradient(editor64):
    image, mask = images_and_masks(32, batch=2)
    image, mask = image.double(), mask.double()
    grads = []
    for flag in (False, True):
        editor64.gradient_checkpointing = flag
        x = image.clone().requires_grad_(True)
        editor64(x, mask).square().sum().backward()
        grads.append(x.grad)
    editor64.gradient_checkpointing = False
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_vae_checkpointing_follows_each_editor_built_on_shared_components(parts):
    def vae_checkpointing() -> bool:
        return parts["vae"].encoder.gradient_checkpointing

    make_editor(parts, gradient_checkpointing=True)
    assert vae_checkpointing()
    make_editor(parts)  # same UNet and VAE objects: the earlier setting must not leak
    assert not vae_checkpointing()


def test_save_pretrained_folder_loads_offline(parts, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionInpaintPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=SCHEDULERS["ddim"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path)
    loaded = load_sd_inpainting(
        tmp_path, prompt="a photo of a cat", negative_prompt="blurry", steps=2, guidance_scale=5.0
    )
    # prompt embeddings as diffusers computes them
    positive, negative = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, "blurry")
    assert torch.allclose(loaded.prompt_embeds, positive, atol=1e-6)
    assert torch.allclose(loaded.negative_prompt_embeds, negative, atol=1e-6)
    in_memory = make_editor(parts, steps=2, guidance_scale=5.0)
    image, mask = images_and_masks(48)
    with torch.no_grad():
        assert torch.allclose(loaded(image, mask), in_memory(image, mask), atol=1e-6)

    # given embeddings: no tokenizer or text encoder is loaded
    shutil.rmtree(tmp_path / "tokenizer")
    given = load_sd_inpainting(
        tmp_path,
        prompt_embeds=parts["embeds"],
        negative_prompt_embeds=parts["negative"],
        steps=2,
        guidance_scale=5.0,
    )
    assert torch.equal(given.prompt_embeds, parts["embeds"])
    with pytest.raises(OSError, match="could not load 'tokenizer' from the folder"):
        load_sd_inpainting(tmp_path, steps=2)


def test_uncached_hub_id_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        load_sd_inpainting("nobody-here/no-such-inpainting-model")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "nobody-here/no-such-inpainting-model" in message
    assert "HF_HUB_OFFLINE" in message
    assert "hf download nobody-here/no-such-inpainting-model --local-dir" in message
    assert "huggingface-cli download" in message


def test_rejects_sdxl_and_non_inpainting_unets(parts, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        load_sd_inpainting(tmp_path / "missing")
    with pytest.raises(NotImplementedError, match="SDXL"):
        load_sd_inpainting("diffusers/stable-diffusion-xl-1.0-inpainting-0.1")
    with pytest.raises(ValueError, match="in_channels=4"):
        DiffusionInpaintEditor.from_components(
            tiny_unet(in_channels=4), parts["vae"], SCHEDULERS["ddim"], parts["embeds"]
        )
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        DiffusionInpaintEditor.from_components(
            parts["unet"], parts["vae"], SCHEDULERS["ddim"], parts["embeds"], guidance_scale=7.5
        )


def test_deterministic_and_independent_of_batch_composition(parts):
    editor = make_editor(parts, steps=2)
    image, mask = images_and_masks(64, batch=3)
    with torch.no_grad():
        first = editor(image, mask)
        again = editor(image, mask)
        alone = editor(image[1:2], mask[1:2])
        swapped = editor(image[[2, 1]], mask[[2, 1]])
        other_seed = make_editor(parts, steps=2, seed=1)(image, mask)
    assert torch.equal(first, again)
    assert (alone[0] - first[1]).abs().max() < 1e-5
    assert (swapped[0] - first[2]).abs().max() < 1e-5
    assert (swapped[1] - first[1]).abs().max() < 1e-5
    hole = mask.bool().expand_as(first)
    assert (other_seed - first)[hole].abs().mean() > 1e-2  # the noise matters
    assert torch.equal(first[~hole], image[~hole])  # known pixels untouched


def test_pads_sizes_that_are_not_multiples_of_8(parts):
    editor = make_editor(parts, steps=1, guidance_scale=1.0)
    assert editor.size_multiple == 8
    image = torch.rand(1, 3, 52, 60)
    mask = torch.zeros(1, 1, 52, 60)
    mask[..., 10:30, 20:40] = 1
    with torch.no_grad():
        out = editor(image, mask)
    assert out.shape == image.shape
    assert torch.equal(out[..., :10, :], image[..., :10, :])
    assert (out - image)[mask.bool().expand_as(out)].abs().mean() > 1e-2


def _tiny_pipeline(parts) -> StableDiffusionInpaintPipeline:
    return StableDiffusionInpaintPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=SCHEDULERS["ddim"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_pickle_weights_are_refused_by_the_project_itself(parts, tmp_path, monkeypatch, capsys):
    """A folder saved as pickles is refused before anything is read, whatever the libraries'
    defaults would do; the same pipeline saved as safetensors loads."""
    import re

    import numpy as np
    from PIL import Image

    from runtime_backdoor.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = _tiny_pipeline(parts)
    pickled, safe = tmp_path / "pickled", tmp_path / "safe"
    pipe.save_pretrained(pickled, safe_serialization=False)
    pipe.save_pretrained(safe)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list((pickled / "unet").glob("*.safetensors"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    embeds = {"prompt_embeds": parts["embeds"], "negative_prompt_embeds": parts["negative"]}
    with pytest.raises(ValueError) as info:
        load_sd_inpainting(pickled, steps=2, **embeds)
    message = str(info.value)
    assert message.startswith(
        f"{pickled / 'unet'} holds only pickle weights (diffusion_pytorch_model.bin), which are "
        "refused"
    )
    assert "convert the folder to safetensors" in message and "\n" not in message

    # the safetensors copy loads, and is the same editor
    loaded = load_sd_inpainting(safe, steps=2, guidance_scale=5.0, **embeds)
    image, mask = images_and_masks(48)
    with torch.no_grad():
        expected = make_editor(parts, steps=2, guidance_scale=5.0)(image, mask)
        assert torch.allclose(loaded(image, mask), expected, atol=1e-6)

    # a text encoder kept as a pickle: refused when it would be loaded, not otherwise
    encoder = tmp_path / "encoder"
    shutil.copytree(safe, encoder)
    (encoder / "text_encoder" / "model.safetensors").unlink()
    (encoder / "text_encoder" / "pytorch_model.bin").write_bytes(b"a pickle")
    assert load_sd_inpainting(encoder, steps=2, guidance_scale=5.0, **embeds) is not None
    refused = re.escape(f"{encoder / 'text_encoder'} holds only pickle weights (pytorch_model.bin)")
    with pytest.raises(ValueError, match=f"^{refused}"):
        load_sd_inpainting(encoder, steps=2, prompt="a cat")
    # a folder with a lone single-file checkpoint
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "sd-v1-5-inpainting.ckpt").write_bytes(b"a pickle")
    refused = re.escape(f"{lone} holds only pickle weights (sd-v1-5-inpainting.ckpt)")
    with pytest.raises(ValueError, match=f"^{refused}"):
        load_sd_inpainting(lone, steps=2, **embeds)

    # the command: one line naming the folder, no traceback
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(tmp_path / "photo.png")
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    argv = ["protect", tmp_path / "photo.png", "--mask", tmp_path / "mask.png"]
    argv += ["--editor", "sd-inpainting", "--weights", pickled, "--out", tmp_path / "out.png"]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"runtime-backdoor: error: --weights {pickled}: cannot load ")
    assert f"{pickled / 'unet'} holds only pickle weights" in err and "safetensors" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_the_purifiers_refuse_pickle_weights(parts, tmp_path):
    import re

    from runtime_backdoor import purifiers

    pickled = tmp_path / "sd15"
    _tiny_pipeline(parts).save_pretrained(pickled, safe_serialization=False)
    for load in (purifiers.load_img2img, purifiers.load_upscaler):
        with pytest.raises(ValueError, match=f"^{re.escape(str(pickled / 'unet'))} holds only"):
            load(pickled)
