"""The classical fill's blur: banded matrices equal padding + depthwise convolution."""

import pytest
import torch
import torch.nn.functional as F

from runtime_backdoor.editors.simple import BlurFillEditor, _gaussian_kernel


def padded_conv_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur written the direct way (pad, then a depthwise convolution)."""
    k = _gaussian_kernel(sigma, x.dtype, x.device)
    c, pad = x.shape[1], k.numel() // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    x = F.pad(x, (pad, pad, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, pad, pad), mode=mode)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# 128 px: reflect at every σ; 64x48 at σ=16: pad 48 = the short side, replicate on both axes.
@pytest.mark.parametrize("shape", [(2, 3, 128, 128), (1, 3, 64, 48), (1, 1, 30, 30)])
@pytest.mark.parametrize("sigma", [16.0, 8.0, 2.0])
def test_blur_equals_padded_convolution_values_and_gradients(shape, sigma):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(shape, dtype=torch.float64, generator=g)
    ours = BlurFillEditor()._blur(x, sigma)
    ref = padded_conv_blur(x, sigma)
    assert (ours - ref).abs().max() < 1e-12
    (grad_ours,) = torch.autograd.grad((ours * w).sum(), x)
    (grad_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert (grad_ours - grad_ref).abs().max() < 1e-12


def test_fill_keeps_a_constant_image_and_stays_in_range():
    x = torch.full((1, 3, 40, 40), 0.3)
    m = torch.zeros(1, 1, 40, 40)
    m[..., 10:30, 5:25] = 1
    out = BlurFillEditor()(x, m)
    assert (out - 0.3).abs().max() < 1e-5
    y = torch.rand(2, 3, 40, 40)
    out = BlurFillEditor()(y, m.expand(2, -1, -1, -1))
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out * (1 - m), y * (1 - m))  # known pixels are kept
