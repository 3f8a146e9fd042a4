"""MAT (Li et al., CVPR 2022, github.com/fenglinglwb/MAT): the Mask-Aware Transformer editor.

The generator is the one of ``spandrel-extra-arches`` (pinned, optional extra:
``pip install -e '.[mat]'``), built so that it computes exactly what the official
``networks/mat.py`` computes (``tests/fixtures/mat_generator.json``):

- the decoder is built with noise inputs (the official default; spandrel's default
  drops them, so 22 ``noise_strength``/``noise_const`` entries of a real checkpoint
  would not load and the noise term would be lost);
- first-stage weights are made contiguous: spandrel's ``Conv2dLayerPartial`` passes
  ``trainable=True`` by position into ``Conv2dLayer``'s ``channels_last`` argument,
  and those channels-last weights change the outputs.

The editor makes the official call ``G(img, 1 - mask, z, c, truncation_psi=1,
noise_mode='const')`` at 512 x 512 with ``img`` in [-1, 1] and MAT's mask convention
(1 = known), ``z = torch.randn(1, 512)`` drawn after seed 240 as the official attack
code does::

    editor = load_mat("models/mat/Places_512_FullData_G.pth")
    edited = editor(image, mask)  # (B, 3, H, W) in [0, 1]

**Sizes.** MAT only runs at 512 x 512. Other sizes are resized (bilinear, antialiased,
differentiable) to 512 x 512 and the fill is resized back before compositing; the
hole is resized by area and every 512-px pixel it touches counts as hole. The
perturbation therefore reaches MAT through the same resampling: at 128 px one
perturbed pixel becomes a smooth 4 x 4 patch, and detail finer than the resampling
is lost; non-square images are stretched to a square and back.

**Dropout.** ``networks/mat.py`` calls ``F.dropout(..., training=True)`` twice (on the
first stage's bottleneck tokens and on the 16 x 16 encoder features), so MAT is random
even in eval mode. Each forward seeds its own draw (the global random state is left
as it was): ``dropout="official"`` (the default) takes a new draw every forward, as the
official attack did, from the sequence ``dropout_seed``, call 0, 1, 2, ...;
``dropout="fixed"`` takes the same draw every forward, which makes the editor a
deterministic function (gradient checks, a protection against one known draw). A draw
covers the whole batch, so an image's dropout masks depend on its place in the batch.

Accepted weight files (see :func:`read_mat_weights`): IOPaint's generator state dict
``Places_512_FullData_G.pth`` (``torch.load(weights_only=True)``; it may lack the
decoder's 22 noise entries, in which case the decoder is built without noise, as
IOPaint's is), the official StyleGAN-style pickles ``Places_512_FullData.pkl`` /
``CelebA-HQ_512.pkl`` (their tensors are read by a restricted unpickler; the Python
source they embed is never run) and ``.safetensors``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import io
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Editor, state_dict_problems

RESOLUTION = 512
Z_DIM = 512
#: the official attack scripts draw ``z = torch.randn(1, 512)`` after ``torch.manual_seed(240)``
Z_SEED = 240
SPANDREL_EXTRA_ARCHES_VERSION = "0.2.0"
INSTALL_HINT = "pip install -e '.[mat]'"
MAT_HELP = (
    "MAT weights: IOPaint's generator state dict Places_512_FullData_G.pth "
    "(https://github.com/Sanster/models/releases/download/add_mat/Places_512_FullData_G.pth, "
    "MD5 8ca927835fa3f5e21d65ffcb165377ed), the official pickles Places_512_FullData.pkl / "
    "CelebA-HQ_512.pkl (links in the README of github.com/fenglinglwb/MAT) or a .safetensors "
    "file written by convert_mat_weights"
)
DROPOUT_MODES = ("official", "fixed")


class MissingExtraError(ImportError, ValueError):
    """The optional ``mat`` extra is not installed (a ``ValueError`` so the CLI prints one line)."""


def _is_noise_key(name: str) -> bool:
    return name.endswith((".noise_strength", ".noise_const"))


# --------------------------------------------------------------------------- architecture


def _spandrel_mat_module():
    try:
        with warnings.catch_warnings():
            # the package's __init__ imports its other architectures; one uses torch.jit.script
            warnings.filterwarnings("ignore", r".*torch\.jit\.script", FutureWarning)
            module = importlib.import_module("spandrel_extra_arches.architectures.MAT.__arch.MAT")
    except ImportError as err:
        raise MissingExtraError(
            f"editor 'mat' needs the optional extra spandrel-extra-arches=="
            f"{SPANDREL_EXTRA_ARCHES_VERSION} ({err.name or err} is missing): {INSTALL_HINT}"
        ) from None
    installed = importlib.metadata.version("spandrel_extra_arches")
    if installed != SPANDREL_EXTRA_ARCHES_VERSION:  # the corrections target this version's code
        warnings.warn(
            f"spandrel-extra-arches {installed} is installed, but the MAT editor is checked "
            f"against {SPANDREL_EXTRA_ARCHES_VERSION} (tests/editors/test_mat.py): {INSTALL_HINT}",
            stacklevel=2,
        )
    return module


def build_generator(decoder_noise: bool = True, resolution: int = RESOLUTION) -> nn.Module:
    """MAT's generator for the official Places/CelebA-HQ 512 models, exact to ``networks/mat.py``.

    Weights are spandrel's random init: load a state dict or call :func:`init_weights_`.
    ``decoder_noise=False`` builds the decoder without noise inputs (IOPaint's variant);
    ``resolution=256`` the same design at 256 px (the CelebA-HQ-256 model; tests use it).
    """
    arch = _spandrel_mat_module()
    generator = arch.Generator(
        z_dim=Z_DIM,
        c_dim=0,
        w_dim=512,
        img_resolution=resolution,
        img_channels=3,
        synthesis_kwargs={"use_noise": decoder_noise},
    )
    with torch.no_grad():
        for p in generator.parameters():
            if not p.is_contiguous():  # the channels-last first-stage weights (see module doc)
                p.data = p.data.contiguous()
    return generator.eval().requires_grad_(False)


def init_weights_(module: nn.Module, seed: int = 0, noise_strength: float = 0.1) -> nn.Module:
    """Fill ``module``'s weights with seeded random values, in place; return ``module``.

    Tensor number ``i`` in sorted key order draws from its own generator seeded with
    ``seed * 1_000_003 + i``, so any module with MAT's state-dict layout (the official
    one included) gets the same values. Weights are standard normal (MAT's layers apply
    their fan-in gain at run time, as StyleGAN's do); style affines get biases around 1,
    other biases, noise strengths (``noise_strength`` ± 10 %) and the const noise are
    drawn too, so that every term matters. Constant buffers (resampling filters,
    attention masks) keep their built values.
    """
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(module.state_dict().items())):
            if name.endswith((".resample_filter", ".attn_mask")):
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if name.endswith(".noise_strength"):
                value = noise_strength * (1 + 0.1 * noise)
            elif name.endswith(".affine.bias"):
                value = 1 + 0.1 * noise
            elif name.endswith(".bias") or name.endswith("w_avg"):
                value = 0.1 * noise
            else:  # weights and the const noise maps
                value = noise
            t.copy_(value)
    return module


# --------------------------------------------------------------------------- editor


class MatEditor(Editor):
    """Frozen MAT: the official call at 512 x 512 (the generator's resolution), resized there
    and back (see module doc).

    ``z_seed`` fixes ``z`` (default: the official 240); ``dropout`` is ``"official"``
    (a new seeded draw every forward) or ``"fixed"`` (the draw of ``dropout_seed`` every
    forward). ``record`` says what the run used (recorded by the editor stage).
    """

    name = "mat"

    def __init__(
        self,
        generator: nn.Module,
        *,
        z_seed: int = Z_SEED,
        dropout: str = "official",
        dropout_seed: int = 0,
        source: str = "random",
    ) -> None:
        super().__init__()
        if dropout not in DROPOUT_MODES:
            raise ValueError(f"mat dropout must be one of {DROPOUT_MODES}, got {dropout!r}")
        self.generator = generator
        self.resolution = int(generator.img_resolution)
        z = torch.randn(1, Z_DIM, generator=torch.Generator().manual_seed(z_seed))
        self.register_buffer("z", z, persistent=False)
        self.dropout, self.dropout_seed = dropout, int(dropout_seed)
        self.draws = 0  # forwards taken in official mode
        self.decoder_noise = any(_is_noise_key(k) for k in generator.state_dict())
        self.record = {
            "weights_format": source,
            "decoder_noise": self.decoder_noise,
            "noise_mode": "const",
            "z_seed": z_seed,
            "dropout": dropout,
            "dropout_seed": self.dropout_seed,
            "resolution": self.resolution,
        }
        self.requires_grad_(False)
        self.eval()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # StyleGAN's resampling ops take their filters in float32 whatever the data's dtype
        for module in self.generator.modules():
            f = module._buffers.get("resample_filter")
            if f is not None and f.dtype != torch.float32:
                module._buffers["resample_filter"] = f.float()
        return self

    def train(self, mode: bool = True) -> MatEditor:
        return super().train(False)  # frozen; MAT's dropout does not depend on this flag anyway

    def next_dropout_seed(self) -> int:
        """The seed of the next forward's dropout draw (advances the official sequence)."""
        if self.dropout == "fixed":
            return self.dropout_seed
        seed = (self.dropout_seed * 1_000_003 + self.draws) % 2**63
        self.draws += 1
        return seed

    def generate(self, image: torch.Tensor, known: torch.Tensor, dropout_seed: int) -> torch.Tensor:
        """The official call on 512 x 512 inputs: ``image`` in [-1, 1], ``known`` 1 = keep."""
        if image.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"MAT generates at {self.resolution} px, got {tuple(image.shape[-2:])}"
            )
        b, device = image.shape[0], image.device
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            rng, devices = torch.cuda.default_generators[index], [index]
        else:
            rng, devices = torch.default_generator, []
        mapping = self.generator.mapping
        if any(p.dtype != torch.float32 for p in mapping.parameters()):
            # the official mapping casts z to float32 and so only runs in float32
            mapping = copy.deepcopy(mapping).float()
        # Generator.forward with truncation_psi=1: the mapping, then the synthesis
        ws = mapping(self.z.float().expand(b, -1), torch.zeros(b, 0, device=device))
        with torch.random.fork_rng(devices=devices):
            rng.manual_seed(dropout_seed)
            return self.generator.synthesis(image, known, ws.to(image.dtype), noise_mode="const")

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        size = tuple(image.shape[-2:])
        square = (self.resolution, self.resolution)
        if size != square:
            image = F.interpolate(image, square, mode="bilinear", antialias=True)
            mask = (F.interpolate(mask, square, mode="area") > 0).to(image.dtype)
        fill = self.generate(image * 2 - 1, 1 - mask, self.next_dropout_seed())
        fill = ((fill + 1) / 2).clamp(0, 1)
        if size != square:
            fill = F.interpolate(fill, size, mode="bilinear", antialias=True)
        return fill


def load_mat(
    weights: str | Path | None,
    *,
    seed: int | None = None,
    z_seed: int = Z_SEED,
    dropout: str = "official",
    dropout_seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MatEditor:
    """Build a :class:`MatEditor` from a weight file (see :func:`read_mat_weights`).

    ``weights=None`` builds random weights (:func:`init_weights_`) and requires an
    explicit ``seed``.
    """
    if weights is not None and seed is not None:
        raise ValueError("seed only applies to random weights (weights=None)")
    if weights is None and seed is None:
        raise ValueError("weights=None builds random weights: pass seed=... to ask for that")
    if weights is None:
        generator, source = init_weights_(build_generator(), seed), "random"
    else:
        state, source = read_mat_weights(weights)
        resolution = max(int(m.group(1)) for k in state if (m := _DEC_BLOCK.match(k)))
        generator = build_generator(any(_is_noise_key(k) for k in state), resolution)
        generator.load_state_dict(state, strict=True)
    editor = MatEditor(
        generator, z_seed=z_seed, dropout=dropout, dropout_seed=dropout_seed, source=source
    )
    return editor.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- weight files


def expected_state(
    decoder_noise: bool = True, resolution: int = RESOLUTION
) -> dict[str, torch.Size]:
    """Names and shapes of the generator's state dict (487 entries at 512 px with decoder noise)."""
    key = (decoder_noise, resolution)
    if key not in _EXPECTED:
        built = build_generator(decoder_noise, resolution).state_dict()
        _EXPECTED[key] = {k: v.shape for k, v in built.items()}
    return _EXPECTED[key]


_EXPECTED: dict[tuple[bool, int], dict[str, torch.Size]] = {}
_DEC_BLOCK = re.compile(r"^synthesis\.dec\.Dec_(\d+)x\1\.")


def read_mat_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(generator state dict, format)`` read from ``path``, checked against MAT.

    The resolution is that of the last decoder block (512 for the Places and CelebA-HQ
    512 models, 256 for CelebA-HQ 256). The state dict has all entries (487 at 512 px), or
    all but exactly the decoder's noise entries (``noise_strength``/``noise_const``, 22 at
    512 px; IOPaint's file); anything else raises ``ValueError``. A ``model.`` prefix
    (spandrel's wrapper) is dropped. Format: ``safetensors``, ``state-dict`` or
    ``stylegan-pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MAT weights not found at {path}. {MAT_HELP}")
    tensors, source = _read_tensors(path)
    if any(k.startswith("model.synthesis.") for k in tensors):
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    sizes = [int(m.group(1)) for k in tensors if (m := _DEC_BLOCK.match(k))]
    resolution = max(sizes, default=0)
    if resolution not in (256, 512):
        raise ValueError(
            f"{path} is not a MAT generator ({len(tensors)} tensors, no 256 or 512 px decoder "
            f"block synthesis.dec.Dec_NxN among keys such as {', '.join(list(tensors)[:3])})"
        )
    full = expected_state(True, resolution)
    missing = [k for k in full if k not in tensors]
    noise_free = bool(missing) and missing == [k for k in full if _is_noise_key(k)]
    expected = expected_state(False, resolution) if noise_free else full
    problems = state_dict_problems(tensors, expected, shown=4)
    if problems:
        raise ValueError(
            f"{path} is not a MAT {resolution} px generator ({len(tensors)} tensors): "
            + "; ".join(problems)
        )
    return {k: tensors[k] for k in expected}, source


def convert_mat_weights(src: str | Path, dst: str | Path) -> Path:
    """Write the generator weights of ``src`` to the ``.safetensors`` file ``dst``."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"dst must end in .safetensors, got {dst}")
    state, _ = read_mat_weights(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    return dst


# torch.save's legacy (pre-zip) format starts with this pickled magic number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), "safetensors"
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
        if zipfile.is_zipfile(path) or head == _LEGACY_TORCH_MAGIC:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise ValueError(f"holds a {type(obj).__name__}, not a state dict")
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, "state-dict"
        return _read_stylegan_pickle(path), "stylegan-pickle"
    except (ValueError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot read MAT weights ({reason}). {MAT_HELP}") from None


# --------------------------------------------------------------------------- StyleGAN-style pickles
#
# The official checkpoints are ``pickle.dump(dict(G=..., D=..., G_ema=..., ...))`` of
# modules decorated by ``torch_utils.persistence``: each such module is stored as a call
# ``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds the source of its Python
# module (which a normal unpickle executes) and the module's ``__dict__``. The reader
# below resolves every global to an inert stand-in instead: persistent objects and plain
# modules become dicts of their state, tensors are rebuilt from their bytes by
# ``torch.load(weights_only=True)``, and no code from the file is imported or run.


class _Inert:
    """Stands in for any class or function named by the pickle; keeps only its state."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


class _InertDict(dict):
    """Stands in for dict subclasses (``dnnlib.EasyDict``): items are set as for a dict."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def __setstate__(self, state: object) -> None:
        pass


def _persistent_obj(meta: object) -> _Inert:
    obj = _Inert()
    obj.state = meta.get("state") if isinstance(meta, dict) else None  # module_src is ignored
    return obj


def _storage_from_bytes(data: bytes) -> object:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, offset, size, stride, *args) -> torch.Tensor:
    if isinstance(storage, torch.storage.TypedStorage):  # what _load_from_bytes returns
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation
            storage = torch.tensor([], dtype=storage.dtype).set_(
                storage.untyped(), 0, (storage.size(),)
            )
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"tensor storage is a {type(storage).__name__}")
    return storage.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data, *args) -> torch.Tensor:
    return data


_STYLEGAN_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_obj,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("dnnlib.util", "EasyDict"): _InertDict,
}


class _StyleGanUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        return _STYLEGAN_GLOBALS.get((module, name), _Inert)

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} (not a StyleGAN pickle)")


def _module_tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict()`` of an unpickled module stand-in: parameters, persistent buffers, children."""
    state = getattr(obj, "state", None) if isinstance(obj, _Inert) else None
    if not isinstance(state, dict):
        return {}
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and name not in skip:
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        out.update(_module_tensors(child, f"{prefix}{name}."))
    return out


def _read_stylegan_pickle(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        data = _StyleGanUnpickler(f).load()
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a StyleGAN-style snapshot dict")
    for key in ("G_ema", "G"):  # the official scripts generate with G_ema
        if key in data:
            tensors = _module_tensors(data[key])
            if tensors:
                return tensors
    raise ValueError(f"no generator (G_ema or G) among the keys {sorted(map(str, data))[:6]}")
