"""Small editors without learned weights: a classical fill and the optimizer's controls."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Editor


def _gaussian_kernel(sigma: float, dtype, device) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _blur_matrix(n: int, kernel: torch.Tensor, reflect: bool) -> torch.Tensor:
    """(n, n) matrix of a 1-D convolution with ``kernel`` over a padded side of length ``n``.

    The same operator as padding (reflect, else replicate) followed by the convolution, as one banded matrix: applied as two small
    matrix products it is an order of magnitude faster on a CPU than a depthwise
    convolution with a long kernel (97 taps at σ = 16), forward and backward.
    """
    pad = kernel.numel() // 2
    source = torch.arange(n)[:, None] + torch.arange(-pad, pad + 1)[None, :]
    if reflect:  # -1 -> 1, n -> n - 2 (needs pad < n)
        source = source.abs()
        source = torch.where(source > n - 1, 2 * (n - 1) - source, source)
    else:
        source = source.clamp(0, n - 1)
    matrix = torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device)
    weights = kernel[None, :].expand(n, -1)
    return matrix.scatter_add_(1, source.to(kernel.device), weights)


class BlurFillEditor(Editor):
    """Classical fill by normalised convolution: known pixels diffused into the hole.

    Repeated Gaussian blurs of ``image·known`` divided by blurs of ``known``
    (multi-scale, coarse to fine). Smooth and insensitive: a reference for
    inpainting quality and a check that protection needs a sensitive editor.
    """

    name = "blur-fill"

    def __init__(self, sigmas: tuple[float, ...] = (16.0, 8.0, 4.0, 2.0)):
        super().__init__()
        self.sigmas = sigmas

    def _blur(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        k = _gaussian_kernel(sigma, x.dtype, x.device)
        # Reflect padding needs the pad to be smaller than the side (else replicate, both axes).
        reflect = k.numel() // 2 < min(x.shape[-2:])
        rows = _blur_matrix(x.shape[-2], k, reflect)
        cols = _blur_matrix(x.shape[-1], k, reflect)
        return rows @ x @ cols.T

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        known = 1 - mask
        fill = (image * known).sum((2, 3), keepdim=True) / known.sum(
            (2, 3), keepdim=True
        ).clamp_min(1)
        fill = fill.expand_as(image)
        for sigma in self.sigmas:
            num = self._blur(image * known, sigma)
            den = self._blur(known, sigma)
            weight = (den / 0.05).clamp(
                max=1
            )  # trust the blur only where enough known pixels reach
            fill = weight * num / den.clamp_min(1e-6) + (1 - weight) * fill
        return fill.clamp(0, 1)


class ConstantFillEditor(Editor):
    """Negative control: fills with a constant and ignores every input pixel."""

    name = "constant-fill"

    def __init__(self, value: float = 0.5):
        super().__init__()
        self.value = value

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Multiplying by zero keeps the graph (and the dtype/device) without any dependence.
        return image * 0 + self.value


class GlobalMixEditor(Editor):
    """Positive control: the fill colour is a steep function of the known pixels.

    ``fill_c = sigmoid(gain · mean_known(w_c · (x - 0.5)))`` with fixed random
    signs ``w`` mixing the three channels. With ``reach`` set, only known pixels
    within ``reach`` px of the hole count (as the hole's border dominates a real
    inpainter's fill), so the masks ``m``, ``E(m)`` and the ring see different
    pixels. Sensitivity is about ``gain / 8``.
    """

    name = "global-mix"

    def __init__(
        self, gain: float = 400.0, seed: int = 0, size: int = 64, reach: int | None = None
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (3, 3, size, size), generator=gen).float() * 2 - 1
        self.register_buffer("signs", signs)
        self.gain = gain
        self.reach = reach

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = F.interpolate(self.signs, size=image.shape[-2:], mode="nearest").to(image.dtype)
        weight = 1 - mask
        if self.reach is not None:
            # A square max filter is a max over rows then columns: the same values, and
            # two 1-D passes instead of a (2·reach+1)² window.
            k, r = 2 * self.reach + 1, self.reach
            near = F.max_pool2d(mask, (k, 1), 1, (r, 0))
            weight = weight * F.max_pool2d(near, (1, k), 1, (0, r))
        centred = (image - 0.5) * weight
        # The sum over every pixel runs in float64 and is rounded back: the BLAS kernels
        # of different CPUs sum in different orders, and at this gain a last-bit
        # difference can flip the optimisation's outcome (see tests/test_implant.py).
        total = torch.einsum("bihw,oihw->bo", centred.double(), w.double())
        area = 3 * weight.flatten(1).sum(1, keepdim=True).double()
        mixed = (total / area).to(image.dtype)
        colour = torch.sigmoid(self.gain * mixed)
        return colour[:, :, None, None].expand_as(image)
