"""The one transform vocabulary (runtime_backdoor.transforms): the table round-trips, each unit
is the old operation bit for bit, ambiguous forms are refused, and the one EOT wrapper draws
from any list."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime_backdoor import purifiers as P
from runtime_backdoor import robustness as R
from runtime_backdoor import transforms as T
from runtime_backdoor.editors.simple import GlobalMixEditor
from runtime_backdoor.eot import EOTEditor, parse_draws

#: a valid value of every form of the table
SAMPLES = {
    "none": "none", "jpeg": "jpeg:75", "resize": "resize:0.5", "blur": "blur:1.5",
    "noise": "noise:12.75", "crop:px": "crop:6px", "crop:%": "crop:10%",
    "adverse-cleaner": "adverse-cleaner", "dilate": "dilate:2", "shift": "shift:4",
    "noisy-upscale": "noisy-upscale:20", "upscale": "upscale:320", "diffpure": "diffpure:0.1",
    "gridpure": "gridpure:0.1", "lanczos": "lanczos:0.5", "img2img-denoise": "img2img-denoise:0.15",
    "vae-roundtrip": "vae-roundtrip",
}  # fmt: skip


def random_images(n: int = 2, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return R.to_8bit(x + 0.05 * torch.rand(x.shape, generator=g))


def box_mask(n: int = 2, size: int = 48) -> torch.Tensor:
    m = torch.zeros(n, 1, size, size)
    m[..., 14:30, 12:34] = 1
    return m


# ------------------------------------------------------------------------------- the table


def test_every_form_has_a_sample_and_the_consumers_take_table_forms():
    assert set(SAMPLES) == set(T.FORMS)
    for forms in (T.BEYOND, T.PURIFY, T.EOT):
        assert set(forms) <= set(T.FORMS)
    assert "crop:0.1" not in T.table_markdown() and "`crop:P%`" in T.table_markdown()


@pytest.mark.parametrize("key", list(SAMPLES))
def test_the_grammar_round_trips(key):
    s = T.parse(SAMPLES[key])
    assert s.key == key and s.name == SAMPLES[key]
    assert T.parse(s.name) == s == T.parse(s)


def test_names_are_the_shortest_exact_text():
    assert T.parse("jpeg:75.0").name == "jpeg:75"
    assert T.parse("noise:25.50").name == "noise:25.5"
    assert T.parse(f"noise:{0.05 * 255}").value == 12.75  # 0.05·255 is exactly 12.75
    odd = T.parse("blur:0.123456789")
    assert T.parse(odd.name) == odd


def test_consumers_round_trip_their_own_specs():
    for spec in ("none", "jpeg:50", "resize:0.5", "blur:1", "noise:2", "crop:6px"):
        assert R.parse_transform(R.parse_transform(spec).name).name == spec
    for spec in (*P.CLASSICAL, *P.DIFFUSION):
        assert P.parse_purifier(P.parse_purifier(spec).name).name == spec
    assert P.parse_purifier("gridpure").name == "gridpure:0.1"
    draws = "jpeg resize noise dilate shift jpeg:75 noise:12.75 crop:10% dilate:3 adverse-cleaner"
    assert " ".join(s.name for s in parse_draws(draws)) == draws


# ------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("new", "old"),
    [
        ("none", lambda x: R.to_8bit(x)),
        ("jpeg:75", lambda x: R.jpeg(x, 75)),
        ("resize:0.5", lambda x: R.resize_back(x, 0.5)),
        ("blur:1", lambda x: R.to_8bit(R.gaussian_blur(x, 1.0))),
        ("noise:2", lambda x: R.to_8bit(R.gaussian_noise(x, 2 / 255, seed=7))),
        ("crop:6px", lambda x: R.to_8bit(R.crop_border(x, 6))),
    ],
)
def test_beyond_units_are_the_old_operations_bit_for_bit(new, old):
    x = random_images()
    assert torch.equal(R.parse_transform(new, seed=7)(x), old(x))


def test_beyond_crop_px_maps_masks_like_the_old_crop():
    m = box_mask()
    assert torch.equal(R.parse_transform("crop:6px").frame(m), R.crop_border(m, 6))


@pytest.mark.parametrize(
    ("new", "old"),
    [
        ("jpeg:50", lambda x: P.jpeg(x, 50)),
        ("noise:12.75", lambda x: P.gaussian_noise(x, 0.05, seed=3)),
        ("noise:25.5", lambda x: P.gaussian_noise(x, 0.1, seed=3)),
        ("crop:10%", lambda x: P.crop_resize(x, 0.1)),
        ("adverse-cleaner", lambda x: P.adverse_cleaner(x)),
    ],
)
def test_purify_units_are_the_old_operations_bit_for_bit(new, old):
    x = random_images(size=32)
    assert torch.equal(P.build_purifier(new, seed=3)(x), old(x))


def test_purify_crop_percent_maps_masks_and_images_like_the_old_fraction():
    m, x = box_mask(), random_images()
    spec = P.parse_purifier("crop:10%")
    assert torch.equal(spec.frame(m, mask=True), P.crop_resize_mask(m, 0.1))
    assert torch.equal(spec.frame(x), P.crop_resize(x, 0.1))


def test_unit_conversions_are_exact_in_floating_point():
    assert 12.75 / 255 == 0.05 and 25.5 / 255 == 0.1 and 10 / 100 == 0.1
    assert P.build_purifier("noise:12.75").keywords["sigma"] == 0.05
    assert P.build_purifier("crop:10%").keywords["fraction"] == 0.1


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("bad", "forms", "named"),
    [
        ("crop:0.1", T.BEYOND, "crop:Npx"),  # used to be a silent 0-px crop
        ("crop:6", T.BEYOND, "crop:Npx"),
        ("crop:0.1", T.PURIFY, "crop:P%"),
        ("crop:0.5px", T.BEYOND, "crop:Npx (px per side, integer >= 0)"),  # a fraction of a px
        ("crop:10%", T.BEYOND, "crop:Npx"),  # the other crop: not the beyond stage's
        ("crop:6px", T.PURIFY, "crop:P%"),
        ("crop:100%", T.PURIFY, "crop:P% (% of the side, [0, 100))"),
        ("noise:0.05", T.PURIFY, "noise:12.75"),  # the old [0, 1] unit
        ("noise:2px", T.BEYOND, "noise:σ"),
        ("noise:-1", T.BEYOND, "noise:σ (sigma in 8-bit levels"),
        ("jpeg:101", T.PURIFY, "jpeg:Q (JPEG quality, integer 1-100)"),
        ("jpeg:7.5", T.BEYOND, "jpeg:Q"),
        ("jpeg", T.BEYOND, "jpeg:Q"),
        ("jpeg:x", T.BEYOND, "jpeg:Q"),
        ("resize:2", T.BEYOND, "resize:S (scale, (0, 1])"),
        ("blur:1", T.PURIFY, "noise:σ"),
        ("sharpen:1", T.BEYOND, "blur:σ"),
        ("adverse-cleaner:3", T.PURIFY, "adverse-cleaner"),
        ("diffpure:0.1", T.EOT, "dilate:N"),
        ("dilate:1.5", T.EOT, "dilate:N (px, integer >= 1)"),
    ],
)
def test_ambiguous_and_bad_forms_are_refused_in_one_line_naming_the_accepted_forms(
    bad, forms, named
):
    with pytest.raises(ValueError) as err:
        T.parse(bad, forms)
    message = str(err.value)
    assert "\n" not in message and named in message and repr(bad) in message


def test_consumers_refuse_through_the_grammar():
    with pytest.raises(ValueError, match="crop needs its unit"):
        R.parse_transform("crop:0.1")
    with pytest.raises(ValueError, match="purifier 'noise:0.1'.*noise:25.5"):
        P.parse_purifier("noise:0.1")
    with pytest.raises(ValueError, match="Transform|transform 'sharpen:1'"):
        R.Transform("sharpen", 1.0)
    with pytest.raises(ValueError, match="EOT draw 'crop:6px'"):
        parse_draws("jpeg crop:6px")
    with pytest.raises(ValueError, match="old \\[0, 1\\] unit"):
        EOTEditor(GlobalMixEditor(), ("noise",), noise=2 / 255)  # EOT's σ is in levels too


# ------------------------------------------------------------------------------- EOT

ANY = ("none", "jpeg:75", "jpeg", "resize", "resize:0.75", "blur:1", "noise:12.75", "noise",
       "crop:10%", "adverse-cleaner", "dilate", "dilate:3", "shift", "shift:2")  # fmt: skip


@pytest.mark.parametrize("pick", ["each", "one"])
@pytest.mark.parametrize("jpeg_grad", ["straight-through", "kornia"])
def test_one_eot_wrapper_draws_from_any_list(pick, jpeg_grad):
    editor = GlobalMixEditor(gain=50, reach=3).requires_grad_(False)
    x, m = random_images(4, 32), box_mask(4, 32)
    outs = []
    for seed in (0, 0, 1):
        eot = EOTEditor(editor, ANY, pick=pick, p=0.5, jpeg_grad=jpeg_grad, seed=seed)
        xr = x.clone().requires_grad_(True)
        y = eot(xr, m)
        assert y.shape == x.shape
        assert torch.equal(y.detach() * (1 - m), x * (1 - m))  # composited on the caller's image
        (g,) = torch.autograd.grad((y * m).sum(), xr)
        assert float(g.abs().sum()) > 0  # straight through the non-differentiable draws
        outs.append(y.detach())
        with torch.no_grad():
            assert torch.equal(eot(x, m), editor(x, m))  # the plain editor for the reference
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_each_pick_keeps_the_draw_sequence():
    """``pick="each"``: per image and listed transformation one uniform draw against ``p``,
    then that transformation's own draws (here the noise field), from one seeded generator."""
    editor = GlobalMixEditor(gain=50, reach=3)
    x, m = random_images(1, 32), box_mask(1, 32)
    with torch.no_grad():
        got = EOTEditor(editor, ("noise",), p=1.0, seed=4, active=True)(x, m)
        g = torch.Generator().manual_seed(4)
        torch.rand((), generator=g)
        noisy = x + 2 / 255 * torch.randn(x.shape, generator=g)
        noisy = noisy + (noisy.clamp(0, 1) - noisy)  # the straight-through clip's forward
        assert torch.equal(got, m * editor(noisy, m) + (1 - m) * x)  # composited on x


def test_one_pick_keeps_the_draw_sequence():
    """``pick="one"``: one draw per image among the list, then the group's own draws."""
    editor = GlobalMixEditor(gain=50, reach=3)
    x, m = random_images(3, 32), box_mask(3, 32)
    with torch.no_grad():
        got = EOTEditor(editor, ("none", "noise:25.5"), pick="one", seed=9, active=True)(x, m)
        g = torch.Generator().manual_seed(9)
        draws = torch.randint(2, (3,), generator=g)
        want = editor(x, m)
        noisy = draws == 1
        if noisy.any():
            idx = torch.nonzero(noisy).flatten()
            xn = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
            want[idx] = editor(xn + (xn.clamp(0, 1) - xn), m[idx])
        assert torch.equal(got, m * want + (1 - m) * x)


def test_eot_refuses_bad_settings():
    editor = GlobalMixEditor()
    with pytest.raises(ValueError, match="pick"):
        EOTEditor(editor, ("jpeg",), pick="all")
    with pytest.raises(ValueError, match="jpeg_grad"):
        EOTEditor(editor, ("jpeg",), jpeg_grad="exact")
    with pytest.raises(ValueError, match="at least one"):
        EOTEditor(editor, ())
