"""``runtime-backdoor``: protect your own images from the command line.

    runtime-backdoor protect photo.png --mask photo_mask.png --editor lama \\
        --weights models/big-lama/models/best.ckpt --out photo_protected.png
    runtime-backdoor check photo.png --mask photo_mask.png --editor lama --weights ...
    runtime-backdoor protect photo.png --mask photo_mask.png --editor toy-control,blur-fill \\
        --out photo_protected.png     # one perturbation against both editors (an ensemble)
    runtime-backdoor editors
    runtime-backdoor demo            # the same in a browser page (runtime_backdoor.demo)

The work of ``protect``, ``check`` and ``edit`` is done by :mod:`runtime_backdoor.owner`,
which the browser demo calls too: one code path, the same bytes. This module reads the
command line, walks folders and says every error in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import textwrap
import traceback
import warnings
from pathlib import Path

from . import downloads
from .owner import (
    DEFAULT_EPS,
    DEFAULT_MAX_PIXELS,
    ENSEMBLE_RULE,
    HIT_MIN_FRACTION,
    HIT_TOL,
    NOT_PROTECTED,
    PROTECTED,
    SIDE_EFFECT,
    SIDE_EFFECT_PSNR_DB,
    UNVERIFIED,
    VERDICTS,
    CliError,
    check_image,
    check_options,
    check_pixels,
    device_from_option,
    edit_image,
    load_editor,
    one_line,
    parse_eps,
    protect_image,
    read_inputs,
    verify_ensemble,
    verify_protection,
    weights_reason,
    write_output,
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

  A hit: at least {HIT_MIN_FRACTION:.0%} of the edited region with every channel within {HIT_TOL:g}
  of the target colour (the pipeline's evaluate.hit_tol and hit_min_fraction).
  Protected: the protected image's malicious edit hits (hit_fraction) and the
  original's does not (hit_fraction_original). A side effect on benign edits: the
  protected image's ring edit is below {SIDE_EFFECT_PSNR_DB:g} dB PSNR against the original's
  (ring_psnr_vs_original_edit), or hits the target while the original's does not
  (ring_hit_fraction, ring_hit_fraction_original).

exit status:
  0 when the PNG was written, whatever the verdict; 1 when images of a folder were
  skipped; 2 on an error (one line on stderr). To script on the verdict:

    verdict=$(runtime-backdoor protect photo.png --mask mask.png --editor toy-control \\
      --out protected.png --quiet | python3 -c \\
      'import json, sys; print(json.load(sys.stdin)["verdict"])')
    [ "$verdict" = protected ] || echo "check the result: $verdict"

  For a folder: the "verdict" column of OUT/manifest.csv.

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
            default=DEFAULT_EPS,
            help="perturbation budget per pixel value, fraction of the range (default 0.025 = 6.4/255, the paper's)",
        )
        target(p)
        expand(p)

    def expand(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--expand",
            type=_positive_int("--expand", 1, 255),
            default=None,
            help="kernel of the expanded region E(m) in pixels, whose ring E(m) - m is the benign "
            "edit (odd; default: scaled with the image's shorter side as the pipeline scales "
            "it, the paper's 17 at 512 px, 9 at 256 px, 5 at 128 px)",
        )

    protect = sub.add_parser(
        "protect",
        help="write a protected copy of an image (or of every image of a folder)",
        description=DESCRIPTION,
        epilog=PROTECT_EPILOG,
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
    inputs(edit, "edit")
    target(edit)
    expand(edit)
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
    downloads.add_parser(sub)
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


def _build_editor(args, device):
    """The editor; for several names, ``{name: editor}`` in ``--editor``'s order."""
    if len(args.editors) == 1:
        return load_editor(args.editor, args.weights, device)
    editors, count = {}, len(args.editors)
    for i, (name, weights) in enumerate(zip(args.editors, args.weights_of, strict=True)):
        try:
            editors[name] = load_editor(name, weights, device)
        except CliError as err:
            # load_editor speaks of one editor's --weights: say which entry is meant, first,
            # as long messages are cut at the end
            text = str(err)
            needs = f"--editor {name} needs --weights: "
            if text.startswith(needs):
                raise CliError(
                    f"--editor {name} needs its --weights entry ({i + 1} of {count}, "
                    f"comma-separated in --editor's order): {text.removeprefix(needs)}"
                ) from err
            if weights is None:
                raise
            text = text.removeprefix(f"--weights {weights}: ")
            text = text.replace("drop --weights", "leave its entry empty")
            raise CliError(f"--weights entry {i + 1} of {count} ({weights}, for {name}): {text}") from err  # fmt: skip
    return editors


def _who(args, editor=None):
    """The editor as named in messages about what it returned (an ensemble: each, by name)."""
    if isinstance(editor, dict):
        return {name: f"--editor {name}" for name in editor}
    return f"--editor {args.editor}"


def _check_options(args) -> None:
    check_options(getattr(args, "expand", None), args.threshold, getattr(args, "target", "solid"))


def _read_inputs(args, image_path: Path, mask_path: Path):
    return read_inputs(
        image_path, mask_path, args.threshold, getattr(args, "target", "solid"), args.max_pixels
    )


def _check_writable(out: Path, is_folder: bool = False) -> None:
    """Write and remove a probe file where ``out`` will go (its nearest existing folder), so
    that an output that cannot be written is found before any work, not after it."""
    start = out.absolute() if is_folder else out.absolute().parent
    folder = next((p for p in [start, *start.parents] if p.exists()), None)
    if folder is None or not folder.is_dir():
        return  # said by the caller's own checks
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".runtime-backdoor-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CliError(
            f"--out {out}: cannot write in {folder} ({err.strerror or one_line(err)})"
        ) from None


def _check_out_file(args, inputs: tuple[Path, ...]) -> None:
    out = args.out
    if out.suffix.lower() != ".png":
        raise CliError(f"--out {out}: the {args.command}ed image must be saved as PNG (lossless)")
    for given in inputs:
        if given is not None and out.resolve() == given.resolve():
            raise CliError(
                f"--out {out} is an input file; choose another path (inputs are never overwritten)"
            )
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give a file name ending in .png")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CliError(f"--out {out}: {parent} is a file, not a folder")
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {out} exists; pass --overwrite to replace it")
    _check_writable(out)


def _protect_one(args, editor, x, m, target, device) -> tuple[dict, object]:
    """protect's report and result; ``editor`` a dict: one perturbation against them all."""
    report, protected = protect_image(
        editor,
        x,
        m,
        target,
        device,
        eps=args.eps,
        steps=args.steps,
        expand=args.expand,
        seed=args.seed,
        progress=not args.quiet and not _is_folder(args),
        name=_who(args, editor),
        editor_weights=args.editor_weights if isinstance(editor, dict) else None,
    )
    return {"editor": args.editor, **report}, protected


def _verify(args, editor, x, m, target, device, out: Path, expand: int) -> dict:
    """protect's verdict on the PNG it wrote (``--no-verify``: none); for an ensemble one per
    editor and the ensemble's (:data:`ENSEMBLE_RULE`)."""
    ensemble = isinstance(editor, dict)
    if args.no_verify and ensemble:
        return {"verdict": UNVERIFIED, "per_editor": {n: {"verdict": UNVERIFIED} for n in editor}}
    if args.no_verify:
        return {"verdict": UNVERIFIED}
    if ensemble:
        who = _who(args, editor)
        return verify_ensemble(editor, x, m, target, device, out, expand=expand, name=who)
    return verify_protection(editor, x, m, target, device, out, expand=expand, name=_who(args))


def _verdict_first(report: dict) -> dict:
    """The report with its verdict first, where a reader looks."""
    head = {k: report[k] for k in ("out", "verdict", "verdict_detail") if k in report}
    return head | report


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


def _edit_one(args, editor, x, m, target, device, original=None):
    report, edited, panel = edit_image(
        editor, x, m, target, device, original, expand=args.expand, name=_who(args)
    )
    return {"editor": args.editor, **report}, edited, panel


def compare_path(out: Path) -> Path:
    """Where ``edit --compare`` writes the labelled comparison next to ``out``."""
    return out.with_name(out.stem + "_compare.png")


def _single(args) -> dict:
    if args.mask is None:
        raise CliError(f"--mask is required for the image {args.image} (or give a folder)")
    _check_options(args)
    # Sizes from the files' headers, before torch is even imported.
    for path, what in ((args.image, "image"), (args.mask, "mask")):
        check_pixels(path, what, args.max_pixels)
    if getattr(args, "compare", None) is not None:
        check_pixels(args.compare, "--compare image", args.max_pixels)
    if args.command in ("protect", "edit"):
        _check_out_file(args, (args.image, args.mask, getattr(args, "compare", None)))
    if getattr(args, "compare", None) is not None:
        panel = compare_path(args.out)
        if panel.exists() and not args.overwrite:
            raise CliError(f"{panel} (the --compare panel) exists; pass --overwrite to replace it")
    device = device_from_option(args.device)
    x, m, target = _read_inputs(args, args.image, args.mask)
    editor = _build_editor(args, device)
    if args.command == "check":
        return _check_one(args, editor, x, m, target, device)
    if args.command == "protect":
        report, protected = _protect_one(args, editor, x, m, target, device)
        write_output(args.out, protected, args.overwrite)
        report |= _verify(args, editor, x, m, target, device, args.out, report["expand"])
        return _verdict_first({"out": str(args.out), **report})
    original = None
    if args.compare is not None:
        original, _, _ = _read_inputs(args, args.compare, args.mask)
    report, edited, panel = _edit_one(args, editor, x, m, target, device, original)
    write_output(args.out, edited, args.overwrite)
    report = {"out": str(args.out), **report}
    if panel is not None:
        write_output(compare_path(args.out), panel, args.overwrite)
        report["compare"] = str(compare_path(args.out))
    return _verdict_first(report)


def _check_one(args, editor, x, m, target, device) -> dict:
    if isinstance(editor, dict):  # each editor's own estimate: they do not add up
        per_editor = {}
        for name, each in editor.items():
            own = check_image(each, x, m, target, device, eps=args.eps, name=f"--editor {name}")
            per_editor[name] = {k: v for k, v in own.items() if k != "eps"}
        return {"editor": args.editor, "eps": args.eps, "per_editor": per_editor}
    report = check_image(editor, x, m, target, device, eps=args.eps, name=_who(args))
    return {"editor": args.editor, **report}


# ------------------------------------------------------------------------------- folders

IMAGE_SUFFIX, MASK_SUFFIX = "_example.png", "_example_mask.png"


def _is_folder(args) -> bool:
    return args.image.is_dir()


def _folder_pairs(folder: Path) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, str]]]:
    """``(name, image, mask)`` of every complete pair, and ``(name, problem)`` of the others."""
    pairs, problems = [], []
    for image in sorted(folder.glob("*" + IMAGE_SUFFIX)):
        name = image.name[: -len(IMAGE_SUFFIX)]
        if name.endswith("_example") or image.name.endswith(MASK_SUFFIX):
            continue
        mask = image.with_name(name + MASK_SUFFIX)
        if not mask.is_file():
            problems.append((name, f"{image}: no mask next to it (expected {mask.name})"))
        else:
            pairs.append((name, image, mask))
    for mask in sorted(folder.glob("*" + MASK_SUFFIX)):
        name = mask.name[: -len(MASK_SUFFIX)]
        if not mask.with_name(name + IMAGE_SUFFIX).exists():
            problems.append((name, f"{mask}: a mask without its image {name}{IMAGE_SUFFIX}"))
    return pairs, problems


def _settings(args, editor) -> str:
    from .launch import code_hash, editor_fingerprint, settings_hash

    options = {
        k: str(v)
        for k, v in vars(args).items()
        if k
        in (
            "command",
            "eps",
            "steps",
            "seed",
            "target",
            "expand",
            "threshold",
            "compare",
            "no_verify",
        )
    }
    if isinstance(editor, dict):
        # Every editor in its order (their losses are summed in it) and their loss weights:
        # an output made against another ensemble is redone.
        fingerprints = [f"{name}:{editor_fingerprint(e)}" for name, e in editor.items()]
        codes = [code_hash(e) for e in editor.values()]
        weights = getattr(args, "editor_weights", None) or [1.0] * len(editor)  # as used
        options["editor_weights"] = str([float(w) for w in weights])
        return settings_hash({"editor": fingerprints, "code": codes, **options})
    return settings_hash(
        {"editor": editor_fingerprint(editor), "code": code_hash(editor), **options}
    )


def _flat(report: dict) -> dict:
    """A report as one row of manifest.csv: an ensemble's ``per_editor`` numbers become
    ``KEY/EDITOR`` columns (``verdict/toy-control``), in its place."""
    row = {}
    for key, value in report.items():
        if key != "per_editor":
            row[key] = value
            continue
        for field in dict.fromkeys(k for numbers in value.values() for k in numbers):
            row |= {f"{field}/{n}": own[field] for n, own in value.items() if field in own}
    return row


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damage(row: dict, outputs: list[Path]) -> str | None:
    """Why a finished row's outputs cannot be trusted (None: they can). The main output is
    compared with the SHA-256 the manifest recorded; every other output, and a main output
    of a manifest without hashes, must decode in full."""
    from PIL import Image

    recorded = row.get("out_sha256")
    for i, path in enumerate(outputs):
        if not path.is_file():
            return f"{path.name} is missing"
        if i == 0 and isinstance(recorded, str) and recorded:
            if _sha256(path) != recorded:
                return f"{path.name} differs from the SHA-256 recorded in manifest.csv"
            continue
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as err:
            return f"{path.name} does not decode ({one_line(err, 120)})"
    return None


def _outputs_of(args, out: Path, name: str) -> list[Path]:
    """Every file a finished image left in ``out``, its main output first."""
    if args.command == "check":
        return []
    files = [out / f"{name}{IMAGE_SUFFIX}", out / f"{name}{MASK_SUFFIX}"]
    if getattr(args, "compare", None) is not None:
        files.append(out / f"{name}_compare.png")
    return files


def _folder(args) -> int:
    """Every pair of a folder: one output per image, a manifest, resume, bad pairs skipped."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .data import write_csv
    from .launch import Ledger, finished_rows, launched_ranks

    folder, out = args.image, args.out
    if args.mask is not None:
        raise CliError("--mask is for a single image; a folder's masks are NAME_example_mask.png")
    if out is None:
        raise CliError(f"--out is required for the folder {folder}: the folder for the results")
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; give a folder for a folder of images")
    if out.resolve() == folder.resolve():
        raise CliError(
            f"--out {out} is the input folder; choose another (inputs are never overwritten)"
        )
    compare = getattr(args, "compare", None)
    if compare is not None and not compare.is_dir():
        raise CliError(f"--compare {compare}: for a folder of images, give the folder of originals")
    _check_options(args)
    pairs, problems = _folder_pairs(folder)
    if not pairs and not problems:
        raise CliError(
            f"{folder}: no '*{IMAGE_SUFFIX}' images (official layout: NAME{IMAGE_SUFFIX} + NAME{MASK_SUFFIX})"
        )
    _check_writable(out, is_folder=True)
    device_from_option(args.device)  # refused here in one line naming --device
    ranks = launched_ranks(args.device)
    editor = _build_editor(args, ranks.device)
    tag = _settings(args, editor)
    outputs = args.command != "check"

    def output_of(name: str):
        return out / f"{name}{IMAGE_SUFFIX}" if outputs else None

    try:
        ledger = Ledger(out, ranks)
        previous = ledger.start()["manifest"]
    except OSError as err:
        raise CliError(
            f"--out {out}: cannot write there ({err.strerror or one_line(err)})"
        ) from err
    done = finished_rows(previous, tag, output_of)
    damaged = {}
    for name, row in list(done.items()):  # resume trusts only outputs that check out
        problem = _damage(row, _outputs_of(args, out, name))
        if problem is not None:
            damaged[name] = problem
            del done[name]
    todo = [p for p in pairs if p[0] not in done]
    skipped = 0
    if ranks.main:
        for name, problem in damaged.items():
            print(f"runtime-backdoor: redoing {name}: {problem}", file=sys.stderr)
        for name, problem in problems:
            skipped += 1
            print(f"runtime-backdoor: skipped {name}: {problem}", file=sys.stderr)
            ledger.record(
                manifest=pd.DataFrame([{"name": name, "status": "skipped", "error": problem}])
            )
    for name, image, mask in tqdm(
        ranks.share(todo), desc=args.command, disable=args.quiet or not ranks.main
    ):
        row = {"name": name, "settings": tag, "status": "done", "image": str(image)}
        try:
            row |= _flat(_folder_item(args, editor, ranks.device, name, image, mask, compare))
        except (CliError, ValueError, FileNotFoundError, RuntimeError) as err:
            if isinstance(err, CliError) and str(err).startswith("--out"):
                raise  # the output folder, not this pair: stop
            skipped += 1
            row = {"name": name, "status": "skipped", "error": one_line(err)}
            print(f"runtime-backdoor: skipped {name}: {row['error']}", file=sys.stderr)
        ledger.record(manifest=pd.DataFrame([row]))
        _emit(json.dumps(row))
    new = ledger.collect()
    if ranks.main:
        rows = done | {r["name"]: r for r in new["manifest"].to_dict("records")}
        order = sorted(rows, key=lambda n: n)
        manifest = pd.DataFrame([rows[n] for n in order])
        write_csv(out / "manifest.csv", manifest)
        n_skipped = int((manifest.get("status") == "skipped").sum())
        summary = {
            "manifest": str(out / "manifest.csv"),
            "computed": int((new["manifest"].get("status") == "done").sum())
            if len(new["manifest"])
            else 0,
            "resumed": len(done),
            "redone_damaged": len(damaged),
            "skipped": n_skipped,
        }
        if "verdict" in manifest:
            verdicts = manifest["verdict"].dropna()
            summary["verdicts"] = {v: int((verdicts == v).sum()) for v in VERDICTS if (verdicts == v).any()}  # fmt: skip
        if args.command == "protect" and isinstance(editor, dict):
            summary["verdicts_per_editor"] = {}
            for each in editor:
                column = manifest.get(f"verdict/{each}", pd.Series(dtype=object))
                counts = {v: int((column == v).sum()) for v in VERDICTS}
                summary["verdicts_per_editor"][each] = {v: n for v, n in counts.items() if n}
        _emit(json.dumps(summary))
        skipped = max(skipped, n_skipped)
    ledger.close()
    # Under a launcher a non-zero status makes torch's elastic agent print its own traceback
    # report: there the summary line and the manifest say what was skipped.
    return 1 if skipped and ranks.count == 1 else 0


def _folder_item(args, editor, device, name, image, mask, compare) -> dict:
    x, m, target = _read_inputs(args, image, mask)
    out = args.out / f"{name}{IMAGE_SUFFIX}"
    if args.command == "check":
        return _check_one(args, editor, x, m, target, device)
    if args.command == "protect":
        report, result = _protect_one(args, editor, x, m, target, device)
        report["final_losses"] = json.dumps(report["final_losses"])
        if "editor_weights" in report:
            report["editor_weights"] = json.dumps(report["editor_weights"])
    else:
        original = None
        if compare is not None:
            original, _, _ = _read_inputs(args, compare / f"{name}{IMAGE_SUFFIX}", mask)
        report, result, panel = _edit_one(args, editor, x, m, target, device, original)
        if panel is not None:
            write_output(args.out / f"{name}_compare.png", panel, True)
    # The mask goes along, so that the output folder is in the official layout too.
    write_output(args.out / f"{name}{MASK_SUFFIX}", m[0, 0].numpy() > 0.5, True)
    write_output(out, result, True)
    if args.command == "protect":
        report |= _verify(args, editor, x, m, target, device, out, report["expand"])
    # A resumed run compares the output with this hash: a damaged file is redone.
    return _verdict_first({"out": str(out), **report, "out_sha256": _sha256(out)})


# ------------------------------------------------------------------------------- main


def _quiet_stdout() -> None:
    # Python flushes stdout once more on exit; point it at /dev/null so that the closed
    # pipe does not produce a second error there.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _emit(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) does not stop the work."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _quiet_stdout()


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
            return _folder(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CliError("several processes need a folder of images, not one image")
        report = _single(args)
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
