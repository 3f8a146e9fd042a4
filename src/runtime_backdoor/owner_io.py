"""What the owner's commands read and write, each failure one line naming its file or option.

Editors and their weights (:func:`load_editor`: an unknown name, missing or mismatched weights,
a checkpoint that restricted unpickling refuses), images and masks (:func:`read_inputs`:
refused from their header above :data:`DEFAULT_MAX_PIXELS` before anything is decoded; sizes,
unreadable or corrupt files) and outputs (:func:`write_output`: atomic, never over an existing
file without ``--overwrite``). :mod:`runtime_backdoor.owner` re-exports every name; no stage
imports either.
"""

from __future__ import annotations

import threading
from pathlib import Path

#: images above this many pixels are refused from their header, before decoding
#: (``--max-pixels`` raises it): a 40-megapixel RGB image is 480 MB as float32.
DEFAULT_MAX_PIXELS = 40_000_000


class CliError(Exception):
    """A user error, said in one line naming the option or file (exit status 2 on the
    command line, a line on the demo page)."""


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error's message on one line, at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def device_from_option(name: str):
    """The device ``--device NAME`` asks for (:func:`runtime_backdoor.project.resolve_device`),
    its refusal said as one line naming ``--device``."""
    from .project import resolve_device

    try:
        return resolve_device(name)
    except ValueError as err:
        raise CliError(f"--{err}") from None


# Torch's message for a file that restricted unpickling cannot read ends in advice to
# unpickle it without restriction; for a file from the internet that advice is wrong.
_UNSAFE_ADVICE = ("weights_only", "Weights only load failed", "trust the source")


def weights_reason(err: BaseException, path=None) -> str:
    """Why a weight file did not load, in words that say what to do about it."""
    text = one_line(err, limit=10_000)
    if any(marker in text for marker in _UNSAFE_ADVICE):
        return "it is corrupt, truncated or not a PyTorch checkpoint; download it again"
    if "refusing to unpickle" in text:  # code in the file: it stays unread, whatever the source
        return text.split(". ")[0] + "; use weights from the model's official source"
    if path is not None and str(path) not in text:  # a reader's own words: say what they mean
        detail = text.split(". ")[0][:200]
        return f"it is corrupt, truncated or in another format ({detail}); download it again"
    return one_line(err).removeprefix(f"{path}: ")


def _weights_hint(name: str) -> str:
    """What to pass as ``--weights`` for ``name``, and where ``weights fetch`` puts it."""
    from .editors import EDITORS
    from .weights import weight_paths

    hint = EDITORS[name].description
    if name == "lama":
        from .editors.lama import BIG_LAMA_HELP

        hint = BIG_LAMA_HELP
    fetched = [(key, path) for key, path in weight_paths(name) if key]
    if fetched:
        key, path = fetched[0]
        hint += f" (`runtime-backdoor weights fetch {key}` puts them in {path})"
    return hint


def _sidecar_problem(weights: Path) -> str | None:
    """What is wrong with the miniature's JSON sidecar (its ``LamaConfig``), naming it; None
    when the sidecar describes a generator (then the weight file itself is at fault)."""
    import json

    sidecar = weights.with_suffix(".json")
    if not sidecar.is_file():
        return None  # the loader's own message names it
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"its config sidecar {sidecar} is not valid JSON ({one_line(err)})"
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        return f"its config sidecar {sidecar} has no 'config' object (the miniature's LamaConfig)"
    try:
        from .editors.lama import FFCResNetGenerator, LamaConfig

        generator = FFCResNetGenerator(LamaConfig(**config))
    except Exception as err:
        return f"the 'config' of its sidecar {sidecar} does not describe a LaMa generator ({one_line(err, 200)})"
    try:
        from safetensors.torch import load_file

        generator.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except RuntimeError as err:
        if "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err):
            return (
                f"its weights do not match the config in its sidecar {sidecar} "
                f"({one_line(err, 160)}); both must come from the same training run"
            )
    except Exception:
        return None
    return None


def load_editor(name: str, weights: Path | None, device):
    """The editor registered as ``name``; every failure is a one-line :class:`CliError`."""
    from .editors import EDITORS, build_editor

    if name not in EDITORS:
        raise CliError(f"--editor: unknown editor {name!r}; known editors: {', '.join(EDITORS)}")
    if EDITORS[name].needs_weights and weights is None:
        raise CliError(f"--editor {name} needs --weights: {_weights_hint(name)}")
    if not EDITORS[name].needs_weights and weights is not None:
        raise CliError(f"--weights {weights}: editor {name} has no weights; drop --weights")
    try:
        return build_editor(name, weights=weights, device=device)
    except (FileNotFoundError, NotImplementedError) as err:
        raise CliError(one_line(err)) from err
    except Exception as err:  # a weight file of any format that does not load
        if weights is None:
            raise CliError(f"--editor {name}: {one_line(err)}") from err
        if name == "mini-lama":
            problem = _sidecar_problem(Path(weights))
            if problem is not None:
                raise CliError(f"--weights {weights}: cannot load mini-lama: {problem}") from err
        raise CliError(
            f"--weights {weights}: cannot load {name} weights: {weights_reason(err, weights)}"
        ) from err


_HEADER_LOCK = threading.Lock()


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding the pixels; None when the
    file is missing or unreadable (the reader then says what is wrong with it)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return None
    # Pillow's own decompression-bomb check would raise at open for the largest images
    # before their size can be read; the header alone is tiny, whatever it declares.
    with _HEADER_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(path) as im:
                return im.size
        except Exception:
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def check_pixels(path: Path, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels, before decoding."""
    size = image_size(path)
    if size is None or max_pixels is None:
        return
    w, h = size
    if w * h > max_pixels:
        raise CliError(
            f"{what} {path} is {w}×{h} px ({w * h / 1e6:.1f} megapixels): too large, the limit "
            f"is {max_pixels / 1e6:g} megapixels; resize it, or raise the limit with --max-pixels"
        )


def _read(path: Path, what: str, read, **kwargs):
    """Read an image or mask; every failure names the file."""
    from PIL import Image

    if path.is_dir():
        raise CliError(f"{what} {path} is a folder; expected a PNG or JPEG file")
    try:
        return read(path, **kwargs)
    except Image.DecompressionBombError as err:
        raise CliError(
            f"{what} {path} is too large to read safely ({one_line(err)}); resize it first"
        ) from err
    except MemoryError as err:
        raise CliError(f"{what} {path} is too large for this machine's memory") from err


def read_inputs(
    image_path: Path,
    mask_path: Path,
    threshold: float = 0.5,
    target="solid",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
):
    """Image (1, 3, H, W), mask (1, 1, H, W) on the CPU and the target, validated.

    Files whose header declares more than ``max_pixels`` pixels are refused before decoding.
    """
    for path, what in ((image_path, "image"), (mask_path, "mask")):
        check_pixels(Path(path), what, max_pixels)
    if target not in ("solid", "anti"):
        check_pixels(Path(target), "--target image", max_pixels)

    import torch

    from .data import read_image, read_mask

    image = _read(Path(image_path), "image", read_image)
    mask = _read(Path(mask_path), "mask", read_mask, threshold=threshold)
    if mask.shape != image.shape[:2]:
        raise CliError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]} (width x height): they must match"
        )
    if target not in ("solid", "anti"):
        t = _read(Path(target), "--target image", read_image)
        if t.shape != image.shape:
            raise CliError(
                f"--target image {target} is {t.shape[1]}x{t.shape[0]}, image is {image.shape[1]}x{image.shape[0]}"
            )
        target = torch.from_numpy(t).permute(2, 0, 1)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    m = torch.from_numpy(mask.astype("float32"))[None, None]
    return x, m, target


def write_output(path: Path, array, overwrite: bool) -> None:
    """Write a PNG atomically; failures are one-line :class:`CliError` naming ``--out``."""
    from .data import write_png

    try:
        write_png(path, array, overwrite=overwrite)
    except FileExistsError:
        raise CliError(f"--out {path} exists; pass --overwrite to replace it") from None
    except OSError as err:
        reason = err.strerror or one_line(err)
        raise CliError(f"--out {path}: cannot write it ({reason})") from err
