"""``runtime-backdoor``: protect your own images from the command line.

    runtime-backdoor protect photo.png --mask photo_mask.png --editor lama \\
        --weights models/big-lama/models/best.ckpt --out photo_protected.png
    runtime-backdoor check photo.png --mask photo_mask.png --editor lama --weights ...
    runtime-backdoor protect photo.png --mask photo_mask.png --editor toy-control,blur-fill \\
        --out photo_protected.png     # one perturbation against both editors (an ensemble)
    runtime-backdoor editors
    runtime-backdoor demo            # the same in a browser page (runtime_backdoor.demo)

The work of ``protect``, ``check`` and ``edit`` is done by :mod:`runtime_backdoor.owner`,
which the browser demo calls too: one code path, the same bytes; :mod:`runtime_backdoor.batch`
runs it on one image or a folder. This module reads the command line, dispatches it and says
every error in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

from . import downloads
from .batch import _emit, _quiet_stdout, run_folder, run_single
from .owner import (
    DEFAULT_EPS,
    DEFAULT_MAX_PIXELS,
    ENSEMBLE_RULE,
    HIT_MIN_FRACTION,
    HIT_TOL,
    NOT_PROTECTED,
    NOT_PROTECTED_SIDE_EFFECT,
    PROTECTED,
    SIDE_EFFECT,
    SIDE_EFFECT_PSNR_DB,
    UNVERIFIED,
    CliError,
    one_line,
    parse_eps,
    weights_reason,
)

DESCRIPTION = """\
Protect a region of an image (a watermark, a face, a logo) against inpainting.

The command adds an imperceptible perturbation (at most EPS per pixel value) to the
image, optimised against one editing model (or several at once: --editor A,B), so
that when somebody later asks that model to fill the protected region the fill becomes
a solid colour, while edits elsewhere work as usual (the run-time backdoor of Attack as
Defense, arXiv 2410.14966).

The mask is a grey PNG of the same size as the image: 255 (white) = protected
region, 0 (black) = the rest. The original image is never modified.
"""


PROTECT_EPILOG = f"""\
verdict:
  After writing the PNG, protect reads it back and edits it as an attacker would, with
  the editor it protected against (--no-verify skips this): the malicious edit fills the
  protected region, the benign edit fills the ring E(m) - m around it; both are compared
  with the same edits of the original. It gives ONE verdict, on stderr and in the JSON
  ("verdict", "verdict_detail" and the numbers behind them; for a folder, manifest.csv):

    {PROTECTED}
    {SIDE_EFFECT}
    {NOT_PROTECTED}
    {NOT_PROTECTED_SIDE_EFFECT}

  A hit: at least {HIT_MIN_FRACTION:.0%} of the edited region with every channel within {HIT_TOL:g}
  of the target colour (the pipeline's evaluate.hit_tol and hit_min_fraction).
  Protected: the protected image's malicious edit hits (hit_fraction) and the
  original's does not (hit_fraction_original). A side effect on benign edits: the
  protected image's ring edit is below {SIDE_EFFECT_PSNR_DB:g} dB PSNR against the original's
  (ring_psnr_vs_original_edit), or hits the target while the original's does not
  (ring_hit_fraction, ring_hit_fraction_original). The same side effect without the
  protection: "{NOT_PROTECTED_SIDE_EFFECT}".

exit status:
  0 when the PNG was written, whatever the verdict; 1 when images of a folder were
  skipped; 2 on an error (one line on stderr). To script on the verdict:

    verdict=$(runtime-backdoor protect photo.png --mask mask.png --editor toy-control \\
      --out protected.png --quiet | python3 -c \\
      'import json, sys; print(json.load(sys.stdin)["verdict"])')
    [ "$verdict" = protected ] || echo "check the result: $verdict"

  For a folder: the "verdict" column of OUT/manifest.csv.

large images (the attacker's tool's view):
  Above --crop-trigger (longer side; IOPaint's default 800 px) protect optimises on the
  crop the tool inpaints (the mask's box plus --crop-margin, 128 px) and writes the full
  image, unchanged outside the crop. The verification edits the written PNG through each
  pipeline the tool uses at this size (crop; resize to --resize-limit, 1280 px, when the
  image is larger) and reports "held_under", "not_held_under" and each pipeline's numbers
  under "pipelines"; "verdict" is protected only when it held under all of them.

several editors (an ensemble):
  --editor A,B optimises one perturbation against all the named editors at once, their
  losses summed each step, weighted by --editor-weights (default 1 each, e.g.
  --editor-weights 1,2). --weights then takes one entry per editor, comma-separated, in
  --editor's order, an empty entry for an editor without weights
  (--editor toy-control,lama --weights ,models/big-lama.pt); with one editor it is one
  path, as it stands. The PNG is verified against each editor: the JSON has
  "per_editor" (each editor's verdict and numbers) and, as "verdict", the ensemble's:
{textwrap.fill(ENSEMBLE_RULE, 88, initial_indent="    ", subsequent_indent="    ")}
  A folder's manifest.csv has each editor's numbers as columns KEY/EDITOR
  ("verdict/toy-control", "hit_fraction/blur-fill", ...) beside the ensemble's "verdict".
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


def _device_and_pixel_limit(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--max-pixels``, the same for every command that reads images."""
    p.add_argument(
        "--device", default="auto", help="'auto' (GPU if available), 'cpu', 'cuda' or 'cuda:N'"
    )
    p.add_argument(
        "--max-pixels",
        type=_positive_int("--max-pixels", 1, 10**12),
        default=DEFAULT_MAX_PIXELS,
        help="refuse images of more pixels, read from the file's header before decoding "
        f"(default {DEFAULT_MAX_PIXELS:_}: {DEFAULT_MAX_PIXELS / 1e6:g} megapixels)",
    )


def _eps(text: str) -> float:
    try:
        return parse_eps(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--{err}") from None


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error (no usage dump)."""

    def error(self, message: str):
        raise CliError(message)


def _inputs(p: argparse.ArgumentParser, what: str) -> None:
    """The image (or folder), its mask and the editor: protect, edit and check read them."""
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
        help="editing model (see `runtime-backdoor editors`); protect and check take "
        "several, comma-separated (A,B: protect against all at once, check each; edit: one)",
    )
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="model checkpoint file or folder for the editor; with several editors one "
        "entry per editor, comma-separated in --editor's order, empty for an editor "
        "without weights (--editor toy-control,lama --weights ,models/big-lama.pt)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="mask threshold, fraction of full scale (default 0.5)",
    )
    _device_and_pixel_limit(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _target(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default="solid",
        help="what the protected region turns into: 'solid' colour (default), 'anti' (inverted image) or a PNG path",
    )


def _expand(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expand",
        type=_positive_int("--expand", 1, 255),
        default=None,
        help="kernel of the expanded region E(m) in pixels, whose ring E(m) - m is the benign "
        "edit (odd; default: scaled with the image's shorter side as the pipeline scales "
        "it, the paper's 17 at 512 px, 9 at 256 px, 5 at 128 px)",
    )


def _budget(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eps",
        type=_eps,
        default=DEFAULT_EPS,
        help=f"perturbation budget per pixel value, fraction of the range (default {DEFAULT_EPS:g} "
        f"= {DEFAULT_EPS * 255:.1f}/255, the paper's)",
    )
    _target(p)
    _expand(p)


def _views(p: argparse.ArgumentParser) -> None:
    """What the attacker's tool shows the model (:mod:`runtime_backdoor.views`), with
    IOPaint's defaults."""
    from .views import CROP_MARGIN, CROP_TRIGGER, MAX_VIEW_PIXELS, RESIZE_LIMIT, VIEWS

    p.add_argument(
        "--view",
        default="auto",
        help=f"the view of the image to protect on ({'|'.join(VIEWS)}; default auto: the whole "
        "image when its longer side is at most --crop-trigger, else the crop around the mask, "
        "as IOPaint's default HD strategy; the editor never sees more than "
        f"{MAX_VIEW_PIXELS / 1e6:.1f} megapixels, so memory and time follow the view, not the "
        "photo)",
    )
    p.add_argument(
        "--crop-margin",
        type=_positive_int("--crop-margin", 0, 10**5),
        default=CROP_MARGIN,
        help=f"px added on each side of the mask's bounding box for the crop view (default "
        f"{CROP_MARGIN}, IOPaint's hd_strategy_crop_margin)",
    )
    p.add_argument(
        "--crop-trigger",
        type=_positive_int("--crop-trigger", 1, 10**6),
        default=CROP_TRIGGER,
        help=f"longer side above which the tool crops (default {CROP_TRIGGER}, IOPaint's "
        "hd_strategy_crop_trigger_size)",
    )
    p.add_argument(
        "--resize-limit",
        type=_positive_int("--resize-limit", 1, 10**6),
        default=RESIZE_LIMIT,
        help=f"longer side of the resize view (default {RESIZE_LIMIT}, IOPaint's "
        "hd_strategy_resize_limit)",
    )


def _add_protect(sub) -> None:
    protect = sub.add_parser(
        "protect",
        help="write a protected copy of an image (or of every image of a folder)",
        description=DESCRIPTION,
        epilog=PROTECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _inputs(protect, "protect")
    _budget(protect)
    _views(protect)
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
        "--seed",
        type=_positive_int("--seed", 0, 2**63 - 1),
        default=0,
        help="random seed of the initial perturbation (0 to 2**63 - 1)",
    )
    protect.add_argument(
        "--editor-weights",
        default=None,
        metavar="W1,W2",
        help="with several editors: the weight of each editor's loss, comma-separated in "
        "--editor's order, non-negative (default 1 each)",
    )
    protect.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    protect.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the attacker's edits of the written PNG that decide the verdict "
        f"(the verdict is then '{UNVERIFIED}')",
    )


def _add_edit(sub) -> None:
    edit = sub.add_parser(
        "edit",
        help="fill the masked region with the editor, as an attacker would",
        description="Fill the masked region of IMAGE with the editor and write the result. "
        "With --compare ORIGINAL (the unprotected image) also edit the original, and fill the "
        "ring around the region in both (the benign edit); write OUT_compare.png, a labelled "
        "figure (for each edit: original's edit | protected image's edit | difference, the "
        "target colour, the numbers) and print how much of each edited region is on the "
        "target colour, its PSNR against the original's edit and the verdict protect gives.",
    )
    _inputs(edit, "edit")
    _target(edit)
    _expand(edit)
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


def _add_check(sub) -> None:
    check = sub.add_parser(
        "check", help="estimate whether an editor can be protected against at EPS (fast)"
    )
    _inputs(check, "check")
    _budget(check)
    _views(check)
    check.add_argument(
        "--out", type=Path, default=None, help="for a folder: where to write manifest.csv"
    )


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="a browser page for image owners: paint, check, protect, compare, download",
        description="Serve a one-page browser app (Gradio) that does what check, protect and "
        "edit do, on this machine only: nothing leaves it, and nothing is written outside a "
        "temporary folder that is removed on exit.",
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    demo.add_argument(
        "--port",
        type=_positive_int("--port", 1, 65535),
        default=None,
        help="port (default: the first free one from 7860)",
    )
    demo.add_argument(
        "--editor", default=None, help="an editor to offer first (with --weights if it needs them)"
    )
    demo.add_argument("--weights", type=Path, default=None, help="weights for --editor")
    _device_and_pixel_limit(demo)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per action, each built by its own ``_add_*``."""
    parser = _Parser(
        prog="runtime-backdoor",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_protect(sub)
    _add_edit(sub)
    _add_check(sub)
    sub.add_parser("editors", help="list the editors that can be named with --editor")
    downloads.add_parser(sub)
    _add_demo(sub)
    return parser


def _editor_weights(text: str, count: int) -> list[float]:
    """``--editor-weights 1,2``: one non-negative number per editor, not all zero."""
    import math

    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise CliError(
            f"--editor-weights {text}: give {count} numbers separated by commas, one per editor"
        ) from None
    if len(values) != count:
        raise CliError(
            f"--editor-weights {text}: {count} editors need {count} weights, one per --editor "
            f"name in its order; got {len(values)}"
        )
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise CliError(f"--editor-weights {text}: every weight must be a non-negative number")
    if not any(values):
        raise CliError(f"--editor-weights {text}: at least one weight must be above 0")
    return values


def _editor_list(args) -> None:
    """``--editor A,B`` read into ``args.editors``, ``--weights`` matched to them by position
    (``args.weights_of``) and ``--editor-weights`` parsed, before any work. One name keeps
    ``--weights`` whole, so a single path may hold a comma."""
    given = getattr(args, "editor_weights", None)
    if "," not in args.editor:
        if given is not None:
            raise CliError(
                f"--editor-weights is for several editors (--editor A,B); {args.editor} alone "
                "needs none"
            )
        args.editors, args.weights_of = [args.editor], [args.weights]
        return
    names = [n.strip() for n in args.editor.split(",")]
    if "" in names:
        raise CliError(
            f"--editor {args.editor}: an empty name; separate names by single commas "
            "(--editor toy-control,blur-fill)"
        )
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise CliError(f"--editor {args.editor}: {twice} is named twice; name each editor once")
    if args.command == "edit":
        raise CliError(
            f"--editor {args.editor}: edit uses one editor, as an attacker does; run it once "
            "per editor"
        )
    weights = [None] * len(names)
    if args.weights is not None:
        entries = [e.strip() for e in str(args.weights).split(",")]
        if len(entries) != len(names):
            raise CliError(
                f"--weights {args.weights}: {len(names)} editors need {len(names)} "
                f"comma-separated entries, one per --editor name in its order; got "
                f"{len(entries)} (an empty entry for an editor without weights: "
                "--weights ,models/big-lama.pt)"
            )
        weights = [Path(e) if e else None for e in entries]
    args.editor, args.editors, args.weights_of = ",".join(names), names, weights
    if given is not None:
        args.editor_weights = _editor_weights(given, len(names))


def _verdict_line(report: dict, whose: str = "") -> str | None:
    if "measured" in report:  # check
        return f"prediction{whose}: {report['verdict']} ({report['measured']})"
    if "verdict" in report:
        detail = report.get("verdict_detail")
        return f"verdict{whose}: {report['verdict']}" + (f": {detail}" if detail else "")
    return None


def _say_verdict(report: dict) -> None:
    """protect's and edit --compare's verdict, or check's prediction with how often such a
    prediction held when measured, as one line on stderr (the JSON on stdout has them too);
    for several editors, a line for the ensemble's verdict and one for each editor."""
    lines = [_verdict_line(report)]
    for name, own in report.get("per_editor", {}).items():
        if "verdict_detail" in own or "measured" in own:  # --no-verify: the ensemble's line
            lines.append(_verdict_line(own, f" for {name}"))
    for line in filter(None, lines):
        print(f"runtime-backdoor: {line}", file=sys.stderr)


# ------------------------------------------------------------------------------- main


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # The package's own warnings (thresholded masks, dropped alpha) concern the user;
    # libraries' deprecation chatter does not (--debug shows everything).
    if (
        "runtime_backdoor" in str(filename)
        or category is UserWarning
        and "runtime_backdoor" in str(message)
    ):
        print(f"warning: {message}", file=sys.stderr)


def editor_listing() -> str:
    """``runtime-backdoor editors``: every registered name, what it is, what weights it reads."""
    from .editors import EDITORS

    lines = []
    for name, entry in EDITORS.items():
        line = f"{name:14s} {entry.description}"
        if entry.weights:
            line += f" [`runtime-backdoor weights fetch {entry.weights[0]}`]"
        lines.append(line)
    return "\n".join(lines)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "weights":
        return downloads.run(args)
    if args.command == "demo":
        from .demo import serve

        return serve(args.host, args.port, args.editor, args.weights, args.device, args.max_pixels)
    if args.command == "editors":
        _emit(editor_listing())
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        if not args.debug:
            warnings.showwarning = _show_warning
        _editor_list(args)
        if args.image.is_dir():
            return run_folder(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CliError("several processes need a folder of images, not one image")
        report = run_single(args)
    _say_verdict(report)
    _emit(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; exit status 0 = done, 1 = some images skipped, 2 = error.

    Every error is one line on stderr naming the file or option (``--debug`` adds the
    traceback). A closed stdout (``| head``) is ignored: the work goes on, quietly.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe fails here, inside the handler, not at exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except KeyboardInterrupt:
        print("runtime-backdoor: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, CliError | ValueError | FileNotFoundError | FileExistsError):
            message = one_line(err)
        elif isinstance(err, OSError):
            where = f"{err.filename}: " if err.filename else ""
            message = f"{where}{err.strerror or one_line(err)}"
        else:
            message = (
                f"unexpected {type(err).__name__}: {weights_reason(err)} "
                "(rerun with --debug for the traceback)"
            )
        print(f"runtime-backdoor: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
