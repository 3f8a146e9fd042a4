"""Ensemble implantation: one δ against several editors (``implant([A, B], ...)``)."""

import numpy as np
import pytest
import torch

from runtime_backdoor.editors.base import Editor
from runtime_backdoor.editors.simple import GlobalMixEditor
from runtime_backdoor.implant import TERMS, implant, masked_mse
from runtime_backdoor.masks import expand, ring
from runtime_backdoor.samples import training_images
from runtime_backdoor.targets import make_target

SIZE, KERNEL = 32, 3


@pytest.fixture(scope="module")
def batch():
    photos = np.stack(training_images(SIZE, seed=3, n=4))
    # 8-bit images, as the pipeline reads them: the sign test below then sees whole steps.
    x = torch.from_numpy(np.round(photos * 255) / 255).permute(0, 3, 1, 2).float()
    m = torch.zeros(len(x), 1, SIZE, SIZE)
    m[..., 10:20, 12:22] = 1
    return x, m


class SignedRangeMix(Editor):
    """A sensitive toy that works in [-1, 1] inside, as MAT does: its own preprocessing."""

    name = "signed-range-mix"

    def __init__(self) -> None:
        super().__init__()
        self.inner = GlobalMixEditor(gain=800, reach=3, seed=2)

    def predict(self, image, mask):
        signed = image * 2 - 1
        filled = self.inner.predict((signed + 1) / 2, mask) * 2 - 1  # the fill, in [-1, 1]
        return (filled + 1) / 2


def editors():
    return GlobalMixEditor(gain=800, reach=3, seed=0), GlobalMixEditor(gain=800, reach=3, seed=1)


def backdoor_gradient(editor, x, m):
    """d(total loss)/dx at δ = 0, as the first Adam step sees it."""
    x = x.clone().requires_grad_(True)
    big, band, phi = expand(m, KERNEL), ring(m, KERNEL), make_target(x.detach(), "solid")
    with torch.no_grad():
        clean_ring = editor(x.detach(), band)
    terms = [
        masked_mse(editor(x, m), phi, m),
        masked_mse(editor(x, big), phi, big),
        masked_mse(editor(x, band), clean_ring, band),
    ]
    total = sum(w * t for w, t in zip((1.0, 1.0, 2.0), terms, strict=True))
    (grad,) = torch.autograd.grad(total.sum(), x)
    return grad


def first_step(editor_or_list, x, m, **kw):
    """δ after one Adam update from δ₀ = 0: −lr·sign(gradient) (Adam's first step)."""
    r = implant(editor_or_list, x, m, steps=2, lr=4 / 255, init_high=0.0, expand_kernel=KERNEL,
                progress=False, **kw)  # fmt: skip
    return r.protected - x


def test_one_editor_in_a_list_is_the_single_editor_implant_bit_for_bit(batch):
    x, m = batch
    a, _ = editors()
    single = implant(a, x, m, steps=5, expand_kernel=KERNEL, progress=False)
    listed = implant([a], x, m, steps=5, expand_kernel=KERNEL, progress=False)
    assert torch.equal(single.protected, listed.protected)
    # Twice the same editor, or one editor at weight 2: Adam is scale-invariant, so the
    # summed gradient (2g) gives the same steps as g — the same bytes.
    twice = implant([a, a], x, m, steps=5, expand_kernel=KERNEL, progress=False)
    weighted = implant([a], x, m, steps=5, expand_kernel=KERNEL, progress=False, editor_weights=[2])
    assert torch.equal(single.protected, twice.protected)
    assert torch.equal(single.protected, weighted.protected)


def test_gradients_of_the_editors_add_up(batch):
    x, m = batch
    a, b = editors()
    ga, gb = backdoor_gradient(a, x, m), backdoor_gradient(b, x, m)
    step = first_step([a, b], x, m)
    # Where x is not at a bound and both editors' gradients are clearly non-zero, the first
    # step moves every pixel by 4/255 against the sign of g_A + g_B.
    inside = (x > 5 / 255) & (x < 250 / 255) & ((ga + gb).abs() > 1e-6)
    expected = -torch.sign(ga + gb) * 4 / 255
    assert inside.sum() > 500  # the pixels the toy reads (its reach around the hole)
    torch.testing.assert_close(step[inside], expected[inside], atol=1e-6, rtol=0)
    # ... and not that of either editor alone, where the two disagree.
    disagree = inside & (torch.sign(ga) != torch.sign(gb))
    assert disagree.any()
    assert not torch.equal(torch.sign(step[disagree]), -torch.sign(ga[disagree]))


def test_mixed_input_ranges_and_the_budget(batch):
    x, m = batch
    a, _ = editors()
    signed = SignedRangeMix()
    r = implant([signed, a], x, m, steps=10, expand_kernel=KERNEL, progress=False)
    assert (r.protected - x).abs().max() <= 0.025 + 1e-6
    assert r.protected.min() >= 0 and r.protected.max() <= 1
    assert torch.allclose(r.protected * 255, torch.round(r.protected * 255), atol=1e-4)
    # Both editors' totals are recorded and the optimisation lowers their sum.
    assert {"total/0", "total/1", *TERMS, "total"} <= set(r.losses)
    total = r.losses["total"].mean(1)
    assert total[-1] < total[0]
    torch.testing.assert_close(r.losses["total"], r.losses["total/0"] + r.losses["total/1"])
    # The [-1, 1] editor's gradient reaches δ through its own preprocessing.
    g = backdoor_gradient(signed, x, m)
    step = first_step(signed, x, m)
    inside = (x > 5 / 255) & (x < 250 / 255) & (g.abs() > 1e-6)
    torch.testing.assert_close(step[inside], -torch.sign(g[inside]) * 4 / 255, atol=1e-6, rtol=0)


def test_bad_ensembles_are_refused():
    x = torch.rand(1, 3, 16, 16)
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:8, 4:8] = 1
    a, b = editors()
    with pytest.raises(ValueError, match="at least one editor"):
        implant([], x, m)
    with pytest.raises(ValueError, match="editor_weights must be 2"):
        implant([a, b], x, m, editor_weights=[1.0])
    with pytest.raises(ValueError, match="editor_weights must be"):
        implant([a, b], x, m, editor_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="editor_weights is for a list"):
        implant(a, x, m, editor_weights=[1.0])
