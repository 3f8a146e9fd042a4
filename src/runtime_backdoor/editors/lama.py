"""LaMa (Suvorov et al., WACV 2022): the FFC-ResNet generator, its editor and weight loading.

An implementation of the generator of github.com/advimman/lama
(``saicinpainting/training/modules/ffc.py``, ``FFCResNetGenerator``), limited to
what the released FFC models use: no LFU, no gates, no learnable spatial
transform. Module names and shapes follow the official ones, so the released
weights load with ``strict=True``::

    editor = load_lama("models/big-lama/models/best.ckpt")
    edited = editor(image, mask)  # (B, 3, H, W) in [0, 1]

Accepted weight files (see :func:`read_lama_weights`):

- ``big-lama/models/best.ckpt`` from the authors' ``big-lama.zip``: a PyTorch
  Lightning 1.2 checkpoint, generator under ``state_dict["generator.*"]``;
- ``big-lama.pt``, the TorchScript trace distributed by lama-cleaner / IOPaint;
- a plain state dict (``.pt``/``.pth``/``.ckpt``) or a ``.safetensors`` file.

Nothing is unpickled beyond tensors: Lightning metadata objects are replaced by
inert placeholders and TorchScript archives are read without running their code
(:mod:`runtime_backdoor.editors.lama_files`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Editor
from .lama_files import (
    BIG_LAMA_HELP,  # noqa: F401 (re-exported: owner_io names it)
    _read_tensors,
    _resolve_path,
    _select_generator,
)

Branches = tuple[torch.Tensor, torch.Tensor | None]  # (local, global) feature maps


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class LamaConfig:
    """Hyper-parameters of an FFC-ResNet generator (official names where they exist)."""

    input_nc: int = 4  # RGB with the hole blanked out + mask
    output_nc: int = 3
    ngf: int = 64
    n_downsampling: int = 3
    n_blocks: int = 18
    #: share of the resnet blocks' channels on the Fourier (global) path
    global_ratio: float = 0.75
    max_features: int = 1024

    def __post_init__(self) -> None:
        if self.n_downsampling < 1:
            raise ValueError("n_downsampling must be >= 1 (the last one opens the global path)")
        if not 0.0 <= self.global_ratio < 1.0:
            raise ValueError(f"global_ratio must be in [0, 1), got {self.global_ratio}")


#: ``big-lama``: configs/training/big-lama.yaml; ``lama-fourier``: generator/ffc_resnet_075.yaml;
#: ``mini``: a small generator of the same design for tests and CPU runs.
PRESETS: dict[str, LamaConfig] = {
    "big-lama": LamaConfig(),
    "lama-fourier": LamaConfig(n_blocks=9),
    "mini": LamaConfig(ngf=16, n_downsampling=2, n_blocks=3),
}


class FourierUnit(nn.Module):
    """1x1 convolution + BN + ReLU applied to the real FFT of the input (global receptive field)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # FFTs run in float32: CPU has no half-precision FFT and cuFFT needs power-of-2 sizes for it
        spec = torch.fft.rfft2(x.float(), norm="ortho")
        # channel 2c holds the real part of channel c, 2c + 1 its imaginary part (official layout)
        y = torch.stack((spec.real, spec.imag), dim=2).flatten(1, 2).to(x.dtype)
        y = F.relu(self.bn(self.conv_layer(y))).unflatten(1, (-1, 2)).float()
        out = torch.fft.irfft2(torch.complex(y[:, :, 0], y[:, :, 1]), s=(h, w), norm="ortho")
        return out.to(x.dtype)


class SpectralTransform(nn.Module):
    """Global-to-global path: 1x1 reduce, Fourier unit with a residual, 1x1 expand."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = out_channels // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        self.fu = FourierUnit(hidden)
        self.conv2 = nn.Conv2d(hidden, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(x + self.fu(x))


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _path(module: nn.Module | None, x: torch.Tensor | None) -> torch.Tensor | None:
    return None if module is None or x is None else module(x)


class FFC(nn.Module):
    """Fast Fourier convolution: local/global channel split with four cross paths."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        in_g, out_g = int(in_channels * ratio_gin), int(out_channels * ratio_gout)
        in_l, out_l = in_channels - in_g, out_channels - out_g
        if in_g and stride != 1:
            raise ValueError("a strided FFC with global inputs is not used by LaMa generators")

        def conv(cin: int, cout: int) -> nn.Conv2d | None:
            if not (cin and cout):
                return None
            # the official generator pads every FFC convolution by reflection
            return nn.Conv2d(
                cin, cout, kernel_size, stride, padding, bias=False, padding_mode="reflect"
            )

        self.convl2l = conv(in_l, out_l)
        self.convl2g = conv(in_l, out_g)
        self.convg2l = conv(in_g, out_l)
        self.convg2g = SpectralTransform(in_g, out_g) if in_g and out_g else None

    def forward(self, x: Branches) -> Branches:
        x_l, x_g = x
        out_l = _add(_path(self.convl2l, x_l), _path(self.convg2l, x_g))
        out_g = _add(_path(self.convl2g, x_l), _path(self.convg2g, x_g))
        assert out_l is not None, "LaMa generators always keep local channels"
        return out_l, out_g


class FFCBlock(nn.Module):
    """FFC followed by BatchNorm and ReLU on each branch (official ``FFC_BN_ACT``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float = 0.0,
        ratio_gout: float = 0.0,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.ffc = FFC(
            in_channels, out_channels, kernel_size, ratio_gin, ratio_gout, stride, padding
        )
        out_g = int(out_channels * ratio_gout)
        self.bn_l = nn.BatchNorm2d(out_channels - out_g)
        self.bn_g = nn.BatchNorm2d(out_g) if out_g else None

    def forward(self, x: torch.Tensor | Branches) -> Branches:
        x_l, x_g = self.ffc(x if isinstance(x, tuple) else (x, None))
        if self.bn_g is not None:
            x_g = F.relu(self.bn_g(x_g))
        return F.relu(self.bn_l(x_l)), x_g


class FFCResnetBlock(nn.Module):
    """Two 3x3 FFC blocks with an identity shortcut on both branches."""

    def __init__(self, channels: int, global_ratio: float) -> None:
        super().__init__()
        self.conv1 = FFCBlock(channels, channels, 3, global_ratio, global_ratio, padding=1)
        self.conv2 = FFCBlock(channels, channels, 3, global_ratio, global_ratio, padding=1)

    def forward(self, x: Branches) -> Branches:
        y_l, y_g = self.conv2(self.conv1(x))
        return x[0] + y_l, _add(x[1], y_g)


class ConcatBranches(nn.Module):
    """Joins the local and global branches back into one tensor."""

    def forward(self, x: Branches) -> torch.Tensor:
        return x[0] if x[1] is None else torch.cat(x, dim=1)


class FFCResNetGenerator(nn.Module):
    """LaMa's generator: (B, input_nc, H, W) -> (B, output_nc, H, W) in [0, 1].

    H and W must be multiples of ``2 ** n_downsampling``. ``model`` indexes its
    layers like the official ``nn.Sequential`` so that state-dict keys match.
    """

    def __init__(self, config: LamaConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or LamaConfig()

        def width(mult: float) -> int:
            return min(cfg.max_features, int(cfg.ngf * mult))

        layers: list[nn.Module] = [nn.ReflectionPad2d(3), FFCBlock(cfg.input_nc, cfg.ngf, 7)]
        for i in range(cfg.n_downsampling):
            last = i == cfg.n_downsampling - 1
            ratio_gout = cfg.global_ratio if last else 0.0
            layers.append(FFCBlock(width(2**i), width(2 ** (i + 1)), 3, 0.0, ratio_gout, 2, 1))
        bottleneck = width(2**cfg.n_downsampling)
        layers += [FFCResnetBlock(bottleneck, cfg.global_ratio) for _ in range(cfg.n_blocks)]
        layers.append(ConcatBranches())
        for i in range(cfg.n_downsampling):
            mult = 2 ** (cfg.n_downsampling - i)
            layers += [
                nn.ConvTranspose2d(width(mult), width(mult / 2), 3, 2, 1, output_padding=1),
                nn.BatchNorm2d(width(mult / 2)),
                nn.ReLU(),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(cfg.ngf, cfg.output_nc, 7), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def init_weights_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill ``module``'s state dict with seeded random values, in place; return ``module``.

    Tensor number ``i`` in sorted key order draws from its own generator seeded
    with ``seed * 1_000_003 + i``: the result depends only on names and shapes,
    so any module with LaMa's state-dict layout (the official one included) gets
    the same weights. Conv weights are normal with the variance of PyTorch's
    default init (He-normal saturates Big-LaMa's 18 residual blocks); BatchNorm
    parameters and running statistics are perturbed around identity so that
    every path matters.
    """
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(module.state_dict().items())):
            if not t.is_floating_point():  # num_batches_tracked
                t.zero_()
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith("running_var"):
                value = 1.0 + 0.5 * torch.rand(t.shape, generator=g) - 0.25
            elif t.ndim >= 2:  # variance of PyTorch's default init, 1 / (3 fan_in)
                value = noise / math.sqrt(3 * t[0].numel())
            elif name.endswith("weight"):  # BatchNorm scale
                value = 1.0 + 0.1 * noise
            else:  # biases, BatchNorm shifts and running means
                value = 0.1 * noise
            t.copy_(value)
    return module


# --------------------------------------------------------------------------- inference form


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen BatchNorm as ``scale * x + shift`` per channel (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _scale_into(
    conv: nn.Conv2d | nn.ConvTranspose2d, scale: torch.Tensor, shift: torch.Tensor | None = None
) -> None:
    """Multiply ``conv``'s output channels by ``scale`` and add ``shift`` to its bias, in place."""
    w = conv.weight
    per_out = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
    conv.weight = nn.Parameter((w.double() * scale.view(per_out)).to(w.dtype), False)
    if shift is not None:
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.bias = nn.Parameter(bias.to(w.dtype), False)
    elif conv.bias is not None:
        conv.bias = nn.Parameter((conv.bias.double() * scale).to(w.dtype), False)


@torch.no_grad()
def fold_batchnorm(generator: FFCResNetGenerator) -> FFCResNetGenerator:
    """A frozen copy of ``generator`` with every BatchNorm folded into the linear layer before it.

    Frozen BatchNorm is an affine map per channel, and LaMa applies it right after
    linear paths (a convolution, a sum of two, a transposed convolution): scaling
    their weights and adding a bias computes the same function (float32 differences
    ~1e-7) with two fewer passes over each activation, forward and backward. The copy
    has no BatchNorm keys, so it is for inference only; ``generator`` is not changed.
    """
    import copy

    folded = copy.deepcopy(generator).eval().requires_grad_(False)
    for module in list(folded.modules()):
        for name, value in vars(module).items():  # hooks belong to the original modules
            if "hooks" in name and isinstance(value, dict):
                value.clear()
        if isinstance(module, FourierUnit):
            _scale_into(module.conv_layer, *_bn_affine(module.bn))
            module.bn = nn.Identity()
        elif isinstance(module, SpectralTransform):
            _scale_into(module.conv1[0], *_bn_affine(module.conv1[1]))
            module.conv1[1] = nn.Identity()
        elif isinstance(module, FFCBlock):
            ffc = module.ffc
            # the global branch's last linear layer is the spectral transform's 1x1 expand
            g2g = None if ffc.convg2g is None else ffc.convg2g.conv2
            for bn_name, paths in (
                ("bn_l", (ffc.convl2l, ffc.convg2l)),
                ("bn_g", (ffc.convl2g, g2g)),
            ):
                bn = getattr(module, bn_name)
                if bn is None:
                    continue
                scale, shift = _bn_affine(bn)
                for i, conv in enumerate(c for c in paths if c is not None):
                    _scale_into(conv, scale, shift if i == 0 else None)  # one bias per sum
                setattr(module, bn_name, nn.Identity())
    layers = folded.model
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.ConvTranspose2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
            _scale_into(layers[i], *_bn_affine(layers[i + 1]))
            layers[i + 1] = nn.Identity()
    return folded


# --------------------------------------------------------------------------- editor


class LamaEditor(Editor):
    """Frozen LaMa: fills the hole from ``cat([image * (1 - mask), mask])`` like the official trainer.

    Masks are used as given; the official predictor binarises them (``mask > 0``) first.
    ``generator`` keeps the official layout (state dict, weight files). Inference runs a
    copy with BatchNorm folded (:func:`fold_batchnorm`), rebuilt whenever the weights
    change, and on the CPU in channels-last layout (measured faster there; see
    ``benchmarks/README.md``). ``fast=False`` runs ``generator`` itself, hooks
    included. Weights that require gradients (training through the editor) always
    use ``generator``.
    """

    name = "lama"

    def __init__(self, generator: FFCResNetGenerator, *, fast: bool = True) -> None:
        super().__init__()
        self.generator = generator
        self.fast = fast
        # the official predictor pads to a multiple of 8 (configs/prediction/default.yaml)
        self.size_multiple = max(8, 2**generator.config.n_downsampling)
        self.requires_grad_(False)
        self.eval()
        self.__dict__["_folded"] = (None, None)  # (weights key, copy): not a submodule

    def train(self, mode: bool = True) -> LamaEditor:
        # frozen: BatchNorm must keep using the released running statistics
        return super().train(False)

    def inference_generator(self, device: torch.device) -> nn.Module:
        """The module :meth:`predict` runs: the folded copy, or ``generator`` (see class doc)."""
        tensors = [*self.generator.parameters(), *self.generator.buffers()]
        if not self.fast or any(t.requires_grad for t in tensors):
            return self.generator
        # in-place updates (optimiser steps, load_state_dict) bump _version; moves change data_ptr
        key = (device.type, *((t.data_ptr(), t._version) for t in tensors))
        cached_key, folded = self.__dict__["_folded"]
        if key != cached_key:
            folded = fold_batchnorm(self.generator)
            if device.type == "cpu":
                folded = folded.to(memory_format=torch.channels_last)
            self.__dict__["_folded"] = (key, folded)
        return folded

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.cat([image * (1 - mask), mask], dim=1)
        generator = self.inference_generator(x.device)
        if generator is not self.generator and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return generator(x).contiguous()


def load_lama(
    weights: str | Path | None,
    preset: str | LamaConfig = "big-lama",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> LamaEditor:
    """Build a :class:`LamaEditor` from a weight file (see :func:`read_lama_weights`).

    ``weights=None`` builds random weights (:func:`init_weights_`) and requires an
    explicit ``seed``; a path that does not exist raises ``FileNotFoundError``.
    ``weights`` may also be the unzipped ``big-lama`` folder.
    """
    config = _resolve_preset(preset)
    if weights is not None and seed is not None:
        raise ValueError("seed only applies to random weights (weights=None)")
    if weights is None and seed is None:
        raise ValueError("weights=None builds random weights: pass seed=... to ask for that")
    state = None if weights is None else read_lama_weights(weights, config)
    with torch.device("meta"):  # skip the default init: every tensor is overwritten below
        generator = FFCResNetGenerator(config)
    if state is None:
        init_weights_(generator.to_empty(device="cpu"), seed)
    else:
        generator.load_state_dict(state, strict=True, assign=True)
    return LamaEditor(generator).to(device=device, dtype=dtype)


def _resolve_preset(preset: str | LamaConfig) -> LamaConfig:
    if isinstance(preset, LamaConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown LaMa preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# --------------------------------------------------------------------------- weight files


def read_lama_weights(
    path: str | Path, preset: str | LamaConfig = "big-lama"
) -> dict[str, torch.Tensor]:
    """Return the generator state dict stored in ``path``, checked against ``preset``.

    The generator is found wherever it sits in the file (``generator.`` in the
    Lightning checkpoint, ``model.generator.`` in the TorchScript trace, no
    prefix in a plain state dict); other entries are ignored. Missing keys,
    unexpected keys and wrong shapes raise ``ValueError``.
    """
    path = _resolve_path(Path(path))
    tensors = _read_tensors(path)
    with torch.device("meta"):
        expected = FFCResNetGenerator(_resolve_preset(preset)).state_dict()
    return _select_generator(tensors, expected, path)


def convert_lama_weights(
    src: str | Path, dst: str | Path, preset: str | LamaConfig = "big-lama"
) -> Path:
    """Write the generator weights of ``src`` to the ``.safetensors`` file ``dst``."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"dst must end in .safetensors, got {dst}")
    state = read_lama_weights(src, preset)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    return dst
