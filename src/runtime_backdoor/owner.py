"""What an image owner does: read an image and its mask, load an editor, check, protect, edit.

``runtime-backdoor check``, ``protect`` and ``edit`` (:mod:`runtime_backdoor.cli`) and the
browser demo (:mod:`runtime_backdoor.demo`) both call these functions: one code path, so the
demo's download is, byte for byte, what ``protect`` writes for the same files, settings and
seed. Every failure is a one-line :class:`CliError` naming the file or the option at fault.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_EPS = 0.025  # the paper's 6.4/255
COMPARE_GAP = 4  # px of white between the panels of an edit's comparison


class CliError(Exception):
    """A user error, said in one line naming the option or file (exit status 2 on the
    command line, a line on the demo page)."""


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error's message on one line, at most ``limit`` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_eps(text) -> float:
    """ε as a fraction of the pixel range; values above 1 are 8-bit units (6.4 -> 6.4/255).

    Raises ``ValueError`` ("eps must be ...") outside (0, 64/255].
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number, got {text!r}") from None
    if value > 1:  # accept 8-bit units such as 6.4 for convenience
        value = value / 255
    if not 0 < value <= 64 / 255:  # also rejects NaN
        raise ValueError(f"eps must be in (0, 0.25] (or (0, 64] in 8-bit units), got {text}")
    return value


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
    from .editors import EDITORS, weight_paths

    hint = EDITORS[name].description
    if name == "lama":
        from .editors.lama import BIG_LAMA_HELP

        hint = BIG_LAMA_HELP
    fetched = [(key, path) for key, path in weight_paths(name) if key]
    if fetched:
        key, path = fetched[0]
        hint += f" (`runtime-backdoor weights fetch {key}` puts them in {path})"
    return hint


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
        raise CliError(
            f"--weights {weights}: cannot load {name} weights: {weights_reason(err, weights)}"
        ) from err


def check_options(expand: int, threshold: float, target: str) -> None:
    """The options :func:`read_inputs` and :func:`protect_image` take, checked before any work."""
    if expand % 2 == 0:
        raise CliError(f"--expand must be odd, got {expand}")
    if not 0 < threshold <= 1:
        raise CliError(f"--threshold must be in (0, 1], got {threshold}")
    if target not in ("solid", "anti") and not Path(target).is_file():
        raise CliError(
            f"--target: {target!r} is neither 'solid', 'anti' nor an existing image file"
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


def read_inputs(image_path: Path, mask_path: Path, threshold: float = 0.5, target="solid"):
    """Image (1, 3, H, W), mask (1, 1, H, W) on the CPU and the target, validated."""
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


def eight_bit(t):
    """(1, 3, H, W) or (3, H, W) tensor -> H x W x 3 array on the 8-bit grid, as written."""
    import numpy as np

    a = t.detach().float().cpu().reshape(3, *t.shape[-2:]).permute(1, 2, 0).numpy()
    return np.round(np.clip(a, 0, 1) * 255) / 255


def check_image(editor, x, m, target, device, *, eps) -> dict:
    """The first-order estimate of whether protection can work: gain against gain needed."""
    from .implant import sensitivity

    s = sensitivity(editor, x.to(device), m.to(device), eps=eps, target=target)
    gain, needed = float(s.gain[0]), float(s.needed[0])
    verdict = (
        "likely protectable at this eps (first-order estimate)"
        if gain >= needed
        else "unlikely: the editor is not sensitive enough at this eps; protection will probably not trigger"
    )
    return {"eps": eps, "gain": round(gain, 3), "needed": round(needed, 3), "verdict": verdict}


def protect_image(
    editor, x, m, target, device, *, eps, steps, expand, seed, progress=False
) -> tuple[dict, object]:
    """Protect ``x`` (1, 3, H, W) in the region ``m``: a report and the H x W x 3 result.

    The result is on the 8-bit grid, as :func:`write_output` writes it.
    """
    from .implant import implant

    result = implant(
        editor,
        x.to(device),
        m.to(device),
        eps=eps,
        steps=steps,
        expand_kernel=expand,
        target=target,
        seed=seed,
        progress=progress,
    )
    losses = {k: float(v[-1, 0]) for k, v in result.losses.items() if len(v)}
    report = {
        "eps": eps,
        "steps": steps,
        "max_change_8bit": round((result.delta.abs().max() * 255).item(), 3),
        "seconds": round(result.seconds, 3),
        "final_losses": losses,
    }
    return report, eight_bit(result.protected[0])


def edit_image(editor, x, m, target, device, original=None):
    """The edit of ``x``; with ``original``: metrics against the original's edit and a panel.

    Returns ``(report, edited, panel)``: H x W x 3 arrays on the 8-bit grid (``panel`` is
    None without ``original``). ``target`` is the protection's, computed from ``original``.
    """
    import numpy as np
    import torch

    from . import metrics as Q
    from .targets import make_target

    with torch.no_grad():
        edited = eight_bit(editor(x.to(device), m.to(device)))
    report = {}
    if original is None:
        return report, edited, None
    with torch.no_grad():
        clean = eight_bit(editor(original.to(device), m.to(device)))
    region = m[0, 0].numpy() > 0.5
    # The target the protection was made for: computed from the original, as protect does.
    phi = eight_bit(make_target(original, target))
    report |= {
        "hit_fraction": round(Q.target_hit_fraction(edited, phi, region), 4),
        "hit_fraction_original": round(Q.target_hit_fraction(clean, phi, region), 4),
        "psnr_region_vs_original_edit": round(Q.psnr(edited, clean, region), 3),
        "ssim_region_vs_original_edit": round(Q.ssim(edited, clean, region), 4),
    }
    gap = np.ones((edited.shape[0], COMPARE_GAP, 3))
    panel = np.concatenate([clean, gap, edited, gap, np.abs(edited - clean)], axis=1)
    return report, edited, panel
