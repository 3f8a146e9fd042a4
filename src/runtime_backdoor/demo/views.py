"""What the demo page shows: its texts (``check``'s prediction, the verdict, the tables of
numbers), its pictures (the image as painted and shown, the comparisons) and its one-line
errors. Plain functions of reports and arrays, without Gradio."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .. import owner

DISPLAY_SIDE = 768  # px: larger images are shown downscaled (never protected downscaled)
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # an upload (image or mask) larger than this is refused
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + (1 << 20)  # any request body: an upload and its form
SMALL_SIDE = 256  # px: smaller images' results are shown enlarged (whole pixels, no smoothing)
AMPLIFY = 20  # δ is shown as 0.5 + AMPLIFY·δ
WORKSPACE_PREFIX = "runtime-backdoor-demo-"
PAINT_COLOUR, PAINT_OPACITY = "#ff2d55", 0.6  # see-through: the region stays visible


class PageError(Exception):
    """Something the person can fix, said in one line on the page."""


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


#: the verdict's heading; its marks are in DejaVu Sans (no emoji font needed)
OUTCOME_HEAD = {
    owner.PROTECTED: "✓ Protected",
    owner.SIDE_EFFECT: "⚠ Protected, with a side effect on benign edits",
    owner.NOT_PROTECTED: "✗ Not protected",
    owner.NOT_PROTECTED_SIDE_EFFECT: "✗ Not protected, with a side effect on benign edits",
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
        "editor (protected only when protected against every editor):",
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


def protect_texts(report: dict, per_editor: dict, figures: dict, checks: dict, mask_note: str, command: str) -> dict:  # fmt: skip
    """The verdict, numbers, comparison and table the page shows after protecting, from each
    editor's numbers, figure and ``check`` report (name -> each): one editor's as they are,
    several editors' with the ensemble's verdict and each comparison titled."""
    if len(per_editor) == 1:
        ((name, numbers),) = per_editor.items()
        return {
            "verdict": outcome_text(numbers, checks[name], name, mask_note),
            "numbers": numbers,
            "comparison": figures[name],
            "table": results_table(report, numbers, command),
        }
    ensemble = owner.ensemble_report(per_editor)
    shown = [titled(f, f"against {n}: {per_editor[n]['verdict']}") for n, f in figures.items()]
    return {
        "verdict": ensemble_outcome_text(ensemble, checks, mask_note),
        "numbers": ensemble,
        "comparison": stacked(shown),
        "table": ensemble_table(report, ensemble, command),
    }
