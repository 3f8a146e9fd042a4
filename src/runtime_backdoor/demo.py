"""``runtime-backdoor demo``: the owner's commands on one browser page (Gradio).

Upload an image, paint the region to protect (or upload a mask), pick an editor and ε, read
``check``'s verdict, protect, compare the edits of the original and the protected image,
download the protected PNG. Every step calls the functions ``runtime-backdoor check``,
``protect`` and ``edit --compare`` call (:mod:`runtime_backdoor.owner`), so the download is,
byte for byte, what ``protect`` writes for the same files, settings and seed.

After protecting, the page replaces ``check``'s prediction with the verdict ``protect`` gives
(:func:`runtime_backdoor.owner.compare_edits` on the PNG as written) and shows the labelled
comparison ``edit --compare`` writes. Several editors chosen at once are one perturbation
against all of them (``protect --editor A,B``): the page gives each editor's prediction, then
each editor's verdict, comparison and numbers, and the ensemble's verdict
(:data:`runtime_backdoor.owner.ENSEMBLE_RULE`).

The app serves this machine only (no share link, no analytics, no font or script from the
internet), refuses requests from other origins (a page elsewhere cannot drive it) and
uploads over :data:`MAX_UPLOAD_BYTES`, refuses images over ``max_pixels`` from their header,
runs one request at a time (others wait in a queue) and writes nothing outside one
temporary folder, which is removed when it stops. Gradio is imported only here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import owner, weights
from .editors import EDITORS, weight_paths

DISPLAY_SIDE = 768  # px: larger images are shown downscaled (never protected downscaled)
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # an upload (image or mask) larger than this is refused
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + (1 << 20)  # any request body: an upload and its form
SMALL_SIDE = 256  # px: smaller images' results are shown enlarged (whole pixels, no smoothing)
AMPLIFY = 20  # δ is shown as 0.5 + AMPLIFY·δ
WORKSPACE_PREFIX = "runtime-backdoor-demo-"
PAINT_COLOUR, PAINT_OPACITY = "#ff2d55", 0.6  # see-through: the region stays visible


class PageError(Exception):
    """Something the person can fix, said in one line on the page."""


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


def page_message(err: BaseException, folder: Path | None = None) -> str:
    """One line for the page; files inside the temporary ``folder`` are named by file name."""
    text = owner.one_line(err)
    if not isinstance(err, PageError | owner.CliError | ValueError | OSError):
        text = f"unexpected {type(err).__name__}: {text}"
    if folder is not None:
        text = re.sub(re.escape(str(folder)) + r"/(?:[^/\s]+/)*", "", text)
    return text


def verdict_text(report: dict, editor: str, mask_note: str) -> str:
    """``check``'s prediction as the page shows it (Markdown), until Protect replaces it."""
    ok = report["gain"] >= report["needed"]
    head = "Likely protectable" if ok else "Protection will probably not trigger"
    eps = report["eps"]
    return (
        f"**{head}** against {editor} at ε = {eps:.4g} ({eps * 255:.3g}/255): gain "
        f"**{report['gain']:.3g}** vs needed **{report['needed']:.3g}**, "
        f"{report['verdict']}. A prediction: **Protect** tests the result and gives the "
        f"verdict.  \nMask: {mask_note}."
        + (f"  \n*{report['measured']}.*" if report.get("measured") else "")
    )


OUTCOME_HEAD = {
    owner.PROTECTED: "✅ Protected",
    owner.SIDE_EFFECT: "⚠️ Protected, with a side effect on benign edits",
    owner.NOT_PROTECTED: "❌ Not protected",
}


def ensemble_verdict_text(reports: dict, mask_note: str) -> str:
    """``check``'s prediction for each editor of an ensemble (name -> report), as the page
    shows it (Markdown), until Protect replaces it."""
    eps = next(iter(reports.values()))["eps"]
    lines = [
        f"**Against {len(reports)} editors at once** (one perturbation for all), each "
        f"estimated on its own at ε = {eps:.4g} ({eps * 255:.3g}/255). A prediction: "
        "**Protect** tests the result against each editor and gives the verdicts.",
        "",
    ]
    for name, r in reports.items():
        head = "likely protectable" if r["gain"] >= r["needed"] else "will probably not trigger"
        lines.append(
            f"- **{name}**: {head}: gain **{r['gain']:.3g}** vs needed **{r['needed']:.3g}**"
        )
    measured = dict.fromkeys(r["measured"] for r in reports.values() if r.get("measured"))
    return "\n".join([*lines, "", f"Mask: {mask_note}."]) + "".join(f"  \n*{m}.*" for m in measured)


def outcome_text(numbers: dict, check: dict, editor: str, mask_note: str) -> str:
    """The verdict of the protected PNG as written, which replaces ``check``'s prediction."""
    said = "likely protectable" if check["gain"] >= check["needed"] else "unlikely to protect"
    return (
        f"**{OUTCOME_HEAD[numbers['verdict']]}** against {editor}, tested on the protected PNG "
        f"as written: {numbers['verdict_detail']}.  \n"
        f"check had predicted {said} (gain {check['gain']:.3g} vs needed "
        f"{check['needed']:.3g}); this verdict is what the edits did. Mask: {mask_note}."
    )


def ensemble_outcome_text(ensemble: dict, checks: dict, mask_note: str) -> str:
    """The verdicts of the protected PNG as written against each editor of an ensemble, and
    the ensemble's (:func:`runtime_backdoor.owner.ensemble_report`), which replace ``check``'s
    predictions (``checks``: name -> report)."""
    per_editor = ensemble["per_editor"]
    lines = [
        f"**{OUTCOME_HEAD[ensemble['verdict']]}** against the ensemble "
        f"{' + '.join(per_editor)}, tested on the protected PNG as written against each "
        "editor (the weakest editor's verdict is the ensemble's):",
        "",
    ]
    for name, n in per_editor.items():
        c = checks[name]
        said = "likely protectable" if c["gain"] >= c["needed"] else "unlikely to protect"
        lines.append(
            f"- **{name}**: {OUTCOME_HEAD[n['verdict']]}: {n['verdict_detail']}; check had "
            f"predicted {said} (gain {c['gain']:.3g} vs needed {c['needed']:.3g})"
        )
    return "\n".join([*lines, "", f"These verdicts are what the edits did. Mask: {mask_note}."])


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


def to_display(a: np.ndarray, enlarge: int = 1) -> np.ndarray:
    """H x W x 3 in [0, 1] -> uint8 with at most :data:`DISPLAY_SIDE` px on the longer side;
    ``enlarge`` > 1 repeats every pixel that many times (for small images)."""
    from PIL import Image

    u8 = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
    h, w = u8.shape[:2]
    if enlarge > 1:
        return np.repeat(np.repeat(u8, enlarge, axis=0), enlarge, axis=1)
    if max(h, w) <= DISPLAY_SIDE:
        return u8
    scale = DISPLAY_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(u8).resize(size, Image.Resampling.LANCZOS))


def painted_region(value, size: tuple[int, int]) -> np.ndarray | None:
    """The region painted in the editor (any layer pixel not transparent) as a bool H x W
    array at ``size`` (width, height) (scaled with nearest neighbours); None if none."""
    from PIL import Image

    layers = [np.asarray(a) for a in (value or {}).get("layers") or [] if a is not None]
    alphas = [a[..., 3] > 0 for a in layers if a.ndim == 3 and a.shape[2] == 4]
    if not alphas or not np.logical_or.reduce(alphas).any():
        return None
    region = np.logical_or.reduce(alphas)
    if region.shape[::-1] != tuple(size):
        scaled = Image.fromarray(region.astype(np.uint8) * 255).resize(
            size, Image.Resampling.NEAREST
        )
        region = np.asarray(scaled) > 127
    return region


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


class Demo:
    """The page's work, without Gradio: every method raises one-line errors."""

    def __init__(
        self,
        choices: list[EditorChoice],
        folder: Path,
        device: str = "auto",
        max_pixels: int = owner.DEFAULT_MAX_PIXELS,
    ):
        self.choices = {c.label: c for c in choices}
        self.folder = Path(folder)
        self.device = owner.device_from_option(device)
        self.max_pixels = max_pixels
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
        keep = max(2, len(labels))
        return {self.choices[label].name: self.editor(label, keep) for label in labels}

    def run_folder(self) -> Path:
        folder = self.folder / f"run-{uuid.uuid4().hex[:12]}"
        folder.mkdir(parents=True)
        return folder

    def preview(self, image_file, mask_file=None) -> tuple[dict, str, int, np.ndarray | None]:
        """The painting canvas's value (the image, downscaled if large); a note saying what is
        done; the expansion kernel scaled with the size; and, for an uploaded mask, the image
        with the mask drawn on it in the paint colour (None without one), which the page shows
        in place of the canvas."""
        from .data import read_image

        if not image_file:
            raise PageError("upload an image (PNG or JPEG)")
        path = Path(image_file)
        owner.check_pixels(path, "image", self.max_pixels)  # from the header, before decoding
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = read_image(path)
        h, w = image.shape[:2]
        shown = to_display(image)
        note = f"{path.name}: {w}×{h} px."
        if shown.shape[:2] != (h, w):
            note += (
                f" Shown at {shown.shape[1]}×{shown.shape[0]} for painting; the protection uses "
                f"all {w}×{h} pixels (a painted region is scaled up to that size), which takes "
                "longer, above all on a CPU."
            )
        if path.suffix.lower() in (".jpg", ".jpeg"):
            note += " The protected copy is a PNG (lossless); saving it as JPEG would weaken it."
        note += "".join(f" {c.message}" for c in caught)
        value = {"background": shown, "layers": [], "composite": None}
        drawn = None
        if mask_file:
            owner.check_pixels(Path(mask_file), "mask", self.max_pixels)
            layer = self._mask_layer(Path(mask_file), (h, w), shown.shape[:2])
            if layer is not None:
                note += " The uploaded mask is drawn on the image and used as it is."
                drawn = overlay(shown, layer)
                k = max(1, DISPLAY_SIDE // 2 // max(drawn.shape[:2]))  # small: whole pixels
                drawn = np.repeat(np.repeat(drawn, k, axis=0), k, axis=1)
        kernel = owner.auto_expand(h, w)
        note += f" Expansion kernel {kernel} px (scaled with the image: 17 at 512 px)."
        return value, page_message(PageError(note), self.folder), kernel, drawn

    @staticmethod
    def _mask_layer(path: Path, size: tuple[int, int], shown: tuple[int, int]):
        """A mask file as a paint layer of the shown size (None if unreadable: the verdict
        says what is wrong with it)."""
        from PIL import Image

        from .data import read_mask

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

    def inputs(self, image_file, mask_file, painted, folder: Path) -> Inputs:
        """Image and mask as `protect` reads them: an uploaded mask file as it is, else the
        painted region, written as a PNG in ``folder``."""
        from PIL import Image

        if not image_file:
            raise PageError("upload an image (PNG or JPEG)")
        image = Path(image_file)
        owner.check_pixels(image, "image", self.max_pixels)
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
            x, m, target = owner.read_inputs(image, mask, max_pixels=self.max_pixels)
        share = float(m.mean())
        return Inputs(x, m, target, image, mask, f"{note}, {share:.1%} of the image")

    def check(self, image_file, mask_file, painted, label, eps) -> str:
        """``check``'s verdict (Markdown); ``label`` a list: each editor's."""
        eps = owner.parse_eps(eps)
        labels = [label] if isinstance(label, str) else self.labels(label)
        if len(labels) > 1:
            return self._check_each(image_file, mask_file, painted, labels, eps)
        label = labels[0]
        folder = self.run_folder()
        try:
            got = self.inputs(image_file, mask_file, painted, folder)
            name = f"editor {self.choices[label].name}" if label in self.choices else "editor"
            report = owner.check_image(
                self.editor(label), got.x, got.m, got.target, self.device, eps=eps, name=name
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return verdict_text(report, self.choices[label].name, got.mask_note)

    def _check_each(self, image_file, mask_file, painted, labels, eps) -> str:
        folder = self.run_folder()
        try:
            got = self.inputs(image_file, mask_file, painted, folder)
            reports = {
                name: owner.check_image(
                    editor, got.x, got.m, got.target, self.device, eps=eps, name=f"editor {name}"
                )
                for name, editor in self.editors(labels).items()
            }
        finally:
            shutil.rmtree(folder, ignore_errors=True)
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
        eps = owner.parse_eps(eps)
        steps = _whole(steps, "steps", 1, 10000)
        seed = _whole(seed, "seed", 0, 2**63 - 1)
        expand = _whole(expand, "expansion kernel", 0, 255) or None
        owner.check_options(expand, 0.5, "solid")
        folder = self.run_folder()
        try:
            return self._protect(image_file, mask_file, painted, label, folder, eps, steps, seed, expand)  # fmt: skip
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _protect(self, image_file, mask_file, painted, label, folder, eps, steps, seed, expand):
        got = self.inputs(image_file, mask_file, painted, folder)
        labels = [label] if isinstance(label, str) else self.labels(label)
        if len(labels) > 1:
            return self._protect_ensemble(labels, got, folder, eps, steps, seed, expand)
        label = labels[0]
        editor = self.editor(label)
        name = self.choices[label].name
        who = f"editor {name}"
        check = owner.check_image(editor, got.x, got.m, got.target, self.device, eps=eps, name=who)
        report, protected = owner.protect_image(
            editor, got.x, got.m, got.target, self.device,
            eps=eps, steps=steps, expand=expand, seed=seed, progress=True, name=who,
        )  # fmt: skip
        out, mask = self._write(got, folder, protected)
        # The edits run on the file as published, read back as `edit` reads it.
        published, m, _ = owner.read_inputs(out, mask, max_pixels=self.max_pixels)
        numbers, _, figure = owner.edit_image(
            editor, published, m, got.target, self.device, original=got.x,
            expand=report["expand"], name=who,
        )  # fmt: skip
        command = (
            f"runtime-backdoor protect {got.image.name} --mask {mask.name} --editor {name} "
            f"--eps {eps:.6g} --steps {steps} --seed {seed} --expand {report['expand']} "
            f"--out {out.name}"
        )
        return self._panels(got, protected) | {
            "verdict": outcome_text(numbers, check, name, got.mask_note),
            "numbers": numbers,
            "comparison": figure,
            "table": results_table(report, numbers, command),
            "file": out,
            "mask": mask,
            "folder": folder,
        }

    def _protect_ensemble(self, labels, got, folder, eps, steps, seed, expand):
        editors = self.editors(labels)
        who = {name: f"editor {name}" for name in editors}
        checks = {
            name: owner.check_image(
                editor, got.x, got.m, got.target, self.device, eps=eps, name=who[name]
            )
            for name, editor in editors.items()
        }
        report, protected = owner.protect_image(
            editors, got.x, got.m, got.target, self.device,
            eps=eps, steps=steps, expand=expand, seed=seed, progress=True, name=who,
        )  # fmt: skip
        out, mask = self._write(got, folder, protected)
        published, m, _ = owner.read_inputs(out, mask, max_pixels=self.max_pixels)
        per_editor, figures = {}, []
        for name, editor in editors.items():
            per_editor[name], _, figure = owner.edit_image(
                editor, published, m, got.target, self.device, original=got.x,
                expand=report["expand"], name=who[name],
            )  # fmt: skip
            figures.append(titled(figure, f"against {name}: {per_editor[name]['verdict']}"))
        ensemble = owner.ensemble_report(per_editor)
        panels = self._panels(got, protected)
        command = (
            f"runtime-backdoor protect {got.image.name} --mask {mask.name} --editor "
            f"{','.join(editors)} --eps {eps:.6g} --steps {steps} --seed {seed} --expand "
            f"{report['expand']} --out {out.name}"
        )
        return panels | {
            "verdict": ensemble_outcome_text(ensemble, checks, got.mask_note),
            "numbers": ensemble,
            "comparison": stacked(figures),
            "table": ensemble_table(report, ensemble, command),
            "file": out,
            "mask": mask,
            "folder": folder,
        }

    @staticmethod
    def _write(got: Inputs, folder: Path, protected) -> tuple[Path, Path]:
        """The protected PNG and the mask in ``folder``, as the page offers them."""
        out = folder / f"{got.image.stem}_protected.png"
        owner.write_output(out, protected, overwrite=False)
        mask = folder / f"{got.image.stem}_mask.png"
        if got.mask != mask:
            shutil.copyfile(got.mask, mask)
        return out, mask

    @staticmethod
    def _panels(got: Inputs, protected) -> dict:
        """Original, protected and δ ×AMPLIFY as shown (small images enlarged)."""
        original = owner.eight_bit(got.x[0])
        k = max(1, SMALL_SIDE // max(original.shape[:2]))
        delta = np.clip(0.5 + AMPLIFY * (protected - original), 0, 1)
        return {
            "original": to_display(original, enlarge=k),
            "protected": to_display(protected, enlarge=k),
            "delta": to_display(delta, enlarge=k),
        }


def overlay(shown: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """``shown`` (H x W x 3 uint8) with an RGBA paint ``layer`` blended over it."""
    alpha = layer[..., 3:4].astype(np.float32) / 255
    mixed = shown.astype(np.float32) * (1 - alpha) + layer[..., :3].astype(np.float32) * alpha
    return np.round(mixed).astype(np.uint8)


def results_table(report: dict, numbers: dict, command: str) -> str:
    """The numbers under the comparison (Markdown)."""

    def share(value) -> str:
        return "–" if value is None else f"{value:.0%}"

    def db(value) -> str:
        return "–" if value is None else f"{value:.1f} dB"

    return "\n".join(
        [
            "| edit | on the target colour, original's edit | on the target colour, protected's "
            "edit | PSNR, protected's edit vs original's |",
            "|---|---|---|---|",
            f"| malicious: fill the protected region | {share(numbers['hit_fraction_original'])} "
            f"| {share(numbers['hit_fraction'])} | {db(numbers['psnr_region_vs_original_edit'])} |",
            f"| benign: fill the ring around it | {share(numbers['ring_hit_fraction_original'])} "
            f"| {share(numbers['ring_hit_fraction'])} "
            f"| {db(numbers['ring_psnr_vs_original_edit'])} |",
            "",
            f"Largest change {report['max_change_8bit']:.0f}/255 (ε = {report['eps'] * 255:.3g}/255), "
            f"{report['steps']} steps in {report['seconds']:.1f} s, expansion kernel "
            f"{report['expand']} px, target colour {numbers['target_colour']}. The verdict: "
            f"{owner.VERDICT_RULE}",
            "",
            f"The same from the command line: `{command}`",
        ]
    )


def ensemble_table(report: dict, ensemble: dict, command: str) -> str:
    """The numbers under an ensemble's comparisons (Markdown): a row per editor."""

    def share(value) -> str:
        return "–" if value is None else f"{value:.0%}"

    def db(value) -> str:
        return "–" if value is None else f"{value:.1f} dB"

    rows = [
        "| editor | verdict | malicious edit on the target colour, original's / protected's "
        "| PSNR vs original's | benign ring edit on the target colour, original's / "
        "protected's | PSNR vs original's |",
        "|---|---|---|---|---|---|",
    ]
    for name, n in ensemble["per_editor"].items():
        rows.append(
            f"| {name} | {n['verdict']} | {share(n['hit_fraction_original'])} / "
            f"{share(n['hit_fraction'])} | {db(n['psnr_region_vs_original_edit'])} "
            f"| {share(n['ring_hit_fraction_original'])} / {share(n['ring_hit_fraction'])} "
            f"| {db(n['ring_psnr_vs_original_edit'])} |"
        )
    weights = ", ".join(f"{w:g}" for w in report["editor_weights"])
    return "\n".join(
        [
            *rows,
            "",
            f"Largest change {report['max_change_8bit']:.0f}/255 (ε = {report['eps'] * 255:.3g}/255), "
            f"{report['steps']} steps in {report['seconds']:.1f} s against all {len(rows) - 2} "
            f"editors at once (loss weights {weights}), expansion kernel {report['expand']} px, "
            f"target colour {ensemble['target_colour']}. Each editor's verdict: "
            f"{owner.VERDICT_RULE} {owner.ENSEMBLE_RULE}",
            "",
            f"The same from the command line: `{command}`",
        ]
    )


def titled(figure: np.ndarray, title: str) -> np.ndarray:
    """``figure`` (H x W x 3 uint8) under a line of ``title``, on white."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=owner.FONT_SIZE)
    line = owner.FONT_SIZE + 10
    canvas = Image.new("RGB", (figure.shape[1], figure.shape[0] + line), "white")
    ImageDraw.Draw(canvas).text((8, 6), title, fill=(20, 40, 120), font=font)
    canvas.paste(Image.fromarray(figure), (0, line))
    return np.asarray(canvas)


def stacked(figures: list[np.ndarray]) -> np.ndarray:
    """Figures one above the other, a white gap between them (widths may differ)."""
    width = max(f.shape[1] for f in figures)
    gap = np.full((owner.COMPARE_GAP * 4, width, 3), 255, np.uint8)
    rows = []
    for f in figures:
        pad = np.full((f.shape[0], width - f.shape[1], 3), 255, np.uint8)
        rows += [np.concatenate([f, pad], axis=1), gap]
    return np.concatenate(rows[:-1], axis=0)


# --------------------------------------------------------------------------- the page


def build_app(demo: Demo):
    """The Gradio page around ``demo`` (imports Gradio)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    labels = list(demo.choices)
    system = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: nothing from outside
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])

    def on_page_errors(fn):
        def run(*args):
            try:
                return fn(*args)
            except Exception as err:  # every failure is one line on the page
                raise gr.Error(page_message(err, demo.folder), print_exception=False) from None

        return run

    # An uploaded mask is shown drawn on the image in place of the canvas (hidden meanwhile):
    # giving the canvas a new picture after a brush stroke could leave it blank and
    # "processing" (Gradio's ImageEditor, seen in about 1 of 5 tries); removing the mask
    # brings the canvas back with its paint.
    def shown(drawn):
        return (
            gr.Image(value=drawn, visible=drawn is not None),
            gr.ImageEditor(visible=drawn is None),
        )

    def on_image(image_file, mask_file):
        """A new image: a new canvas (and the mask drawn on it, if any)."""
        if not image_file:
            return None, "", gr.Number(), gr.Image(value=None, visible=False)
        try:
            value, note, kernel, drawn = demo.preview(image_file, mask_file)
        except Exception as err:
            return None, f"⚠ {page_message(err, demo.folder)}", gr.Number(), gr.Image(visible=False)  # fmt: skip
        view, _ = shown(drawn)
        return gr.ImageEditor(value=value, visible=drawn is None), note, kernel, view

    def on_mask(image_file, mask_file):
        """A mask uploaded or removed: the canvas keeps its picture and paint."""
        if not image_file:
            return "", gr.Number(), *shown(None)
        try:
            _, note, kernel, drawn = demo.preview(image_file, mask_file)
        except Exception as err:
            return f"⚠ {page_message(err, demo.folder)}", gr.Number(), *shown(None)
        return note, kernel, *shown(drawn)

    def chosen(label, also):
        """The editor, or with others ticked the list of them all (an ensemble)."""
        picked = list(dict.fromkeys(c for c in [label, *(also or ())] if c))
        return picked[0] if len(picked) == 1 else picked

    def on_check(image_file, mask_file, painted, label, eps, also):
        if not image_file:
            return "Upload an image to start."
        try:
            return demo.check(image_file, mask_file, painted, chosen(label, also), eps)
        except Exception as err:
            return f"⚠ {page_message(err, demo.folder)}"

    def on_protect(
        image_file, mask_file, painted, label, eps, also, steps, seed, expand, previous,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (how Gradio attaches a bar)
    ):  # fmt: skip
        progress(0, desc="checking and preparing")
        r = on_page_errors(demo.protect)(
            image_file, mask_file, painted, chosen(label, also), eps, steps, seed, expand
        )
        if previous:  # the session's previous results are no longer shown
            shutil.rmtree(previous, ignore_errors=True)
        return (
            r["verdict"], r["original"], r["protected"], r["delta"], r["comparison"],
            r["table"], gr.DownloadButton(value=str(r["file"]), interactive=True),
            gr.DownloadButton(value=str(r["mask"]), interactive=True), str(r["folder"]),
        )  # fmt: skip

    with gr.Blocks(title="runtime-backdoor: protect an image", delete_cache=(600, 3600)) as app:
        gr.Markdown(
            "## Protect a region of your image against inpainting\n"
            "An imperceptible change (at most ε per pixel value) makes the chosen editor fill "
            "the region with a solid colour when somebody asks it to replace that region, "
            "while other edits work as usual. Protection is specific to the editor it is made "
            "against; tick more editors to protect against several at once. Everything runs "
            "on this machine."
        )
        with gr.Row():
            with gr.Column(scale=3):
                image_file = gr.File(
                    label="1. Image (PNG or JPEG)",
                    file_types=[".png", ".jpg", ".jpeg"],
                    height=120,
                    elem_id="image-file",
                )
                note = gr.Markdown(elem_id="image-note")
                painter = gr.ImageEditor(
                    label="2. Paint the region to protect (brush; eraser to correct)",
                    type="numpy",
                    image_mode="RGBA",
                    sources=[],
                    format="png",
                    brush=gr.Brush(
                        colors=[(PAINT_COLOUR, PAINT_OPACITY)], color_mode="fixed", default_size=12
                    ),
                    transforms=[],
                    layers=False,
                    height=420,
                    elem_id="painter",
                )
                mask_view = gr.Image(
                    label="2. The uploaded mask, drawn on the image (remove the mask file to "
                    "paint instead)",
                    format="png",
                    interactive=False,
                    visible=False,
                    height=420,
                    elem_id="mask-view",
                )
            with gr.Column(scale=2):
                mask_file = gr.File(
                    label="... or a mask PNG (white = protect), used instead of the painting",
                    file_types=[".png"],
                    height=120,
                    elem_id="mask-file",
                )
                editor = gr.Dropdown(
                    labels,
                    value=labels[0],  # the most capable on offer (available_editors)
                    label="3. Editor to protect against",
                    elem_id="editor",
                )
                also = gr.CheckboxGroup(
                    labels,
                    value=[],
                    label="... and also against (optional): one perturbation for all the "
                    "editors ticked, each tested after protecting",
                    elem_id="also",
                )
                eps = gr.Number(
                    owner.DEFAULT_EPS,
                    label="ε: fraction of the range, or 8-bit units above 1 (0.025 = 6.4/255, the paper's)",
                    elem_id="eps",
                )
                with gr.Row():
                    steps = gr.Number(20, precision=0, label="steps", elem_id="steps")
                    seed = gr.Number(0, precision=0, label="seed", elem_id="seed")
                    expand = gr.Number(
                        0,
                        precision=0,
                        label="expansion kernel (px; 0: scaled with the image, 17 at 512 px)",
                        elem_id="expand",
                    )
                verdict = gr.Markdown("Upload an image to start.", elem_id="verdict")
                go = gr.Button("4. Protect", variant="primary", elem_id="protect")
        images = dict(format="png", interactive=False, height=260)
        with gr.Row():
            original = gr.Image(label="original", elem_id="original", **images)
            protected = gr.Image(label="protected", elem_id="protected", **images)
            delta = gr.Image(label=f"δ ×{AMPLIFY}", elem_id="delta", **images)
        comparison = gr.Image(
            label="the edits an attacker would make, on the original and on the protected PNG",
            elem_id="comparison",
            show_label=False,  # the figure has its own titles and labels
            **(images | {"height": None}),
        )
        table = gr.Markdown(elem_id="results")
        with gr.Row():
            download = gr.DownloadButton(
                "5. Download the protected PNG", interactive=False, elem_id="download"
            )
            download_mask = gr.DownloadButton(
                "Download the mask PNG", interactive=False, elem_id="download-mask"
            )
        previous = gr.State(None, delete_callback=lambda p: p and shutil.rmtree(p, True))

        check_inputs = [image_file, mask_file, painter, editor, eps, also]
        uploads = [image_file, mask_file]
        image_file.change(on_image, uploads, [painter, note, expand, mask_view]).then(
            on_check, check_inputs, verdict
        )
        mask_file.change(on_mask, uploads, [note, expand, mask_view, painter]).then(
            on_check, check_inputs, verdict
        )
        for trigger in (painter.change, editor.change, eps.change, also.change):
            trigger(
                on_check, check_inputs, verdict, trigger_mode="always_last", show_progress="hidden"
            )
        go.click(
            on_protect,
            [*check_inputs, steps, seed, expand, previous],
            [verdict, original, protected, delta, comparison, table, download, download_mask,
             previous],
        )  # fmt: skip
    return app, theme


class RequestGuard:
    """ASGI middleware in front of the page: a request whose ``Origin`` is not the page's own
    (a page elsewhere driving this one) is refused with 403, and a request body over
    ``max_body`` bytes with 413, from ``Content-Length`` or while it streams in."""

    def __init__(self, app, max_body: int = MAX_REQUEST_BYTES):
        self.app, self.max_body = app, max_body

    @staticmethod
    def same_origin(origin: str, hosts: list[str]) -> bool:
        from urllib.parse import urlsplit

        netloc = urlsplit(origin).netloc.lower()
        return bool(netloc) and netloc in [h.lower() for h in hosts if h]

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        hosts = [headers.get("host", ""), headers.get("x-forwarded-host", "")]
        if origin is not None and not self.same_origin(origin, hosts):
            return await self._refuse(scope, send, 403, "cross-origin request refused")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self._refuse(scope, send, 413, f"request larger than {self.max_body:,} bytes")  # fmt: skip
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(scope, send, 413, f"request larger than {self.max_body:,} bytes")  # fmt: skip

    @staticmethod
    async def _refuse(scope, send, status: int, text: str):
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = text.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def serve(
    host: str = "127.0.0.1",
    port: int | None = None,
    editor: str | None = None,
    weights_path: Path | None = None,
    device: str = "auto",
    max_pixels: int = owner.DEFAULT_MAX_PIXELS,
) -> int:
    """Serve the page until interrupted (Ctrl+C or SIGTERM); then remove the temporary folder."""
    if editor is not None and editor not in EDITORS:
        raise owner.CliError(f"--editor: unknown editor {editor!r}; known editors: {', '.join(EDITORS)}")  # fmt: skip
    if editor is None and weights_path is not None:
        raise owner.CliError("--weights needs --editor: the editor they are for")
    signal.signal(signal.SIGTERM, _interrupt)
    with workspace() as folder:
        choices = available_editors(editor=editor, weights_path=weights_path)
        demo = Demo(choices, folder, device, max_pixels)
        if editor is not None:
            demo.editor(next(iter(demo.choices)))  # fail now on weights that do not load
        app, theme = build_app(demo)
        print(f"runtime-backdoor demo: temporary files in {folder} (removed on exit)", flush=True)
        app.queue(default_concurrency_limit=1, max_size=32)
        from starlette.middleware import Middleware

        app.launch(
            server_name=host, server_port=port, share=False, inbrowser=False, theme=theme,
            show_error=True, allowed_paths=[str(folder)], max_file_size=MAX_UPLOAD_BYTES,
            app_kwargs={"middleware": [Middleware(RequestGuard, max_body=MAX_REQUEST_BYTES)]},
        )  # fmt: skip
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # Gradio closes its server on it; the workspace is removed after
