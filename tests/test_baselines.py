"""Baselines at the backdoor's budget: threat model, objectives and the not-applicable case."""

import pytest
import torch
import torch.nn.functional as F

from runtime_backdoor import baselines as B
from runtime_backdoor.budget import Budget
from runtime_backdoor.editors.simple import GlobalMixEditor
from runtime_backdoor.implant import ImplantResult, implant
from runtime_backdoor.masks import expand, ring
from runtime_backdoor.metrics import hit_fraction_batch as hit_fraction

EPS = 0.025
KW = {"eps": EPS, "steps": 20, "expand_kernel": 5, "progress": False}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(4)
    low = torch.rand(4, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(48, 48), mode="bicubic", align_corners=False).clamp(0, 1)
    x = torch.round(x * 255) / 255
    m = torch.zeros(4, 1, 48, 48)
    m[..., 16:30, 12:34] = 1
    return x, m


@pytest.fixture(scope="module")
def control():
    return GlobalMixEditor(gain=800, reach=4)


@pytest.fixture(scope="module")
def results(images, control):
    x, m = images
    return {
        k: B.protect(k, control, x, m, **KW) for k in ("backdoor", "untargeted", "markpainting")
    }


@pytest.mark.parametrize("method", ["untargeted", "markpainting", "backdoor"])
def test_baselines_stay_within_eps_in_range_and_8_bit(results, images, method):
    x, _ = images
    r = results[method]
    assert isinstance(r, ImplantResult)
    assert (r.protected - x).abs().max() <= EPS + 1e-6
    assert r.protected.min() >= 0 and r.protected.max() <= 1
    assert torch.allclose(r.protected * 255, torch.round(r.protected * 255), atol=1e-4)
    assert torch.equal(r.delta, r.protected - x)
    assert r.losses["total"].shape == (20, 4) and r.seconds > 0


def test_untargeted_moves_the_edit_away_from_the_clean_edit(results, images, control):
    x, m = images
    with torch.no_grad():
        clean = control(x, m)
        moved = ((control(results["untargeted"].protected, m) - clean) ** 2 * m).sum() / (
            3 * m.sum()
        )
        # A random perturbation of the same size as reference.
        g = torch.Generator().manual_seed(0)
        noise = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
        random = ((control((x + noise).clamp(0, 1), m) - clean) ** 2 * m).sum() / (3 * m.sum())
    away = results["untargeted"].losses["away_mask"]
    assert away[-1].mean() > away[0].mean()
    assert moved > 0.1 and moved > 3 * random


@pytest.fixture(scope="module")
def seeded(images, control):
    """Backdoor and Markpainting over four δ₀ seeds: on this chaotic control a single run's
    hits flip with the seed, so the claims below are about rates over 16 image x seed runs."""
    x, m = images
    return {
        k: [B.protect(k, control, x, m, **KW, seed=s) for s in range(4)]
        for k in ("backdoor", "markpainting")
    }


def seed_rate(runs, control, region):
    with torch.no_grad():
        return float(
            torch.cat(
                [hit_fraction(control(r.protected, region), r.target, region, 0.1) for r in runs]
            ).mean()
        )


def test_markpainting_fires_under_benign_masks_more_than_the_backdoor(seeded, images, control):
    """The backdoor's ring term is what keeps benign edits normal; Markpainting has none."""
    x, m = images
    band = ring(m, 5)
    ring_hits = {k: seed_rate(runs, control, band) for k, runs in seeded.items()}
    with torch.no_grad():
        target = seeded["backdoor"][0].target
        assert hit_fraction(control(x, band), target, band, 0.1).max() == 0
    # Measured: Markpainting 0.62, the backdoor 0.25 of the ring edits on target.
    assert ring_hits["markpainting"] >= 0.5 and ring_hits["backdoor"] <= 0.4, ring_hits
    assert ring_hits["markpainting"] - ring_hits["backdoor"] >= 0.25, ring_hits


def test_markpainting_and_backdoor_both_fire_under_the_protected_region(seeded, images, control):
    x, m = images
    hits = {k: seed_rate(runs, control, m) for k, runs in seeded.items()}
    # Measured: Markpainting 0.75, the backdoor 0.44 (official 19-update semantics).
    assert hits["markpainting"] >= 0.5 and hits["backdoor"] >= 0.25, hits
    # Markpainting also fires under E(m) (measured 0.69), which it was optimised for too.
    assert seed_rate(seeded["markpainting"], control, expand(m, 5)) >= 0.5


def test_protect_backdoor_is_implant(images, control):
    x, m = images
    kw = {**KW, "steps": 3}
    a, b = B.protect("backdoor", control, x, m, **kw), implant(control, x, m, **kw)
    assert torch.equal(a.protected, b.protected)


def test_protect_refuses_unknown_methods(images, control):
    with pytest.raises(ValueError, match="unknown method"):
        B.protect("mist", control, *images, **KW)


@pytest.mark.parametrize("method", ["untargeted", "markpainting"])
def test_bad_settings_are_refused_before_any_work(images, control, method):
    image, mask = images
    calls = []
    handle = control.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="eps must be in"):
            B.protect(method, control, image, mask, eps=0.0)
        with pytest.raises(TypeError, match="epz"):
            B.protect(method, control, image, mask, epz=0.1)
    finally:
        handle.remove()
    assert calls == []


def test_encoder_attack_is_not_applicable_without_a_vae(images, control):
    with pytest.raises(B.NotApplicable, match="latent-diffusion"):
        B.protect("encoder", control, *images, **KW)


def test_random_boxes_are_seeded_and_inside_the_image():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = B.random_boxes((3, 1, 40, 30), g1), B.random_boxes((3, 1, 40, 30), g2)
    assert torch.equal(a, b)
    area = a.flatten(1).sum(1) / (40 * 30)
    assert torch.all(area >= 0.15**2 - 0.01) and torch.all(area <= 0.5**2 + 0.02)


def test_encoder_attack_pulls_the_latent_towards_the_target_on_a_tiny_sd():
    pytest.importorskip("diffusers")
    from runtime_backdoor.editors.diffusion import tiny_sd_inpainting

    editor = tiny_sd_inpainting(seed=0, steps=1, size=32)
    g = torch.Generator().manual_seed(1)
    x = torch.round(torch.rand(1, 3, 32, 32, generator=g) * 255) / 255
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:20, 8:20] = 1
    r = B.protect("encoder", editor, x, m, **{**KW, "steps": 8})
    assert (r.protected - x).abs().max() <= EPS + 1e-6
    lat = r.losses["latent_mask"][:, 0]
    assert lat[-1] < lat[0]
    with torch.no_grad():
        # The result is an image the editor accepts; the fill differs from the clean one.
        assert editor(r.protected, m).shape == x.shape


def test_random_noise_is_uniform_within_the_budget_on_the_8bit_grid():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = torch.round(x * 255) / 255
    m = torch.zeros(2, 1, 32, 32)
    m[..., 8:20, 8:20] = 1

    class Untouched(torch.nn.Module):
        def forward(self, image, mask):  # the random baseline never consults the editor
            raise AssertionError("called")

    budget = Budget()
    r = B.protect("random", Untouched(), x, m, budget=budget)
    levels = r.protected * 255
    assert torch.allclose(levels, torch.round(levels), atol=1e-4)  # 8-bit representable
    assert (r.delta.abs() * 255).max() <= budget.eps_8bit + 1e-4  # within ⌊ε·255⌋ levels
    assert r.protected.min() >= 0 and r.protected.max() <= 1
    # U[-ε, ε] rounded: about half the values move by 3 or more levels, both signs equally.
    moved = (r.delta * 255).round()
    assert 0.4 < (moved.abs() >= 3).float().mean() < 0.75
    assert abs(float((moved > 0).float().mean() - (moved < 0).float().mean())) < 0.05
    again = B.protect("random", Untouched(), x, m, budget=budget)
    other = B.protect("random", Untouched(), x, m, budget=budget.with_seed(1))
    assert torch.equal(again.protected, r.protected) and not torch.equal(
        other.protected, r.protected
    )
