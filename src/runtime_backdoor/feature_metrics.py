"""Metrics on the features of pretrained networks: CLIP-FID and LPIPS.

CLIP-FID is the Fréchet distance between open_clip ViT-B/32 image features. It needs pretrained
weights, which this machine cannot download: ``load_clip`` raises ``ClipUnavailable`` (with the
reason and where to put the file) instead of ever falling back to random weights. LPIPS reads
its ImageNet backbone from a local file the same way (``LpipsUnavailable``).

Images are taken as :mod:`runtime_backdoor.metrics` takes them (:mod:`runtime_backdoor.image_inputs`);
every name here is also importable from :mod:`runtime_backdoor.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .image_inputs import _as_hwc

__all__ = [
    "CLIP_WEIGHTS_ENV",
    "DEFAULT_CLIP_DIR",
    "LPIPS_BACKBONES",
    "ClipFeatures",
    "ClipUnavailable",
    "FID",
    "clip_features",
    "clip_fid",
    "feature_stats",
    "fid_from_features",
    "frechet_distance",
    "load_clip",
    "load_lpips",
    "lpips_batch",
    "lpips_distance",
    "LpipsUnavailable",
    "try_load_clip",
]

PROJ_ROOT = Path(__file__).resolve().parents[2]
CLIP_WEIGHTS_ENV = "RUNTIME_BACKDOOR_CLIP_WEIGHTS"
# models/clip/<model_name>/ holds the weights file as named on the Hugging Face hub.
DEFAULT_CLIP_DIR = PROJ_ROOT / "models" / "clip"
_CLIP_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_DEFAULT_TAG = "openai"
#: clean-fid's ``clip_vit_b_32`` network: OpenAI's ViT-B/32, whose MLPs use QuickGELU; open_clip
#: names that architecture ``ViT-B-32-quickgelu`` (its ``openai`` tag is the same weights)
CLIP_MODEL = "ViT-B-32-quickgelu"
_CLIP_HUB = "timm/vit_base_patch32_clip_224.openai"


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample covariance (ddof = 1) of an ``N x D`` feature matrix, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected an N x D feature matrix with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``). This equals the
    usual ``scipy.linalg.sqrtm(S1 @ S2).real`` form but needs no eps on the diagonal and no
    imaginary-part clean-up when the covariances are singular (N <= D samples). Rounding
    negatives are clipped to 0.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(v, np.float64)) for v in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(v, np.float64)) for v in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}"
        )
    r1 = _psd_sqrt(s1)
    ev = np.linalg.eigvalsh(r1 @ ((s2 + s2.T) / 2) @ r1)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def fid_from_features(features_a, features_b) -> float:
    """Fréchet distance between the Gaussians fitted to two ``N x D`` feature sets."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# ---------------------------------------------------------------------------------------------
# CLIP features


class ClipUnavailable(RuntimeError):
    """CLIP weights cannot be loaded; the message says why and where to put the file."""


def _place_hint(model_name: str) -> str:
    return (
        f"put the open_clip weights of {model_name} at {DEFAULT_CLIP_DIR / model_name / _CLIP_FILENAMES[0]} "
        f"(`runtime-backdoor weights fetch clip-vit-b-32`: the file '{_CLIP_FILENAMES[1]}' of "
        f"huggingface.co/{_CLIP_HUB}), "
        f"or set {CLIP_WEIGHTS_ENV} / pass weights= to a local .safetensors/.bin/.pt state dict"
    )


def _open_clip():
    """open_clip, or ClipUnavailable on a machine without it (CLIP-FID is then skipped)."""
    try:
        import open_clip
    except ImportError as e:
        raise ClipUnavailable(
            f"open_clip is not installed ({e}); pip install open_clip_torch"
        ) from e
    return open_clip


def _cached_hub_file(model_name: str, tag: str) -> tuple[Path, bool]:
    """Local file of an open_clip pretrained tag in the Hugging Face cache, and its quick_gelu."""
    open_clip = _open_clip()

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ClipUnavailable(f"'{tag}' is not a pretrained tag of {model_name} (known: {tags})")
    repo = cfg.get("hf_hub", "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for fname in _CLIP_FILENAMES:
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit), bool(cfg.get("quick_gelu", False))
    raise ClipUnavailable(
        f"{model_name} '{tag}' is not in the local Hugging Face cache "
        f"(repo '{repo or 'none'}', files {_CLIP_FILENAMES}); no download is attempted"
    )


def _build_from_file(model_name: str, path: Path, quick_gelu: bool):
    open_clip = _open_clip()

    if not path.is_file():
        raise ClipUnavailable(
            f"weights file not found: {path}; save the open_clip weights of {model_name} there "
            f"(`runtime-backdoor weights fetch clip-vit-b-32`: the file '{_CLIP_FILENAMES[1]}' of "
            f"huggingface.co/{_CLIP_HUB})"
        )
    if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
        raise ClipUnavailable(f"{path}: expected a .safetensors, .bin, .pt or .pth state dict")
    try:
        # open_clip reads .safetensors with safetensors and anything else with
        # torch.load(weights_only=True): no code in the file is executed.
        model = open_clip.create_model(
            model_name,
            pretrained=str(path),
            force_quick_gelu=quick_gelu,
            require_pretrained=True,
            weights_only=True,
        )
    except Exception as e:  # noqa: BLE001 - any failure means "unavailable", with its reason
        raise ClipUnavailable(
            f"cannot load {model_name} weights from {path}: {type(e).__name__}: {e}"
        ) from e
    return model


def load_clip(
    weights: str | os.PathLike | None = None, model_name: str = CLIP_MODEL, device="cpu"
) -> ClipFeatures:
    """Load a pretrained open_clip image encoder as a ``ClipFeatures`` module (eval mode).

    ``weights``: a local state-dict file (``.safetensors``, or ``.bin``/``.pt``/``.pth`` read
    with ``torch.load(weights_only=True)``; TorchScript archives such as OpenAI's original
    ``ViT-B-32.pt`` are refused), or an open_clip pretrained tag (``openai``, ...) found in the
    local Hugging Face cache. ``None`` tries, in order, the ``RUNTIME_BACKDOOR_CLIP_WEIGHTS``
    environment variable, ``models/clip/<model_name>/`` in the project
    (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``) and the cached
    ``openai`` tag. The default, :data:`CLIP_MODEL` with OpenAI's weights, is the network of
    clean-fid's ``clip_vit_b_32`` (the paper's CLIP-FID); other weights (e.g. LAION's, with
    ``model_name="ViT-B-32"``) give a different metric.

    Raises ``ClipUnavailable`` (never returns random weights) with the reason and the place
    to put the file.
    """
    if weights is None:
        env = os.environ.get(CLIP_WEIGHTS_ENV)
        if env:
            return load_clip(env, model_name, device)
        reasons = []
        for fname in _CLIP_FILENAMES:
            p = DEFAULT_CLIP_DIR / model_name / fname
            if p.is_file():
                return load_clip(p, model_name, device)
        reasons.append(f"no file in {DEFAULT_CLIP_DIR / model_name}")
        try:
            return load_clip(_DEFAULT_TAG, model_name, device)
        except ClipUnavailable as e:
            reasons.append(str(e))
        raise ClipUnavailable(
            f"no pretrained {model_name} weights: {'; '.join(reasons)}; {_place_hint(model_name)}"
        )

    w = str(weights)
    is_path = (
        isinstance(weights, os.PathLike) or os.sep in w or Path(w).suffix != "" or Path(w).exists()
    )
    if is_path:
        path, quick_gelu, source = Path(w).expanduser(), False, w
    else:
        path, quick_gelu = _cached_hub_file(model_name, w)
        source = f"{w} ({path})"
    model = _build_from_file(model_name, path, quick_gelu)
    return ClipFeatures(model, model_name=model_name, weights=source).to(device)


def try_load_clip(weights=None, model_name: str = CLIP_MODEL, device="cpu"):
    """``(ClipFeatures, None)`` or ``(None, reason)``: for callers that record CLIP-FID as unavailable."""
    try:
        return load_clip(weights, model_name, device), None
    except ClipUnavailable as e:
        return None, str(e)


class ClipFeatures(torch.nn.Module):
    """CLIP image features exactly as clean-fid's ``clip_vit_b_32`` mode computes them.

    ``forward(x)``: ``B x 3 x H x W`` float in [0, 1] -> ``B x D`` float32, unnormalised
    ``encode_image`` features. :meth:`preprocess` is clean-fid's
    (``cleanfid/clip_features.py::img_preprocess_clip`` and its ``CLIP_fx``): the image as
    8-bit RGB through PIL, torchvision's ``Resize(224, BICUBIC)`` (short side; PIL's
    antialiased bicubic) and ``CenterCrop(224)``, kept as uint8, then divided by 255 and
    normalised with CLIP's mean/std. The input is rounded to 8 bits first, as every image the
    study evaluates is an 8-bit PNG (so the rounding loses nothing there). clean-fid loads
    OpenAI's ViT-B/32 with the ``clip`` package; open_clip's ``ViT-B-32`` with the ``openai``
    tag is the same network and weights. Not differentiable (a metric, not a loss).
    """

    def __init__(self, model, model_name: str = "ViT-B-32", weights: str = "unknown"):
        super().__init__()
        self.model = model.eval()
        self.model_name = model_name
        self.weights = weights
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def resize_uint8(self, image: np.ndarray) -> np.ndarray:
        """``H x W x 3`` uint8 -> ``S x S x 3`` uint8: short side to S (bicubic), centre crop."""
        from PIL import Image
        from torchvision import transforms

        s = self.input_size
        resize = transforms.Compose(
            [
                transforms.Resize(s, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(s),
            ]
        )
        out = resize(Image.fromarray(image.astype(np.uint8)).convert("RGB"))
        return np.asarray(out).clip(0, 255).astype(np.uint8)

    def preprocess(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(x.shape)}")
        eight_bit = torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8)
        resized = [self.resize_uint8(img.permute(1, 2, 0).cpu().numpy()) for img in eight_bit]
        t = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().to(self.mean.device)
        return (t / 255.0 - self.mean) / self.std

    def forward(self, x):
        return self.model.encode_image(self.preprocess(x)).float()


def clip_features(images, model: ClipFeatures, batch_size: int = 16) -> np.ndarray:
    """``N x D`` float64 features of a sequence of images (``H x W x 3`` arrays or torch
    ``3 x H x W`` tensors, sizes may differ) or of an ``N x H x W x 3`` array."""
    items = list(images)
    if not items:
        raise ValueError("no images")
    device = next(model.buffers()).device
    prepped = []
    for i, im in enumerate(items):
        a = _as_hwc(im, f"image {i}")
        t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float()[None]
        prepped.append(t)
    out = []
    with torch.no_grad():
        for start in range(0, len(prepped), batch_size):
            chunk = prepped[start : start + batch_size]
            # Resize one by one (sizes may differ), then encode as a batch.
            x = torch.cat([model.preprocess(t.to(device)) for t in chunk])
            out.append(model.model.encode_image(x).float().cpu())
    return torch.cat(out).double().numpy()


@dataclass(frozen=True)
class FID:
    """A Fréchet distance with what is needed to read it.

    With ``n <= dim`` the covariances are singular (rank ``n - 1``) and FID is biased upwards;
    only compare values computed with the same ``n``.
    """

    value: float
    n_a: int
    n_b: int
    dim: int
    features: str

    @property
    def rank_deficient(self) -> bool:
        return min(self.n_a, self.n_b) <= self.dim

    def __float__(self) -> float:
        return float(self.value)


def clip_fid(
    images_a: Sequence, images_b: Sequence, model: ClipFeatures | None = None, batch_size: int = 16
) -> FID:
    """CLIP-FID: Fréchet distance between CLIP image features of two image sets (N >= 2 each).

    ``model=None`` loads the default pretrained weights (``load_clip()``), raising
    ``ClipUnavailable`` when there are none.
    """
    if model is None:
        model = load_clip()
    fa = clip_features(images_a, model, batch_size)
    fb = clip_features(images_b, model, batch_size)
    if len(fa) < 2 or len(fb) < 2:
        raise ValueError(f"CLIP-FID needs at least 2 images per set, got {len(fa)} and {len(fb)}")
    return FID(
        value=fid_from_features(fa, fb),
        n_a=len(fa),
        n_b=len(fb),
        dim=fa.shape[1],
        features=f"open_clip {model.model_name} ({model.weights})",
    )


# ---------------------------------------------------------------------------------------------
# LPIPS (the ``lpips`` package: its calibrated linear layers ship with it; the ImageNet
# backbone is torchvision's, which is fetched and checked like every other weight file)

#: backbone -> (registry entry of ``runtime-backdoor weights``, file under models/lpips/)
LPIPS_BACKBONES = {
    "alex": ("lpips-alex", "alexnet-owt-7be5be79.pth"),
    "vgg": ("lpips-vgg", "vgg16-397923af.pth"),
}


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot be computed; the message says why and the command that fetches the weights."""


def load_lpips(net: str = "alex", backbone: str | os.PathLike | None = None, device="cpu"):
    """The ``lpips`` package's LPIPS v0.1 (``net`` alex or vgg) with its ImageNet backbone read
    from ``backbone`` (torchvision's state dict; default ``models/lpips/<torchvision file>``)
    with ``torch.load(weights_only=True)``. Raises ``LpipsUnavailable`` when the file is
    missing or unreadable — never LPIPS on a random backbone."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"lpips net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    entry, fname = LPIPS_BACKBONES[net]
    path = Path(backbone) if backbone else PROJ_ROOT / "models" / "lpips" / fname
    if not path.is_file():
        raise LpipsUnavailable(
            f"no LPIPS {net} backbone at {path} (`runtime-backdoor weights fetch {entry}`)"
        )
    try:
        import lpips
        import torchvision
    except ImportError as e:
        raise LpipsUnavailable(f"the lpips package is not installed ({e})") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        reference = getattr(torchvision.models, "alexnet" if net == "alex" else "vgg16")(
            weights=None
        )
        reference.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - any failure: unavailable, with its reason
        raise LpipsUnavailable(
            f"{path}: not a torchvision {net} state dict ({type(e).__name__}: {str(e)[:120]}); "
            f"`runtime-backdoor weights fetch {entry}`"
        ) from e
    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    # The package slices torchvision's ``features`` into net.slice1..5, keeping each layer's
    # index as its name: copy the backbone layer by layer.
    for k in range(1, model.net.N_slices + 1):
        for name, layer in getattr(model.net, f"slice{k}").named_children():
            layer.load_state_dict(reference.features[int(name)].state_dict())
    model = model.eval().to(device)
    model.requires_grad_(False)
    model.backbone_file = str(path)
    return model


def lpips_distance(a, b, model, mask=None) -> float:
    """LPIPS between two ``H x W x 3`` images in [0, 1] (the package expects [-1, 1]).
    ``mask``: the mean of the spatial LPIPS map over the pixels where it is true."""
    device = next(model.parameters()).device

    def prep(x):
        t = torch.from_numpy(np.ascontiguousarray(_as_hwc(x, "image").transpose(2, 0, 1)))
        return t.float()[None].to(device) * 2 - 1

    with torch.no_grad():
        if mask is None:
            return float(model(prep(a), prep(b)))
        model.spatial = True
        try:
            d = model(prep(a), prep(b))[0, 0].cpu().numpy()
        finally:
            model.spatial = False
        m = np.asarray(mask, dtype=bool)
        return float(d[m].mean()) if m.any() else float("nan")


def lpips_batch(a: torch.Tensor, b: torch.Tensor, model, mask=None) -> torch.Tensor:
    """(B,) LPIPS between two (B, 3, H, W) batches in [0, 1], as :func:`lpips_distance` gives
    image by image; ``mask`` (B, 1, H, W): the spatial map's mean over its pixels (NaN where
    a mask is empty)."""
    device = next(model.parameters()).device
    a, b = a.to(device).float() * 2 - 1, b.to(device).float() * 2 - 1
    with torch.no_grad():
        if mask is None:
            return model(a, b).flatten().cpu()
        model.spatial = True
        try:
            d = model(a, b)[:, 0].cpu()
        finally:
            model.spatial = False
    m = mask[:, 0].cpu() > 0.5
    total = (d * m).flatten(1).sum(1)
    count = m.flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.tensor(float("nan")))
