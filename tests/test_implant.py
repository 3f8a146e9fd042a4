import pytest
import torch

from runtime_backdoor import masks
from runtime_backdoor.editors.simple import BlurFillEditor, ConstantFillEditor, GlobalMixEditor
from runtime_backdoor.implant import implant, masked_mse, quantize_within, sensitivity

EPS = 0.025


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.round((torch.rand(3, 3, 64, 64, generator=gen) * 0.6 + 0.2) * 255) / 255
    m = torch.zeros(3, 1, 64, 64)
    m[:, :, 16:48, 16:48] = 1
    return x, m


def hole_error(out, target, mask):
    return ((out - target).abs() * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * 3)


def test_invariants_budget_range_and_8_bits(batch):
    x, m = batch
    r = implant(GlobalMixEditor(), x, m, steps=5, progress=False)
    assert r.delta.abs().max() <= EPS + 1e-7
    assert r.protected.min() >= 0 and r.protected.max() <= 1
    assert torch.equal(torch.round(r.protected * 255) / 255, r.protected)
    assert torch.allclose(r.protected - x, r.delta)
    assert r.losses["total"].shape == (5, 3)
    assert r.seconds > 0


def test_same_seed_gives_identical_bytes_and_other_seed_differs(batch):
    x, m = batch
    ed = BlurFillEditor()
    a = implant(ed, x, m, steps=3, progress=False, expand_kernel=9)
    b = implant(ed, x, m, steps=3, progress=False, expand_kernel=9)
    c = implant(ed, x, m, steps=3, progress=False, expand_kernel=9, seed=1)
    assert torch.equal(a.protected, b.protected)
    assert not torch.equal(a.protected, c.protected)


def test_batch_equals_images_one_by_one(batch):
    x, m = batch
    ed = GlobalMixEditor()
    together = implant(ed, x[:2], m[:2], steps=4, progress=False)
    alone = implant(ed, x[1:2], m[1:2], steps=4, progress=False, seed=0)
    # Same seed draws δ₀ for the whole batch, so compare image 0 of a batch of one.
    first = implant(ed, x[:1], m[:1], steps=4, progress=False)
    assert torch.allclose(together.protected[:1], first.protected, atol=1 / 255 + 1e-6)
    assert alone.protected.shape == (1, 3, 64, 64)


def test_batched_and_separate_passes_agree(batch):
    x, m = batch
    ed = GlobalMixEditor()
    a = implant(ed, x, m, steps=4, progress=False, batch_passes=True)
    b = implant(ed, x, m, steps=4, progress=False, batch_passes=False)
    assert torch.allclose(a.losses["total"], b.losses["total"], atol=1e-5)


def test_positive_control_reaches_target(batch):
    """A sensitive editor: the clean fill is far from the target, the protected one on it."""
    x, _ = batch
    m = torch.zeros(3, 1, 64, 64)
    m[:, :, 20:36, 24:40] = 1
    ed = GlobalMixEditor(gain=800)
    s = sensitivity(ed, x, m, eps=EPS)
    assert torch.all(s.reachable), (s.gain, s.needed)
    r = implant(ed, x, m, progress=False)  # every official default
    assert torch.all(hole_error(ed(x, m), r.target, m) > 0.3)
    err = hole_error(ed(r.protected, m), r.target, m)
    assert torch.all(err < 0.05), err  # measured 0.000-0.005
    # Official defaults decrease the implant loss by more than 10x on this control.
    assert torch.all(r.losses["implant"][-1] < r.losses["implant"][0] / 10)


def test_hide_term_keeps_the_ring_edit_close_to_the_clean_one(batch):
    """On a border-driven editor the ring term holds the ring edit near the clean edit.

    (A purely global control cannot do both: every mask sees nearly the same pixels.)
    """
    x, m = batch
    ed = GlobalMixEditor(gain=100, reach=2)
    band = masks.ring(m, 9)
    moved = {}
    for w_hide in (2.0, 0.0):
        r = implant(ed, x, m, progress=False, expand_kernel=9, weights=(1, 1, w_hide))
        moved[w_hide] = hole_error(ed(r.protected, band), ed(x, band), band)
    assert torch.all(moved[2.0] < 0.08), moved  # measured 0.044-0.054
    assert torch.all(moved[0.0] > 2 * moved[2.0]), moved  # measured 0.16-0.17 without the term


def test_negative_control_cannot_be_moved(batch):
    x, m = batch
    ed = ConstantFillEditor(0.5)
    s = sensitivity(ed, x, m)
    assert torch.all(s.gain == 0) and not torch.any(s.reachable)
    r = implant(ed, x, m, progress=False)
    assert torch.equal(ed(r.protected, m) * m, ed(x, m) * m)
    assert torch.allclose(r.losses["implant"][0], r.losses["implant"][-1])


def test_sensitivity_matches_finite_differences():
    """The gain is a directional-derivative bound: check it on the linear part of a blur fill."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 32, 32, generator=gen, dtype=torch.float64)
    m = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    m[..., 10:20, 10:20] = 1
    ed = BlurFillEditor().double()
    s = sensitivity(ed, x, m, eps=EPS)
    # The blur fill is linear in x and an average: moving every known pixel by +1 moves the
    # fill by exactly +1, and the fill of a direction-signed mean moves by at most 1 per unit.
    assert 0.3 <= float(s.gain) <= 1.0 + 1e-6
    needed = float(s.fill_error) / EPS
    assert float(s.needed) == pytest.approx(needed)


def test_quantize_within_respects_budget_on_non_8bit_inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    x_adv = x + (torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1) * 0.03
    q = quantize_within(x, x_adv, EPS)
    assert (q - x).abs().max() <= EPS + 1e-6
    assert torch.equal(torch.round(q * 255) / 255, q)


def test_masked_mse_uses_only_mask_pixels():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.ones(1, 3, 4, 4)
    b[..., :2, :] = 0
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    assert float(masked_mse(a, b, mask)) == 0.0
    assert float(masked_mse(a, b, 1 - mask)) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 0}, "eps"),
        ({"eps": 2}, "eps"),
        ({"steps": -1}, "steps"),
        ({"lr": 0}, "lr"),
        ({"weights": (1, 1)}, "weights"),
        ({"target": "pink"}, "unknown target"),
    ],
)
def test_bad_parameters_are_named(batch, kwargs, message):
    x, m = batch
    with pytest.raises(ValueError, match=message):
        implant(ConstantFillEditor(), x, m, progress=False, **kwargs)


def test_bf16_autocast_keeps_delta_and_losses_in_float32(batch):
    x, m = batch
    from runtime_backdoor.editors.lama import load_lama

    ed = load_lama(None, preset="mini", seed=0)
    r = implant(ed, x[:1], m[:1], steps=2, progress=False, autocast_dtype=torch.bfloat16)
    ref = implant(ed, x[:1], m[:1], steps=2, progress=False)
    assert r.delta.dtype == torch.float32 and r.losses["total"].dtype == torch.float32
    assert r.delta.abs().max() <= EPS + 1e-7
    # bf16 changes the editor's numbers a little, not the optimisation's outcome.
    assert torch.allclose(r.losses["total"][0], ref.losses["total"][0], rtol=0.05)
