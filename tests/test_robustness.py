"""Fair masks, transformations and the EOT editor wrapper."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime_backdoor import robustness as R
from runtime_backdoor.editors.simple import GlobalMixEditor
from runtime_backdoor.eot import EOTEditor
from runtime_backdoor.implant import implant
from runtime_backdoor.masks import expand


def text_like_mask(size: int = 64) -> torch.Tensor:
    """Three thin, separate strokes (like a watermark's letters) and a blob."""
    m = torch.zeros(2, 1, size, size)
    m[0, 0, 20:40, 10:13] = 1
    m[0, 0, 20:23, 10:30] = 1
    m[0, 0, 30:40, 36:39] = 1
    m[0, 0, 25:28, 45:52] = 1
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    m[1, 0] = (((yy - 30) / 9) ** 2 + ((xx - 24) / 14) ** 2 <= 1).float()
    return m


def natural_images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images with some edges (JPEG behaves on them as on photos)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x[..., size // 3 : size // 2, :] += 0.2
    return R.to_8bit(x.clamp(0, 1))


# ------------------------------------------------------------------------------- fair masks


def test_fair_malicious_masks_cover_the_protected_region():
    m = text_like_mask()
    fair = R.fair_masks(m, seed=3)
    assert set(fair) == set(R.FAIR_SCENARIOS)
    for name in ("fair_box", "fair_brush", "fair_hull", "fair_ellipse"):
        assert torch.all(fair[name] >= m), name
        assert torch.all((fair[name] == 0) | (fair[name] == 1)), name
    # Tight shapes are tighter than the loose box, and differ from m for the text.
    assert torch.all(fair["fair_hull"].sum((1, 2, 3)) <= fair["fair_box"].sum((1, 2, 3)))
    assert fair["fair_hull"][0].sum() > 1.5 * m[0].sum()
    # For an elliptic region the fitted ellipse is the region itself, up to the rim.
    iou = (fair["fair_ellipse"][1] * m[1]).sum() / torch.maximum(
        fair["fair_ellipse"][1], m[1]
    ).sum()
    assert iou > 0.85


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("width", [0.05, 0.08, 0.15])
def test_brush_stroke_covers_the_content_without_touch_up(seed, width):
    m = text_like_mask()
    stroke = R.brush_stroke(m, width=width, seed=seed)
    assert torch.all(stroke >= m)
    # The stroke is wider than the content's bounding box only by about a brush width.
    brush = max(3, round(width * 64))
    for i in range(2):
        cols = torch.nonzero(stroke[i, 0].any(0)).flatten()
        mcols = torch.nonzero(m[i, 0].any(0)).flatten()
        assert cols.min() >= mcols.min() - 2 * brush and cols.max() <= mcols.max() + 2 * brush


def test_brush_passes_cover_the_bounding_box_by_construction():
    # Coverage must come from the passes themselves, not from the final union with m.
    m = text_like_mask()
    for seed in range(5):
        stroke = R.brush_stroke(m, width=0.08, seed=seed)
        t, left, b, r = R._bbox(m[0, 0].numpy() > 0.5)
        inner = stroke[0, 0, t:b, left:r]
        assert inner.mean() == 1.0


@pytest.mark.parametrize("k", [1, 3, 4])
def test_shifted_hull_is_the_hull_shifted_by_exactly_k(k):
    m = text_like_mask()
    fair = R.fair_masks(m, shift_px=k)
    hull, moved = fair["fair_hull"], fair["fair_hull_shifted"]
    assert torch.equal(moved[..., :, k:], hull[..., :, :-k])
    assert torch.all(moved[..., :, :k] == 0)
    assert torch.equal(R.shift(m, -2, 3)[..., :-2, 3:], m[..., 2:, :-3])


def test_shift_rejects_moving_out_of_the_image():
    with pytest.raises(ValueError, match="out of"):
        R.shift(text_like_mask(), 0, 64)


def test_benign_boxes_stay_clear_of_the_content_and_grow():
    m = text_like_mask()
    fair = R.fair_masks(m, clearance=4, seed=0)
    near = expand(m, 2 * 4 + 1)
    areas = []
    for name in R.FAIR_BENIGN:
        assert torch.all(fair[name] * near == 0), name
        areas.append(fair[name].sum((1, 2, 3)))
    assert torch.all(areas[0] < areas[1]) and torch.all(areas[1] <= areas[2])
    # Placed at random: another seed puts them elsewhere; the same seed reproduces them.
    again = R.fair_masks(m, clearance=4, seed=0)
    other = R.fair_masks(m, clearance=4, seed=1)
    assert torch.equal(again["benign_medium"], fair["benign_medium"])
    assert not torch.equal(other["benign_medium"], fair["benign_medium"])


def test_benign_box_that_cannot_fit_is_an_error():
    m = torch.ones(1, 1, 32, 32)
    m[..., 0, 0] = 0
    with pytest.raises(ValueError, match="benign box"):
        R.random_boxes_elsewhere(m, 0.2)


# ------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    "spec", ["none", "jpeg:95", "jpeg:75", "jpeg:50", "resize:0.5", "blur:1", "noise:2", "crop:6px"]
)
def test_transforms_keep_range_and_8_bits(spec):
    x = natural_images()
    t = R.parse_transform(spec)
    y = t(x)
    assert t.name == spec
    expected = (52, 52) if spec == "crop:6px" else (64, 64)  # 6 px off each side
    assert y.shape == (2, 3, *expected) and y.dtype == x.dtype
    assert y.min() >= 0 and y.max() <= 1
    assert torch.allclose(y * 255, torch.round(y * 255), atol=1e-4)
    mask = torch.zeros(2, 1, 64, 64)
    assert t.frame(mask).shape[-2:] == expected


def test_jpeg_quality_orders_the_damage_and_95_changes_few_pixels():
    x = natural_images()
    err = {q: (R.jpeg(x, q) - x).abs() for q in (95, 75, 50)}
    assert err[95].mean() < err[75].mean() < err[50].mean()
    # q = 95 (PIL's default 4:2:0 chroma subsampling): a few 8-bit levels on average, and
    # under 5% of the values off by more than 8/255 (ε is 6.4/255: not a no-op for δ).
    assert err[95].mean() < 3 / 255
    assert (err[95] > 8 / 255).float().mean() < 0.05


def test_blur_noise_resize_and_crop_do_what_they_say():
    flat = torch.full((1, 3, 32, 32), 0.4)
    assert torch.allclose(R.gaussian_blur(flat, 1.0), flat, atol=1e-6)
    assert torch.allclose(R.resize_back(flat, 0.5), R.to_8bit(flat), atol=1 / 255)
    noisy = R.gaussian_noise(torch.full((1, 3, 128, 128), 0.5), 2 / 255, seed=1)
    assert abs(float((noisy - 0.5).std()) * 255 - 2) < 0.1
    assert torch.equal(noisy, R.gaussian_noise(torch.full((1, 3, 128, 128), 0.5), 2 / 255, seed=1))
    x = natural_images(1)
    assert torch.equal(R.crop_border(x, 6), x[..., 6:58, 6:58])
    # Blur of σ 1 smooths an edge but keeps the mean.
    assert abs(float(R.gaussian_blur(x, 1.0).mean() - x.mean())) < 1e-3


@pytest.mark.parametrize(
    "bad", ["sharpen:1", "jpeg", "crop:40px", "crop:6", "crop:0.1", "crop:10%"]
)
def test_bad_transforms_are_refused(bad):
    with pytest.raises(ValueError):
        R.parse_transform(bad)(natural_images(1))


def test_parse_transforms_from_a_params_string():
    ts = R.parse_transforms("none jpeg:75  crop:6px")
    assert [t.name for t in ts] == ["none", "jpeg:75", "crop:6px"]


# ------------------------------------------------------------------------------- EOT


def test_jpeg_straight_through_forward_is_jpeg_backward_is_identity():
    x = natural_images(1).requires_grad_(True)
    y = R.jpeg_straight_through(x, 60)
    assert torch.allclose(y, R.jpeg(x.detach(), 60))
    (g,) = torch.autograd.grad((y * torch.arange(3.0).view(1, 3, 1, 1)).sum(), x)
    assert torch.allclose(g, torch.arange(3.0).view(1, 3, 1, 1).expand_as(x))


def test_eot_editor_is_the_plain_editor_without_gradients():
    editor = GlobalMixEditor(gain=400, reach=4)
    eot = EOTEditor(editor, ("jpeg", "resize", "noise", "dilate", "shift"), p=1.0, seed=0)
    x, m = natural_images(), text_like_mask()
    with torch.no_grad():
        assert torch.equal(eot(x, m), editor(x, m))
    forced = EOTEditor(editor, ("jpeg",), p=1.0, jpeg_quality=(60, 60), active=True)
    with torch.no_grad():
        y = forced(x, m)
        assert torch.allclose(y * m, editor(R.jpeg(x, 60), m) * m)
        assert not torch.allclose(y * m, editor(x, m) * m)
        # Outside the mask the caller's image is kept, whatever the transformation.
        assert torch.equal(y * (1 - m), x * (1 - m))


def test_eot_editor_draws_transformations_and_passes_gradients():
    editor = GlobalMixEditor(gain=400, reach=4)
    x, m = natural_images(), text_like_mask()
    plain = editor(x, m)
    draws = []
    for seed in (0, 1):
        eot = EOTEditor(editor, ("jpeg", "resize", "noise", "dilate", "shift"), p=1.0, seed=seed)
        xr = x.clone().requires_grad_(True)
        y = eot(xr, m)
        assert y.shape == x.shape
        (g,) = torch.autograd.grad((y * m).sum(), xr)
        assert g.abs().sum() > 0
        draws.append(y.detach())
    assert not torch.allclose(draws[0], plain) and not torch.allclose(draws[0], draws[1])
    # Same seed, same draws.
    again = EOTEditor(editor, ("jpeg", "resize", "noise", "dilate", "shift"), p=1.0, seed=0)
    assert torch.equal(again(x.clone().requires_grad_(True), m).detach(), draws[0])


def test_eot_editor_refuses_unknown_transformations():
    with pytest.raises(ValueError, match="EOT draw 'rotate': unknown word"):
        EOTEditor(GlobalMixEditor(), ("rotate",))
    with pytest.raises(ValueError, match="crop:P%"):  # px crops change the size: not drawn
        EOTEditor(GlobalMixEditor(), ("crop:6px",))


def test_implant_through_eot_stays_within_budget_and_survives_jpeg_better():
    """EOT's point: the backdoor optimised through random JPEG keeps firing after JPEG."""
    editor = GlobalMixEditor(gain=800, reach=4)
    x, m = natural_images(4, seed=2), torch.zeros(4, 1, 64, 64)
    m[..., 24:40, 20:44] = 1
    kw = {"eps": 0.025, "steps": 20, "expand_kernel": 5, "progress": False}
    plain = implant(editor, x, m, **kw)
    eot = implant(EOTEditor(editor, ("jpeg",), p=1.0, jpeg_quality=(50, 75)), x, m, **kw)
    assert (eot.protected - x).abs().max() <= 0.025 + 1e-6
    assert torch.allclose(eot.protected * 255, torch.round(eot.protected * 255), atol=1e-4)

    def loss_after_jpeg(protected):
        with torch.no_grad():
            out = editor(R.jpeg(protected, 60), m)
        return float((((out - plain.target) ** 2) * m).sum() / (3 * m.sum()))

    assert loss_after_jpeg(eot.protected) < loss_after_jpeg(plain.protected)
    assert np.isfinite(eot.losses["total"].numpy()).all()
