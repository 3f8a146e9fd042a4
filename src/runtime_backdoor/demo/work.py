"""The demo page's work, without Gradio: the editors on offer, the uploads read as ``protect``
reads them, ``check`` and ``protect`` through :mod:`runtime_backdoor.owner`. Every failure is
a one-line error for the page. One editor is an ensemble of one: the same code runs for one
editor ticked or several, and only the texts shown differ (:func:`.views.protect_texts`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import owner, weights
from ..editors import EDITORS
from ..weights import weight_paths
from .views import (
    DISPLAY_SIDE,
    PAINT_COLOUR,
    PAINT_OPACITY,
    WORKSPACE_PREFIX,
    PageError,
    ensemble_verdict_text,
    overlay,
    page_message,
    painted_region,
    protect_texts,
    to_display,
    verdict_text,
)


@dataclass(frozen=True)
class EditorChoice:
    label: str  #: what the page shows (unique)
    name: str  #: the registry name (``runtime-backdoor editors``)
    weights: Path | None = None


#: registry editors without weights that the page offers to everybody (the others need a
#: file in models/): the sensitive toy, to see protection work, and the insensitive fill
WITHOUT_WEIGHTS = ("toy-control", "blur-fill")
#: what the page says of the trained miniature (docs: gain 2-5 where about 20 is needed)
MINIATURE_NOTE = " (too insensitive: protection does not trigger on it)"


def _is_there(key: str, path: Path) -> bool:
    """Whether the weights ``key`` (``""``: the pipeline's miniature) lie complete at ``path``."""
    if not key:
        return path.is_file()
    spec = weights.REGISTRY[key]
    marker = {"zip": path / spec.check, "hub": path / "model_index.json"}.get(spec.kind, path)
    return marker.is_file()


def available_editors(
    models: Path | None = None, editor: str | None = None, weights_path: Path | None = None
) -> list[EditorChoice]:
    """What the page offers, the default first: ``editor`` (``--editor``), then every real
    editor whose weights are in ``models`` (where ``runtime-backdoor weights fetch`` puts
    them), then the toy control (labelled a toy), blur-fill, and last the trained miniature,
    which protection does not trigger on."""
    root = Path(models) if models is not None else weights.models_dir()
    found = [
        (name, key, path)
        for name in EDITORS
        for key, path in weight_paths(name, root)
        if _is_there(key, path)
    ]
    choices = []
    if editor is not None:
        where = f" ({weights_path})" if weights_path is not None else ""
        choices.append(EditorChoice(f"{editor}{where}", editor, weights_path))
    choices += [EditorChoice(f"{n}: {k} ({p})", n, p) for n, k, p in found if k]
    choices += [EditorChoice(f"{n}: {EDITORS[n].title}", n) for n in WITHOUT_WEIGHTS]
    choices += [
        EditorChoice(f"{n}: {EDITORS[n].title}{MINIATURE_NOTE}", n, p) for n, k, p in found if not k
    ]
    unique = {(c.name, c.weights): c for c in reversed(choices)}  # the first of duplicates wins
    return [c for c in choices if unique[(c.name, c.weights)] is c]


@contextlib.contextmanager
def workspace():
    """A temporary folder for everything the app writes (Gradio's uploads and cache too)."""
    folder = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def _whole(value, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PageError(f"{name} must be a whole number, got {value!r}") from None
    if not low <= number <= high or number != int(number):  # range first: int(inf) raises
        raise PageError(f"{name} must be a whole number in [{low}, {high}], got {value}")
    return int(number)


@dataclass
class Inputs:
    x: object  #: (1, 3, H, W) tensor, as `protect` reads it
    m: object  #: (1, 1, H, W)
    target: object
    image: Path
    mask: Path
    mask_note: str


def _mask_layer(path: Path, size: tuple[int, int], shown: tuple[int, int]):
    """A mask file as a paint layer of the shown size (None if unreadable: the verdict says
    what is wrong with it)."""
    from PIL import Image

    from ..data import read_mask

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            region = read_mask(path)
    except Exception:
        return None
    if region.shape != size:
        return None
    region = Image.fromarray(region.astype(np.uint8) * 255)
    region = np.asarray(region.resize(shown[::-1], Image.Resampling.NEAREST)) > 127
    layer = np.zeros((*shown, 4), np.uint8)
    layer[region] = (*bytes.fromhex(PAINT_COLOUR[1:]), round(255 * PAINT_OPACITY))
    return layer


def _image_note(path: Path, image: np.ndarray, shown: np.ndarray, caught) -> str:
    """What the page says of an uploaded image: its size, how it is shown, what it becomes."""
    h, w = image.shape[:2]
    note = f"{path.name}: {w}×{h} px."
    if shown.shape[:2] != (h, w):
        note += (
            f" Shown at {shown.shape[1]}×{shown.shape[0]} for painting; the protection uses "
            f"all {w}×{h} pixels (a painted region is scaled up to that size), which takes "
            "longer, above all on a CPU."
        )
    if path.suffix.lower() in (".jpg", ".jpeg"):
        note += " The protected copy is a PNG (lossless); saving it as JPEG would weaken it."
    return note + "".join(f" {c.message}" for c in caught)


def preview(image_file, mask_file, max_pixels: int, folder: Path):
    """:meth:`Demo.preview`: the canvas's value, the note, the kernel, the drawn mask."""
    from ..data import read_image

    if not image_file:
        raise PageError("upload an image (PNG or JPEG)")
    path = Path(image_file)
    owner.check_pixels(path, "image", max_pixels)  # from the header, before decoding
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path)
    h, w = image.shape[:2]
    shown = to_display(image)
    note = _image_note(path, image, shown, caught)
    value = {"background": shown, "layers": [], "composite": None}
    drawn = None
    if mask_file:
        owner.check_pixels(Path(mask_file), "mask", max_pixels)
        layer = _mask_layer(Path(mask_file), (h, w), shown.shape[:2])
        if layer is not None:
            note += " The uploaded mask is drawn on the image and used as it is."
            drawn = overlay(shown, layer)
            k = max(1, DISPLAY_SIDE // 2 // max(drawn.shape[:2]))  # small: whole pixels
            drawn = np.repeat(np.repeat(drawn, k, axis=0), k, axis=1)
    kernel = owner.auto_expand(h, w)
    note += f" Expansion kernel {kernel} px (scaled with the image: 17 at 512 px)."
    return value, page_message(PageError(note), folder), kernel, drawn


def read_page_inputs(image_file, mask_file, painted, folder: Path, max_pixels: int) -> Inputs:
    """:meth:`Demo.inputs`: an uploaded mask file as it is, else the painted region, written
    as a PNG in ``folder``; then both read as ``protect`` reads them."""
    from PIL import Image

    if not image_file:
        raise PageError("upload an image (PNG or JPEG)")
    image = Path(image_file)
    owner.check_pixels(image, "image", max_pixels)
    if mask_file:
        mask, note = Path(mask_file), f"the uploaded file {Path(mask_file).name}"
    else:
        try:
            with Image.open(image) as im:
                size = im.size
        except Exception as err:
            raise PageError(f"{image.name}: cannot read this image ({err})") from err
        region = painted_region(painted, size)
        if region is None:
            raise PageError("paint the region to protect (brush) or upload a mask")
        mask, note = folder / "painted_mask.png", "the painted region"
        owner.write_output(mask, region, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # `preview` has said what concerns the image
        x, m, target = owner.read_inputs(image, mask, max_pixels=max_pixels)
    share = float(m.mean())
    return Inputs(x, m, target, image, mask, f"{note}, {share:.1%} of the image")


def _write(got: Inputs, folder: Path, protected) -> tuple[Path, Path]:
    """The protected PNG and the mask in ``folder``, as the page offers them."""
    out = folder / f"{got.image.stem}_protected.png"
    owner.write_output(out, protected, overwrite=False)
    mask = folder / f"{got.image.stem}_mask.png"
    if got.mask != mask:
        shutil.copyfile(got.mask, mask)
    return out, mask


def _panels(got: Inputs, protected) -> dict:
    """Original, protected and δ ×AMPLIFY as shown (small images enlarged)."""
    from .views import AMPLIFY, SMALL_SIDE

    original = owner.eight_bit(got.x[0])
    k = max(1, SMALL_SIDE // max(original.shape[:2]))
    delta = np.clip(0.5 + AMPLIFY * (protected - original), 0, 1)
    return {
        "original": to_display(original, enlarge=k),
        "protected": to_display(protected, enlarge=k),
        "delta": to_display(delta, enlarge=k),
    }


def protect_on_page(demo: Demo, editors: dict, got: Inputs, folder: Path, options: dict) -> dict:
    """:meth:`Demo.protect`'s work for ``editors`` (name -> editor; one is an ensemble of
    one): check each, protect once against all, write, then edit the PNG as written with
    each editor as ``edit --compare`` does. ``options``: eps, steps, seed, expand."""
    device, only = demo.device, len(editors) == 1
    who = {name: f"editor {name}" for name in editors}
    checks = {
        name: owner.check_image(
            editor, got.x, got.m, got.target, device, eps=options["eps"], name=who[name]
        )  # fmt: skip
        for name, editor in editors.items()
    }
    report, protected = owner.protect_image(
        next(iter(editors.values())) if only else editors, got.x, got.m, got.target, device,
        progress=True, name=next(iter(who.values())) if only else who, **options,
    )  # fmt: skip
    out, mask = _write(got, folder, protected)
    # The edits run on the file as published, read back as `edit` reads it.
    published, m, _ = owner.read_inputs(out, mask, max_pixels=demo.max_pixels)
    per_editor, figures = {}, {}
    for name, editor in editors.items():
        per_editor[name], _, figures[name] = owner.edit_image(
            editor, published, m, got.target, device, original=got.x,
            expand=report["expand"], name=who[name],
        )  # fmt: skip
    command = (
        f"runtime-backdoor protect {got.image.name} --mask {mask.name} --editor "
        f"{','.join(editors)} --eps {options['eps']:.6g} --steps {options['steps']} --seed "
        f"{options['seed']} --expand {report['expand']} --out {out.name}"
    )
    texts = protect_texts(report, per_editor, figures, checks, got.mask_note, command)
    return _panels(got, protected) | texts | {"file": out, "mask": mask, "folder": folder}


class Editors:
    """The editors on offer (label -> :class:`EditorChoice`), built when first used."""

    def __init__(self, choices: list[EditorChoice]):
        self.choices = {c.label: c for c in choices}
        self._editors: dict[str, object] = {}

    def _known(self, label) -> None:
        if label not in self.choices:
            known = "; ".join(self.choices)
            raise PageError(f"unknown editor {label!r}; choose one of: {known}")

    def editor(self, label: str, keep: int = 2):
        """The editor of a choice, built once (the last ``keep`` used are kept)."""
        self._known(label)
        editor = self._editors.pop(label, None)
        if editor is None:
            choice = self.choices[label]
            editor = owner.load_editor(choice.name, choice.weights, self.device)
        self._editors = dict(list(self._editors.items())[1 - keep :]) | {label: editor}
        return editor

    def labels(self, label) -> list[str]:
        """The choices asked for: one label, or a list of them (an ensemble; repeats dropped).
        Two choices of one editor (two weight files) are refused: verdicts go by name."""
        labels = [label] if isinstance(label, str) else list(dict.fromkeys(label or ()))
        if not labels:
            raise PageError("choose an editor to protect against")
        for each in labels:
            self._known(each)
        names = [self.choices[each].name for each in labels]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise PageError(f"{twice} is chosen twice (two weight files); choose one of them")
        return labels

    def editors(self, labels: list[str]) -> dict:
        """``{name: editor}`` of the choices ``labels``, all kept while they are in use."""
        keep, editors = max(2, len(labels)), {}
        for label in labels:
            editor = self.editor(label, keep)  # an unknown label is refused here, in words
            editors[self.choices[label].name] = editor
        return editors


class Demo(Editors):
    """The page's work, without Gradio: every method raises one-line errors."""

    def __init__(
        self,
        choices: list[EditorChoice],
        folder: Path,
        device: str = "auto",
        max_pixels: int = owner.DEFAULT_MAX_PIXELS,
    ):
        super().__init__(choices)
        self.folder = Path(folder)
        self.device = owner.device_from_option(device)
        self.max_pixels = max_pixels

    def run_folder(self) -> Path:
        folder = self.folder / f"run-{uuid.uuid4().hex[:12]}"
        folder.mkdir(parents=True)
        return folder

    def preview(self, image_file, mask_file=None) -> tuple[dict, str, int, np.ndarray | None]:
        """The painting canvas's value (the image, downscaled if large); a note saying what is
        done; the expansion kernel scaled with the size; and, for an uploaded mask, the image
        with the mask drawn on it in the paint colour (None without one), which the page shows
        in place of the canvas."""
        return preview(image_file, mask_file, self.max_pixels, self.folder)

    def inputs(self, image_file, mask_file, painted, folder: Path) -> Inputs:
        """Image and mask as `protect` reads them: an uploaded mask file as it is, else the
        painted region, written as a PNG in ``folder``."""
        return read_page_inputs(image_file, mask_file, painted, folder, self.max_pixels)

    def check(self, image_file, mask_file, painted, label, eps) -> str:
        """``check``'s verdict (Markdown); ``label`` a list: each editor's."""
        eps = owner.parse_eps(eps)
        labels = [label] if isinstance(label, str) else self.labels(label)
        folder = self.run_folder()
        try:
            got = self.inputs(image_file, mask_file, painted, folder)
            reports = {
                name: owner.check_image(
                    e, got.x, got.m, got.target, self.device, eps=eps, name=f"editor {name}"
                )  # fmt: skip
                for name, e in self.editors(labels).items()
            }
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if len(reports) == 1:
            ((name, report),) = reports.items()
            return verdict_text(report, name, got.mask_note)
        return ensemble_verdict_text(reports, got.mask_note)

    def protect(self, image_file, mask_file, painted, label, eps, steps, seed, expand) -> dict:
        """Protect, then edit the original and the protected file as ``edit --compare`` does.

        Returns the page's panels (uint8 arrays), texts (the verdict replaces check's
        prediction) and the paths of the protected PNG and the mask, in a fresh folder of the
        workspace (removed at once if anything fails). ``expand`` 0: scaled with the image.
        ``label`` a list of choices: one perturbation against all of them (``protect --editor
        A,B``); ``numbers`` is then :func:`runtime_backdoor.owner.ensemble_report`'s, and the
        comparison holds each editor's figure, one above the other.
        """
        options = {
            "eps": owner.parse_eps(eps),
            "steps": _whole(steps, "steps", 1, 10000),
            "seed": _whole(seed, "seed", 0, 2**63 - 1),
            "expand": _whole(expand, "expansion kernel", 0, 255) or None,
        }
        owner.check_options(options["expand"], 0.5, "solid")
        folder = self.run_folder()
        try:
            got = self.inputs(image_file, mask_file, painted, folder)
            labels = [label] if isinstance(label, str) else self.labels(label)
            return protect_on_page(self, self.editors(labels), got, folder, options)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
