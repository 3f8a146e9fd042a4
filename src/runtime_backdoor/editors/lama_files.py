"""LaMa weight files read without running their code: the generator's tensors, nothing else.

:func:`runtime_backdoor.editors.lama.read_lama_weights` reads its files through these:

- ``big-lama/models/best.ckpt`` from the authors' ``big-lama.zip``: a PyTorch Lightning 1.2
  checkpoint; its training metadata (omegaconf, Lightning callbacks) is replaced by inert
  placeholders, any other non-tensor global is refused;
- ``big-lama.pt``, the TorchScript trace of lama-cleaner / IOPaint: the archive's pickle is
  read for its tensors only (no TorchScript code is loaded or run);
- a plain state dict (``.pt``/``.pth``/``.ckpt``) or a ``.safetensors`` file.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

from .base import state_dict_problems

BIG_LAMA_HELP = (
    "Download Big-LaMa from the LaMa authors (README of github.com/advimman/lama: "
    "`curl -LJO https://huggingface.co/smartywu/big-lama/resolve/main/big-lama.zip`), "
    "unzip it and pass the path of big-lama/models/best.ckpt, for example "
    "models/big-lama/models/best.ckpt. The TorchScript export big-lama.pt used by "
    "lama-cleaner/IOPaint (github.com/Sanster/models/releases/download/add_big_lama/big-lama.pt) "
    "and a .safetensors file written by convert_lama_weights work too."
)


def _resolve_path(path: Path) -> Path:
    if path.is_dir():
        for candidate in (path / "models" / "best.ckpt", path / "best.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no models/best.ckpt in the folder {path}. {BIG_LAMA_HELP}")
    if not path.is_file():
        raise FileNotFoundError(f"LaMa weights not found at {path}. {BIG_LAMA_HELP}")
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if _is_torchscript(path):
        return _read_torchscript_tensors(path)
    obj = _load_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoint
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _select_generator(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    anchor = next(iter(expected))  # model.1.ffc.convl2l.weight: the first layer
    prefixes = sorted(k[: -len(anchor)] for k in tensors if k == anchor or k.endswith("." + anchor))
    if len(prefixes) != 1:
        found = f"several candidates {prefixes}" if prefixes else "none"
        sample = ", ".join(list(tensors)[:5])
        raise ValueError(
            f"{path}: cannot locate a LaMa generator (keys ending in {anchor!r}: {found}); "
            f"{len(tensors)} tensors, e.g. {sample}"
        )
    prefix = prefixes[0]
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    problems = state_dict_problems(state, {k: v.shape for k, v in expected.items()})
    if problems:
        raise ValueError(
            f"{path} (generator prefix {prefix!r}) does not match this LaMa configuration: "
            + "; ".join(problems)
            + ". Is the preset right (big-lama has 18 resnet blocks, lama-fourier 9)?"
        )
    return {k: state[k] for k in expected}


# Lightning checkpoints pickle their training configuration next to the weights:
# PyTorch Lightning 1.2 stores the omegaconf hyper-parameters (``hyper_parameters``,
# ``hparams_type``) and keys callback states by the callback class. These globals are
# read as inert placeholders; any other non-tensor global is refused.
_METADATA_MODULES = ("omegaconf", "pytorch_lightning", "lightning", "lightning_fabric")
_METADATA_GLOBALS = frozenset(
    {
        "typing.Any",
        "collections.defaultdict",
        "argparse.Namespace",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
    }
    | {f"builtins.{t}" for t in ("dict", "list", "tuple", "int", "float", "str", "bool", "object")}
)


class _Discarded:
    """Stands in for a metadata object of a checkpoint; its code never runs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def _discarded_mapping(*args: object, **kwargs: object) -> dict:
    # defaultdict items are set on the result, which must be a plain dict
    return {}


def _is_metadata_global(name: str) -> bool:
    return name in _METADATA_GLOBALS or name.split(".", 1)[0] in _METADATA_MODULES


def _load_checkpoint(path: Path) -> object:
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:
        unsafe = []  # legacy (pre-zip) format: weights_only alone decides
    refused = sorted(g for g in unsafe if not _is_metadata_global(g))
    if refused:
        raise pickle.UnpicklingError(
            f"refusing to unpickle {path}: it references {refused}, which are neither tensors "
            "nor training metadata. Convert it to .safetensors in an environment you trust."
        )
    placeholders = [
        (_discarded_mapping if g == "collections.defaultdict" else _Discarded, g) for g in unsafe
    ]
    with torch.serialization.safe_globals(placeholders):
        return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- TorchScript archives


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """A module or object of a TorchScript archive: just its attribute dict."""

    def __setstate__(self, state: object) -> None:
        self.state = state


def _identity(value: object, *args: object) -> object:
    return value


class _ScriptUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` of a TorchScript archive: objects, tensors, nothing executable."""

    def __init__(self, archive: zipfile.ZipFile, root: str, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.root = archive, root
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and (
            name.startswith("build_") or name == "restore_type_tag"
        ):
            return _identity  # typed-container markers: the value is already built
        raise pickle.UnpicklingError(f"TorchScript archive references {module}.{name}: refused")

    def persistent_load(self, pid: object) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.root}/data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise pickle.UnpicklingError(
                    f"storage {key}: {flat.numel()} elements, expected {numel}"
                )
            self.storages[key] = flat
        return self.storages[key]


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *args: object
) -> torch.Tensor:
    return storage.as_strided(size, stride, offset).clone()


def _read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_pkl = next(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
        root = data_pkl.split("/")[0]
        byteorder = f"{root}/byteorder"
        if byteorder in names and archive.read(byteorder).strip() != b"little":
            raise ValueError(f"{path}: big-endian TorchScript archives are not supported")
        obj = _ScriptUnpickler(archive, root, archive.read(data_pkl)).load()
    return dict(_walk(obj, ""))


def _walk(obj: object, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    state = obj.state if isinstance(obj, _ScriptObject) else None
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject):
            yield from _walk(value, f"{prefix}{name}.")
