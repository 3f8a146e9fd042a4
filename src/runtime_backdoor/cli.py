"""``runtime-backdoor``: protect your own images from the command line.

    runtime-backdoor protect photo.png --mask photo_mask.png --editor lama \\
        --weights models/big-lama/models/best.ckpt --out photo_protected.png
    runtime-backdoor check photo.png --mask photo_mask.png --editor lama --weights ...
    runtime-backdoor editors
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from . import weights

DESCRIPTION = """\
Protect a region of an image (a watermark, a face, a logo) against inpainting.

The command adds an imperceptible perturbation (at most EPS per pixel value) to the
image, optimised against one editing model, so that when somebody later asks that
model to fill the protected region the fill becomes a solid colour, while edits
elsewhere work as usual (the run-time backdoor of Attack as Defense, arXiv 2410.14966).

The mask is a grey PNG of the same size as the image: 255 (white) = protected
region, 0 (black) = the rest. The original image is never modified.
"""


def _positive_int(name: str, low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a whole number, got {text!r}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be in [{low}, {high}], got {value}")
        return value

    return parse


def _eps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eps must be a number, got {text!r}") from None
    if value > 1:  # accept 8-bit units such as 6.4 for convenience
        value = value / 255
    if not 0 < value <= 64 / 255:
        raise argparse.ArgumentTypeError(
            f"--eps must be in (0, 0.25] (or (0, 64] in 8-bit units), got {text}"
        )
    return value


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error (no usage dump)."""

    def error(self, message: str):
        raise CliError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="runtime-backdoor",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def inputs(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "image",
            type=Path,
            help=f"image to {what} (PNG/JPEG; RGB, grey or RGBA), or a folder of "
            "NAME_example.png + NAME_example_mask.png pairs (the official layout)",
        )
        p.add_argument(
            "--mask",
            type=Path,
            default=None,
            help="protected-region mask (white = protect); a folder's masks are found by name",
        )
        p.add_argument(
            "--editor",
            required=True,
            help="editing model (see `runtime-backdoor editors`)",
        )
        p.add_argument(
            "--weights",
            type=Path,
            default=None,
            help="model checkpoint file or folder for the editor",
        )
        p.add_argument(
            "--threshold",
            type=float,
            default=0.5,
            help="mask threshold, fraction of full scale (default 0.5)",
        )
        p.add_argument(
            "--device", default="auto", help="'auto' (GPU if available), 'cpu' or 'cuda'"
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--target",
            default="solid",
            help="what the protected region turns into: 'solid' colour (default), 'anti' (inverted image) or a PNG path",
        )

    def budget(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--eps",
            type=_eps,
            default=0.025,
            help="perturbation budget per pixel value, fraction of the range (default 0.025 = 6.4/255, the paper's)",
        )
        target(p)
        p.add_argument(
            "--expand",
            type=_positive_int("--expand", 1, 255),
            default=17,
            help="expansion kernel in pixels (odd; default 17, the paper's at 512 px)",
        )

    protect = sub.add_parser(
        "protect",
        help="write a protected copy of an image (or of every image of a folder)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs(protect, "protect")
    budget(protect)
    protect.add_argument(
        "--out",
        type=Path,
        required=True,
        help="where to write the protected PNG (never the input); for a folder, the output folder",
    )
    protect.add_argument(
        "--steps",
        type=_positive_int("--steps", 1, 10000),
        default=20,
        help="optimisation steps (default 20, the paper's)",
    )
    protect.add_argument(
        "--seed", type=int, default=0, help="random seed of the initial perturbation"
    )
    protect.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    edit = sub.add_parser(
        "edit",
        help="fill the masked region with the editor, as an attacker would",
        description="Fill the masked region of IMAGE with the editor and write the result. "
        "With --compare ORIGINAL (the unprotected image) also edit the original, write "
        "OUT_compare.png (original's edit | protected image's edit | difference) and print how "
        "much of the region is on the target colour and its PSNR and SSIM against the "
        "original's edit.",
    )
    inputs(edit, "edit")
    target(edit)
    edit.add_argument(
        "--out",
        type=Path,
        required=True,
        help="where to write the edited PNG; for a folder, the output folder",
    )
    edit.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="the original (unprotected) image, or for a folder the folder of originals",
    )
    edit.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    check = sub.add_parser(
        "check", help="estimate whether an editor can be protected against at EPS (fast)"
    )
    inputs(check, "check")
    budget(check)
    check.add_argument(
        "--out", type=Path, default=None, help="for a folder: where to write manifest.csv"
    )

    sub.add_parser("editors", help="list the editors that can be named with --editor")
    weights.add_parser(sub)
    return parser


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device: unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def _load_inputs(args):
    import torch

    from .data import read_image, read_mask
    from .editors import EDITORS, build_editor

    if args.editor not in EDITORS:
        raise CliError(
            f"--editor: unknown editor {args.editor!r}; known editors: {', '.join(EDITORS)}"
        )
    if args.expand % 2 == 0:
        raise CliError(f"--expand must be odd, got {args.expand}")
    if not 0 < args.threshold <= 1:
        raise CliError(f"--threshold must be in (0, 1], got {args.threshold}")
    image = read_image(args.image)
    mask = read_mask(args.mask, threshold=args.threshold)
    if mask.shape != image.shape[:2]:
        raise CliError(
            f"mask {args.mask} is {mask.shape[1]}x{mask.shape[0]} but image {args.image} is "
            f"{image.shape[1]}x{image.shape[0]} (width x height): they must match"
        )
    target = args.target
    if target not in ("solid", "anti"):
        target_path = Path(target)
        if not target_path.exists():
            raise CliError(
                f"--target: {target!r} is neither 'solid', 'anti' nor an existing image file"
            )
        t = read_image(target_path)
        if t.shape != image.shape:
            raise CliError(
                f"--target image {target_path} is {t.shape[1]}x{t.shape[0]}, image is {image.shape[1]}x{image.shape[0]}"
            )
        target = torch.from_numpy(t).permute(2, 0, 1)
    device = _device(args.device)
    try:
        editor = build_editor(args.editor, weights=args.weights, device=device)
    except (FileNotFoundError, NotImplementedError) as err:
        raise CliError(str(err)) from None
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
    m = torch.from_numpy(mask.astype("float32"))[None, None].to(device)
    return editor, x, m, target


def _protect(args) -> dict:
    from .data import write_png
    from .implant import implant

    out = args.out
    if out.suffix.lower() != ".png":
        raise CliError(f"--out {out}: the protected image must be saved as PNG (lossless)")
    for given in (args.image, args.mask):
        if out.resolve() == given.resolve():
            raise CliError(
                f"--out {out} is an input file; choose another path (inputs are never overwritten)"
            )
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} exists; pass --overwrite to replace it")
    editor, x, m, target = _load_inputs(args)
    result = implant(
        editor,
        x,
        m,
        eps=args.eps,
        steps=args.steps,
        expand_kernel=args.expand,
        target=target,
        seed=args.seed,
        progress=not args.quiet,
    )
    protected = result.protected[0].permute(1, 2, 0).cpu().numpy()
    write_png(out, protected, overwrite=args.overwrite)
    losses = {k: float(v[-1, 0]) for k, v in result.losses.items()}
    diff = (result.delta.abs().max() * 255).item()
    return {
        "out": str(out),
        "editor": args.editor,
        "eps": args.eps,
        "steps": args.steps,
        "max_change_8bit": round(diff, 3),
        "seconds": round(result.seconds, 3),
        "final_losses": losses,
    }


def _check(args) -> dict:
    from .implant import sensitivity

    editor, x, m, target = _load_inputs(args)
    s = sensitivity(editor, x, m, eps=args.eps, target=target)
    gain, needed = float(s.gain[0]), float(s.needed[0])
    verdict = (
        "likely protectable at this eps (first-order estimate)"
        if gain >= needed
        else "unlikely: the editor is not sensitive enough at this eps; protection will probably not trigger"
    )
    return {
        "editor": args.editor,
        "eps": args.eps,
        "gain": round(gain, 3),
        "needed": round(needed, 3),
        "verdict": verdict,
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "weights":
        return weights.run(args)
    if args.command == "editors":
        from .editors import EDITORS

        for name, spec in EDITORS.items():
            print(f"{name:14s} {spec.description}")
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)
            report = _protect(args) if args.command == "protect" else _check(args)
    except (CliError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"runtime-backdoor: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
