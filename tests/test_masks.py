import numpy as np
import pytest
import torch
from scipy import ndimage

from runtime_backdoor import masks


def random_mask(seed, h=40, w=50, p=0.03):
    gen = np.random.default_rng(seed)
    m = ndimage.binary_dilation(gen.random((h, w)) < p, iterations=2)
    return torch.from_numpy(m.astype(np.float32))[None, None]


@pytest.mark.parametrize("kernel", [1, 3, 9, 17])
@pytest.mark.parametrize("seed", [0, 1])
def test_expand_equals_scipy_box_dilation(kernel, seed):
    m = random_mask(seed)
    ref = ndimage.binary_dilation(m[0, 0].numpy() > 0, structure=np.ones((kernel, kernel)))
    assert np.array_equal(masks.expand(m, kernel)[0, 0].numpy() > 0, ref)


def test_expand_rejects_even_kernel():
    with pytest.raises(ValueError, match="odd"):
        masks.expand(random_mask(0), 4)


def test_ring_is_expansion_minus_mask():
    m = random_mask(3)
    r = masks.ring(m, 9)
    assert torch.all((r * m) == 0)
    assert torch.equal(torch.maximum(r, m), masks.expand(m, 9))


@pytest.mark.parametrize("mode", masks.HALF_MODES)
def test_half_keeps_floor_half_inside_the_mask(mode):
    m = random_mask(5)
    n = int(m.sum())
    h = masks.half(m, mode)
    assert int(h.sum()) == n // 2
    assert torch.all(h <= m)


def test_half_diagonal_takes_the_top_left_pixels():
    m = torch.zeros(1, 1, 4, 4)
    m[..., 1:3, 1:3] = 1  # pixels (1,1) (1,2) (2,1) (2,2): row+col = 2, 3, 3, 4
    h = masks.half(m, "diagonal")
    expected = torch.zeros_like(m)
    expected[0, 0, 1, 1] = expected[0, 0, 1, 2] = 1  # the tie at 3 goes to raster order
    assert torch.equal(h, expected)
    assert torch.equal(masks.half(m, "horizontal")[0, 0, 1], m[0, 0, 1])
    assert torch.equal(masks.half(m, "vertical")[0, 0, :, 1], m[0, 0, :, 1])


def test_half_works_per_image_of_a_batch():
    a, b = random_mask(1), random_mask(2)
    both = masks.half(torch.cat([a, b]))
    assert torch.equal(both[0:1], masks.half(a)) and torch.equal(both[1:2], masks.half(b))


def test_incomplete_is_union_of_halves():
    m = random_mask(4)
    inc = masks.incomplete(m, 5)
    assert torch.equal(inc, torch.maximum(masks.half(m), masks.half(masks.expand(m, 5))))
    assert torch.all(inc <= masks.expand(m, 5))


def test_box_elsewhere_does_not_touch_the_expanded_region():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 5:20, 5:25] = 1
    box = masks.box_elsewhere(m, kernel=9, size=0.25)
    assert int(box.sum()) == 16 * 16
    assert torch.all(box * masks.expand(m, 9) == 0)


def test_box_elsewhere_shrinks_then_raises_when_nothing_fits():
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:24, 8:24] = 1
    small = masks.box_elsewhere(m, kernel=3, size=0.5)  # 16 px cannot fit; a smaller square can
    assert 0 < int(small.sum()) < 16 * 16
    assert torch.all(small * masks.expand(m, 3) == 0)
    with pytest.raises(ValueError, match="no 4x4 benign box"):
        masks.box_elsewhere(m, kernel=9, size=0.5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(1, 1, 8, 8), "empty"),
        (torch.ones(1, 1, 8, 8), "whole image"),
        (torch.full((1, 1, 8, 8), 0.5), "only 0 and 1"),
        (torch.zeros(1, 8, 8), "shape"),
    ],
)
def test_check_mask_rejects_bad_masks(bad, message):
    with pytest.raises(ValueError, match=message):
        masks.check_mask(bad)


def test_scaled_kernel_matches_paper_at_512():
    assert masks.scaled_kernel(512) == 17
    assert masks.scaled_kernel(128) == 5
    assert masks.scaled_kernel(256) == 9


def test_free_squares_shrink_until_one_fits():
    blocked = torch.ones(1, 1, 40, 40)
    blocked[..., :5, :5] = 0  # only a 5x5 corner is free
    free, side = masks.free_squares(blocked, 20, min_side=4)
    assert side == 4  # 20 -> 15 -> 11 -> 8 -> 6 -> 4
    assert free.shape == (37, 37) and free.sum() == 4 and free[:2, :2].all()
    free, side = masks.free_squares(blocked, 20, min_side=6)
    assert side == 6 and not free.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, win", [((2, 1, 128, 128), 129), ((3, 1, 40, 56), 41), ((2, 1, 33, 33), 7)]
)
def test_window_mean_of_a_mask_is_avg_pool_bit_for_bit(shape, win, dtype):
    g = torch.Generator().manual_seed(win)
    for density in (0.0, 0.02, 0.3, 1.0):
        m = (torch.rand(shape, generator=g) < density).to(dtype)
        ref = torch.nn.functional.avg_pool2d(
            m, win, stride=1, padding=win // 2, count_include_pad=False
        )
        got = masks.window_mean_01(m, win)
        assert got.dtype == dtype and torch.equal(got, ref)


def test_window_sums_count_the_ones_of_each_window():
    m = (torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    sums = masks.window_sums(m, 5)
    assert sums.shape == (2, 1, 16, 26)
    assert sums[1, 0, 3, 7].item() == m[1, 0, 3:8, 7:12].sum().item()
    assert torch.equal(sums == 0, torch.nn.functional.avg_pool2d(m, 5, stride=1) == 0)
