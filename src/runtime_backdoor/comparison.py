"""The labelled comparison of an attacker's edits that ``edit --compare`` writes and the demo
shows (:func:`compare_figure`), split from :mod:`runtime_backdoor.owner`, which re-exports it.
"""

from __future__ import annotations

import math

FIGURE_MIN_SIDE = 160  # px: smaller images are enlarged (whole pixels) so labels fit
FIGURE_MAX_SIDE = 1024  # px: larger images are shown downscaled in the figure
FONT_SIZE = 14


def colour_name(phi) -> str | None:
    """'blue (0, 0, 255)' for a solid target (H x W x 3 on the 8-bit grid), else None."""
    import numpy as np

    from .targets import SOLID_COLOURS

    flat = phi.reshape(-1, 3)
    if not (flat == flat[0]).all():
        return None
    rgb = tuple(int(round(v * 255)) for v in flat[0])
    names = {tuple(round(c * 255) for c in v): k for k, v in SOLID_COLOURS.items()}
    label = names.get(rgb, "colour")
    return f"{label} {rgb}" if np.isfinite(flat[0]).all() else None


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def _scaler(h: int, w: int):
    """The panel size of an h x w image in the figure and the function that shows an image at
    it: enlarged by whole pixels under :data:`FIGURE_MIN_SIDE`, downscaled over
    :data:`FIGURE_MAX_SIDE`."""
    import numpy as np
    from PIL import Image

    side = max(h, w)
    k = math.ceil(FIGURE_MIN_SIDE / side) if side < FIGURE_MIN_SIDE else 1
    shrink = min(1.0, FIGURE_MAX_SIDE / side)
    ph, pw = (
        (h * k, w * k) if shrink == 1 else (max(1, round(h * shrink)), max(1, round(w * shrink)))
    )

    def shown(a):
        u8 = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
        if k > 1:
            return np.repeat(np.repeat(u8, k, axis=0), k, axis=1)
        if shrink < 1:
            return np.asarray(Image.fromarray(u8).resize((pw, ph), Image.Resampling.LANCZOS))
        return u8

    return ph, pw, shown


def compare_figure(edits: dict, numbers: dict, colour: str | None = None):
    """The labelled comparison ``edit --compare`` writes and the demo shows.

    Two rows (the malicious edit of the protected region, the benign ring edit), each
    original's edit | protected's edit | their absolute difference, a swatch of the target
    colour (or the target image), and the numbers and the verdict under them. Images under
    :data:`FIGURE_MIN_SIDE` px are enlarged by whole pixels, over :data:`FIGURE_MAX_SIDE`
    downscaled. Returns ``(figure, boxes)``: an H x W x 3 uint8 array and, per panel
    (``malicious_original``, ..., ``target``), its ``(top, left, height, width)``.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from .owner import COMPARE_GAP, NOT_PROTECTED, NOT_PROTECTED_SIDE_EFFECT, PROTECTED, SIDE_EFFECT

    h, w = edits["target"].shape[:2]
    ph, pw, shown = _scaler(h, w)

    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 6
    pad, gap = 8, COMPARE_GAP
    swatch_w = max(pw, 170)
    width = pad + 3 * pw + 2 * gap + 3 * gap + swatch_w + pad
    rows = [
        ("malicious", "malicious edit: the editor fills the protected region"),
        (
            "benign",
            f"benign edit: the editor fills the ring around it (kernel {numbers['expand']})",
        ),
    ]
    labels = ("original's edit", "protected's edit", "|difference| (black: same)")
    text_width = width - 2 * pad
    verdict = numbers.get("verdict", "")
    footer = [f"verdict: {verdict}"] + _wrap(numbers.get("verdict_detail", ""), font, text_width)
    height = pad + 2 * (2 * line + ph + pad) + len(footer) * line + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = {}
    top = pad
    for edit, title in rows:
        draw.text((pad, top), title, fill=(20, 40, 120), font=font)
        top += line
        for i, (suffix, label) in enumerate(zip(("original", "protected", "difference"), labels, strict=True)):  # fmt: skip
            left = pad + i * (pw + gap)
            draw.text((left, top), label, fill="black", font=font)
            key = f"{edit}_{suffix}"
            if key in edits:
                canvas.paste(Image.fromarray(shown(edits[key])), (left, top + line))
                boxes[key] = (top + line, left, ph, pw)
            else:
                draw.text((left, top + line), "(no ring: kernel 1)", fill="grey", font=font)
        top += line + ph + pad
    # the target: a swatch of a solid colour, else the target image
    left = pad + 3 * pw + 2 * gap + 3 * gap
    top = pad + line
    draw.text((left, top), "target colour" if colour else "target", fill="black", font=font)
    if colour:
        rgb = tuple(int(v) for v in np.round(edits["target"][0, 0] * 255))
        sw = min(ph, 96)
        draw.rectangle((left, top + line, left + sw - 1, top + line + sw - 1), fill=rgb)
        boxes["target"] = (top + line, left, sw, sw)
        draw.text((left, top + line + sw + 2), colour, fill="black", font=font)
    else:
        canvas.paste(Image.fromarray(shown(edits["target"])), (left, top + line))
        boxes["target"] = (top + line, left, ph, pw)
    top = pad + 2 * (2 * line + ph + pad)
    shade = {PROTECTED: (0, 110, 40), SIDE_EFFECT: (170, 90, 0), NOT_PROTECTED: (190, 0, 0)}
    shade[NOT_PROTECTED_SIDE_EFFECT] = shade[NOT_PROTECTED]
    for i, text in enumerate(footer):
        colour_of_line = shade.get(verdict, "black") if i == 0 else "black"
        draw.text((pad, top + i * line), text, fill=colour_of_line, font=font)
    return np.asarray(canvas), boxes
