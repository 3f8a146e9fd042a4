"""The work of ``runtime-backdoor protect``, ``check`` and ``edit``: one image, or a folder.

:func:`run_single` does one image and returns its report; :func:`run_folder` does every
``NAME_example.png`` + ``NAME_example_mask.png`` pair of a folder: one output per image, a
``manifest.csv``, a resumed run that redoes only what is missing, damaged or made with other
settings, bad pairs skipped while the others go on, and the images shared between the
processes of a launcher (:mod:`runtime_backdoor.launch`). The command line itself (options,
dispatch, one-line errors) is :mod:`runtime_backdoor.cli`; the owner's actions, which the
demo calls too, are :mod:`runtime_backdoor.owner`.

Editors travel as ``{name: editor}`` in ``--editor``'s order: one editor is an ensemble of one,
and only the report's shape (flat for one, ``per_editor`` for several) tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from .owner import (
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
    protect_image,
    read_inputs,
    verify_editors,
    write_output,
)

# the official layout (as runtime_backdoor.data names it; data imports torch, which the command
# line loads only once an image has passed its checks)
IMAGE_SUFFIX, MASK_SUFFIX = "_example.png", "_example_mask.png"

# ------------------------------------------------------------------------------- output


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


# ------------------------------------------------------------------------------- editors


def _build_editor(args, device) -> dict:
    """``{name: editor}`` in ``--editor``'s order (one name: an ensemble of one)."""
    if len(args.editors) == 1:
        return {args.editor: load_editor(args.editor, args.weights, device)}
    editors, count = {}, len(args.editors)
    for i, (name, weights) in enumerate(zip(args.editors, args.weights_of, strict=True)):
        try:
            editors[name] = load_editor(name, weights, device)
        except CliError as err:
            raise _entry_error(err, name, weights, i, count) from err
    return editors


def _entry_error(err: CliError, name: str, weights, i: int, count: int) -> CliError:
    """load_editor speaks of one editor's --weights: say which entry is meant, first, as long
    messages are cut at the end."""
    text = str(err)
    needs = f"--editor {name} needs --weights: "
    if text.startswith(needs):
        return CliError(
            f"--editor {name} needs its --weights entry ({i + 1} of {count}, "
            f"comma-separated in --editor's order): {text.removeprefix(needs)}"
        )
    if weights is None:
        return err
    text = text.removeprefix(f"--weights {weights}: ")
    text = text.replace("drop --weights", "leave its entry empty")
    return CliError(f"--weights entry {i + 1} of {count} ({weights}, for {name}): {text}")


def _who(editors: dict) -> dict:
    """Each editor as named in messages about what it returned."""
    return {name: f"--editor {name}" for name in editors}


def _only(editors: dict, value: dict):
    """``value``'s one entry for a single editor (the single-editor call and report), else
    ``value`` itself."""
    return next(iter(value.values())) if len(editors) == 1 else value


# ------------------------------------------------------------------------------- checks


def _check_options(args) -> None:
    check_options(getattr(args, "expand", None), args.threshold, getattr(args, "target", "solid"))
    if args.command in ("protect", "check"):
        from .views import settings_of

        settings_of(args)  # --view and its sizes, before any work


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


# ------------------------------------------------------------------------------- one image


def _view_path(args, m) -> bool:
    """Whether the image goes through the attacker's views (:mod:`runtime_backdoor.views`):
    above the crop trigger, or with ``--view`` naming one; an image the tool runs whole
    keeps the whole-image path, bit for bit."""
    from .views import settings_of, tool_pipelines

    s = settings_of(args)
    h, w = m.shape[-2:]
    return s.view != "auto" or tool_pipelines(h, w, s) != ["original"]


def _numpy(x, m):
    """The photo (H x W x 3 float32, sharing x's memory) and its mask (H x W bool)."""
    return x[0].permute(1, 2, 0).numpy(), m[0, 0].numpy() > 0.5


def _protect_one(args, editors: dict, x, m, target, device) -> tuple[dict, object]:
    """protect's report and result: one perturbation against all the editors (on the view the
    attacker's tool would show the model, for a photo above the crop trigger)."""
    common = {
        "eps": args.eps,
        "steps": args.steps,
        "expand": args.expand,
        "seed": args.seed,
        "progress": not args.quiet and not args.image.is_dir(),
        "name": _only(editors, _who(editors)),
        "editor_weights": args.editor_weights if len(editors) > 1 else None,
    }
    if _view_path(args, m):
        from .views import protect_view, settings_of

        image, mask = _numpy(x, m)
        report, protected = protect_view(
            _only(editors, editors), image, mask, target, device, settings=settings_of(args),
            **common,
        )  # fmt: skip
    else:
        report, protected = protect_image(_only(editors, editors), x, m, target, device, **common)
    return {"editor": args.editor, **report}, protected


def _verify(args, editors: dict, x, m, target, device, out: Path, expand: int, report=None) -> dict:
    """protect's verdict on the PNG it wrote (``--no-verify``: none); for an ensemble one per
    editor and the ensemble's (:data:`runtime_backdoor.owner.ENSEMBLE_RULE`); for a view
    (``report["view"]``), one per attacker pipeline (:func:`runtime_backdoor.views.verify_pipelines`)."""
    if args.no_verify:
        per_editor = {n: {"verdict": UNVERIFIED} for n in editors}
        return {"verdict": UNVERIFIED} | ({"per_editor": per_editor} if len(editors) > 1 else {})
    if report is not None and "view" in report:
        from .views import settings_of, verify_pipelines

        image, mask = _numpy(x, m)
        return verify_pipelines(
            editors,
            image,
            mask,
            target,
            device,
            out,
            settings=settings_of(args),
            expand=expand,
            protected_view=report["view"],
            target_rgb=report.get("target_rgb"),
            name=_who(editors),
        )
    return verify_editors(editors, x, m, target, device, out, expand=expand, name=_who(editors))


def _check_one(args, editors: dict, x, m, target, device) -> dict:
    """check's estimate for each editor: they do not add up, so an ensemble gets each one's."""
    if _view_path(args, m):
        from .views import check_view, settings_of

        image, mask = _numpy(x, m)
        reports = check_view(
            editors, image, mask, target, device, settings=settings_of(args), eps=args.eps,
            name={n: f"--editor {n}" for n in editors},
        )  # fmt: skip
    else:
        reports = {
            name: check_image(each, x, m, target, device, eps=args.eps, name=f"--editor {name}")
            for name, each in editors.items()
        }
    if len(reports) == 1:
        return {"editor": args.editor, **_only(editors, reports)}
    per_editor = {n: {k: v for k, v in r.items() if k != "eps"} for n, r in reports.items()}
    return {"editor": args.editor, "eps": args.eps, "per_editor": per_editor}


def _edit_one(args, editors: dict, x, m, target, device, original=None):
    ((name, editor),) = editors.items()  # edit takes one editor, as an attacker does
    report, edited, panel = edit_image(
        editor, x, m, target, device, original, expand=args.expand, name=f"--editor {name}"
    )
    return {"editor": args.editor, **report}, edited, panel


def _verdict_first(report: dict) -> dict:
    """The report with its verdict first, where a reader looks."""
    head = {k: report[k] for k in ("out", "verdict", "verdict_detail") if k in report}
    return head | report


def compare_path(out: Path) -> Path:
    """Where ``edit --compare`` writes the labelled comparison next to ``out``."""
    return out.with_name(out.stem + "_compare.png")


def _single_checks(args) -> None:
    """Everything about one image's options and files that can be refused before any work."""
    if args.mask is None:
        raise CliError(f"--mask is required for the image {args.image} (or give a folder)")
    _check_options(args)
    compare = getattr(args, "compare", None)
    # Sizes from the files' headers, before torch is even imported.
    for path, what in ((args.image, "image"), (args.mask, "mask")):
        check_pixels(path, what, args.max_pixels)
    if compare is not None:
        check_pixels(compare, "--compare image", args.max_pixels)
    if args.command in ("protect", "edit"):
        _check_out_file(args, (args.image, args.mask, compare))
    if compare is not None:
        panel = compare_path(args.out)
        if panel.exists() and not args.overwrite:
            raise CliError(f"{panel} (the --compare panel) exists; pass --overwrite to replace it")


def run_single(args) -> dict:
    """``protect``, ``check`` or ``edit`` of one image: its report (the JSON the command prints)."""
    _single_checks(args)
    device = device_from_option(args.device)
    x, m, target = _read_inputs(args, args.image, args.mask)
    editors = _build_editor(args, device)
    if args.command == "check":
        return _check_one(args, editors, x, m, target, device)
    if args.command == "protect":
        report, protected = _protect_one(args, editors, x, m, target, device)
        write_output(args.out, protected, args.overwrite)
        report |= _verify(args, editors, x, m, target, device, args.out, report["expand"], report)
        return _verdict_first({"out": str(args.out), **report})
    original = None
    if args.compare is not None:
        original, _, _ = _read_inputs(args, args.compare, args.mask)
    report, edited, panel = _edit_one(args, editors, x, m, target, device, original)
    write_output(args.out, edited, args.overwrite)
    report = {"out": str(args.out), **report}
    if panel is not None:
        write_output(compare_path(args.out), panel, args.overwrite)
        report["compare"] = str(compare_path(args.out))
    return _verdict_first(report)


# ------------------------------------------------------------------------------- folders


def _folder_pairs(folder: Path) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, str]]]:
    """``(name, image, mask)`` of every complete pair, and ``(name, problem)`` of the others
    (:func:`runtime_backdoor.data.scan_pairs`); ``NAME_example_example.png`` is skipped."""
    from .data import scan_pairs

    pairs, problems = scan_pairs(folder)
    return [p for p in pairs if not p[0].endswith("_example")], problems


_SETTINGS = ("command", "eps", "steps", "seed", "target", "expand", "threshold", "compare", "no_verify")  # fmt: skip


def _settings(args, editors: dict) -> str:
    """The hash a resumed run compares: an output made with other settings is redone."""
    from .launch import code_hash, editor_fingerprint, settings_hash

    options = {k: str(v) for k, v in vars(args).items() if k in _SETTINGS}
    if args.command in ("protect", "check"):
        from .views import ViewSettings, settings_of

        views = settings_of(args)
        if views != ViewSettings():  # other views redo; the defaults keep earlier hashes
            options["views"] = str(views)
    if len(editors) == 1:
        (editor,) = editors.values()
        return settings_hash(
            {"editor": editor_fingerprint(editor), "code": code_hash(editor), **options}
        )
    # Every editor in its order (their losses are summed in it) and their loss weights:
    # an output made against another ensemble is redone.
    fingerprints = [f"{name}:{editor_fingerprint(e)}" for name, e in editors.items()]
    codes = [code_hash(e) for e in editors.values()]
    weights = getattr(args, "editor_weights", None) or [1.0] * len(editors)  # as used
    options["editor_weights"] = str([float(w) for w in weights])
    return settings_hash({"editor": fingerprints, "code": codes, **options})


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


def _folder_checks(args) -> None:
    """A folder's options, refused in one line before any work."""
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


def _check_manifest(out: Path) -> None:
    """Refuse, in one line naming the file, a ``manifest.csv`` in ``out`` (or a killed run's
    part of one) that pandas cannot read as a CSV table (binary bytes, ragged rows, empty)."""
    import pandas as pd

    for path in [out / "manifest.csv", *sorted((out / ".parts").glob("manifest.rank*.csv"))]:
        if not path.is_file():
            continue
        try:
            pd.read_csv(path)
        except (ValueError, pd.errors.ParserError) as err:  # EmptyDataError, UnicodeDecodeError
            reason = one_line(err, 200).removeprefix("Error tokenizing data. ")
            raise CliError(
                f"{path}: not a CSV table ({reason}); it lists the images --out already "
                "holds: rename or remove it, and every image is done again"
            ) from None


def _resume(args, previous, tag: str) -> tuple[dict, dict]:
    """The rows of the ``previous`` manifest finished with these settings whose outputs check
    out, and ``{name: problem}`` of those to redo (a resume trusts only outputs that do)."""
    from .launch import finished_rows

    out = args.out
    with_outputs = args.command != "check"
    done = finished_rows(previous, tag, lambda n: out / f"{n}{IMAGE_SUFFIX}" if with_outputs else None)  # fmt: skip
    damaged = {}
    for name, row in list(done.items()):
        problem = _damage(row, _outputs_of(args, out, name))
        if problem is not None:
            damaged[name] = problem
            del done[name]
    return done, damaged


def _work(args, editors: dict, ranks, ledger, todo, tag: str) -> int:
    """Every pair of ``todo`` this process's share holds, one manifest row and one JSON line
    each; the number of pairs skipped."""
    import pandas as pd
    from tqdm.auto import tqdm

    skipped, compare = 0, getattr(args, "compare", None)
    for name, image, mask in tqdm(
        ranks.share(todo), desc=args.command, disable=args.quiet or not ranks.main
    ):
        row = {"name": name, "settings": tag, "status": "done", "image": str(image)}
        try:
            row |= _flat(_folder_item(args, editors, ranks.device, name, image, mask, compare))
        except (CliError, ValueError, FileNotFoundError, RuntimeError) as err:
            if isinstance(err, CliError) and str(err).startswith("--out"):
                raise  # the output folder, not this pair: stop
            skipped += 1
            row = {"name": name, "status": "skipped", "error": one_line(err)}
            print(f"runtime-backdoor: skipped {name}: {row['error']}", file=sys.stderr)
        ledger.record(manifest=pd.DataFrame([row]))
        _emit(json.dumps(row))
    return skipped


def _summary(args, editors: dict, manifest, new, done: dict, damaged: dict) -> dict:
    """The last JSON line of a folder run: what was computed, resumed, redone and skipped."""
    import pandas as pd

    computed = new["manifest"]
    summary = {
        "manifest": str(args.out / "manifest.csv"),
        "computed": int((computed.get("status") == "done").sum()) if len(computed) else 0,
        "resumed": len(done),
        "redone_damaged": len(damaged),
        "skipped": int((manifest.get("status") == "skipped").sum()),
    }
    if "verdict" in manifest:
        verdicts = manifest["verdict"].dropna()
        summary["verdicts"] = {v: int((verdicts == v).sum()) for v in VERDICTS if (verdicts == v).any()}  # fmt: skip
    if args.command == "protect" and len(editors) > 1:
        summary["verdicts_per_editor"] = {}
        for each in editors:
            column = manifest.get(f"verdict/{each}", pd.Series(dtype=object))
            counts = {v: int((column == v).sum()) for v in VERDICTS}
            summary["verdicts_per_editor"][each] = {v: n for v, n in counts.items() if n}
    return summary


def run_folder(args) -> int:
    """Every pair of a folder: one output per image, a manifest, resume, bad pairs skipped.
    Returns the exit status: 1 when pairs were skipped (by a single process), else 0."""
    import pandas as pd

    from .data import write_csv
    from .launch import Ledger, launched_ranks

    folder, out = args.image, args.out
    _folder_checks(args)
    pairs, problems = _folder_pairs(folder)
    if not pairs and not problems:
        raise CliError(
            f"{folder}: no '*{IMAGE_SUFFIX}' images (official layout: NAME{IMAGE_SUFFIX} + NAME{MASK_SUFFIX})"
        )
    _check_writable(out, is_folder=True)
    _check_manifest(out)  # before an editor is loaded: a resume must be able to read it
    device_from_option(args.device)  # refused here in one line naming --device
    ranks = launched_ranks(args.device)
    editors = _build_editor(args, ranks.device)
    tag = _settings(args, editors)
    try:
        ledger = Ledger(out, ranks)
        previous = ledger.start()["manifest"]
    except OSError as err:
        raise CliError(
            f"--out {out}: cannot write there ({err.strerror or one_line(err)})"
        ) from err
    done, damaged = _resume(args, previous, tag)
    skipped = 0
    if ranks.main:
        for name, problem in damaged.items():
            print(f"runtime-backdoor: redoing {name}: {problem}", file=sys.stderr)
        for name, problem in problems:
            skipped += 1
            print(f"runtime-backdoor: skipped {name}: {problem}", file=sys.stderr)
            ledger.record(manifest=pd.DataFrame([{"name": name, "status": "skipped", "error": problem}]))  # fmt: skip
    skipped += _work(args, editors, ranks, ledger, [p for p in pairs if p[0] not in done], tag)
    new = ledger.collect()
    if ranks.main:
        rows = done | {r["name"]: r for r in new["manifest"].to_dict("records")}
        manifest = pd.DataFrame([rows[n] for n in sorted(rows)])
        write_csv(out / "manifest.csv", manifest)
        summary = _summary(args, editors, manifest, new, done, damaged)
        _emit(json.dumps(summary))
        skipped = max(skipped, summary["skipped"])
    ledger.close()
    # Under a launcher a non-zero status makes torch's elastic agent print its own traceback
    # report: there the summary line and the manifest say what was skipped.
    return 1 if skipped and ranks.count == 1 else 0


def _folder_item(args, editors: dict, device, name, image, mask, compare) -> dict:
    x, m, target = _read_inputs(args, image, mask)
    out = args.out / f"{name}{IMAGE_SUFFIX}"
    if args.command == "check":
        return _check_one(args, editors, x, m, target, device)
    if args.command == "protect":
        report, result = _protect_one(args, editors, x, m, target, device)
        report["final_losses"] = json.dumps(report["final_losses"])
        if "editor_weights" in report:
            report["editor_weights"] = json.dumps(report["editor_weights"])
    else:
        original = None
        if compare is not None:
            original, _, _ = _read_inputs(args, compare / f"{name}{IMAGE_SUFFIX}", mask)
        report, result, panel = _edit_one(args, editors, x, m, target, device, original)
        if panel is not None:
            write_output(args.out / f"{name}_compare.png", panel, True)
    # The mask goes along, so that the output folder is in the official layout too.
    write_output(args.out / f"{name}{MASK_SUFFIX}", m[0, 0].numpy() > 0.5, True)
    write_output(out, result, True)
    if args.command == "protect":
        report |= _verify(args, editors, x, m, target, device, out, report["expand"], report)
    # A resumed run compares the output with this hash: a damaged file is redone.
    return _verdict_first({"out": str(out), **report, "out_sha256": _sha256(out)})
