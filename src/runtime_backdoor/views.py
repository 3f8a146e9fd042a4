"""What the attacker's tool shows the model: views of a large photo, and protection on them.

Inpainting front ends do not run a 12-megapixel photo through the model at full size. IOPaint
(formerly lama-cleaner) gives its erase models (LaMa, MAT, ...) three "HD strategies"; its
request defaults (``iopaint/schema.py``, ``InpaintRequest``) are strategy ``Crop``,
``hd_strategy_crop_trigger_size=800``, ``hd_strategy_crop_margin=128`` and
``hd_strategy_resize_limit=1280``:

- ``original``: the whole image, when its longer side is at most the trigger size (800 px);
- ``crop``: the mask's bounding box grown by the margin (128 px each side), clipped to the
  image, at full resolution; the fill is pasted back into the photo;
- ``resize``: the photo with its longer side brought down to the limit (1280 px, bicubic);
  the fill is brought back up (bicubic) and pasted into the masked pixels.

:func:`protect_view` optimises δ on the view the tool would use (the optimiser,
:func:`runtime_backdoor.implant.implant`, gets the view tensors as they are) and writes back a
full-resolution 8-bit image within ε; :func:`verify_pipelines` edits the written PNG through
each attacker pipeline and says which ones the protection held under. Only the view is ever
a tensor: the photo stays a numpy array (float32 at most), so memory and time follow the view,
not the photo. Only the owner's code (:mod:`runtime_backdoor.batch`) imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .owner_io import CliError

#: IOPaint's defaults (``InpaintRequest`` in iopaint/schema.py): the HD strategy of erase
#: models is Crop above a longer side of 800 px, with a 128 px margin; Resize brings the
#: longer side to 1280 px
CROP_TRIGGER = 800
CROP_MARGIN = 128
RESIZE_LIMIT = 1280
VIEWS = ("auto", "original", "crop", "resize")
PIPELINES = ("original", "crop", "resize")
#: the editor never runs on a view of more pixels than this (a 2048 × 2048 square): a crop
#: around a mask that spans most of a large photo is refused, naming --view resize
MAX_VIEW_PIXELS = 2048 * 2048


@dataclass(frozen=True)
class ViewSettings:
    """``--view``, ``--crop-margin``, ``--crop-trigger``, ``--resize-limit``."""

    view: str = "auto"
    crop_margin: int = CROP_MARGIN
    crop_trigger: int = CROP_TRIGGER
    resize_limit: int = RESIZE_LIMIT

    def check(self) -> ViewSettings:
        """Refuse bad options with one line naming the option."""
        if self.view not in VIEWS:
            raise CliError(f"--view: unknown view {self.view!r}; choose one of {', '.join(VIEWS)}")
        for option, value, low in (
            ("--crop-margin", self.crop_margin, 0),
            ("--crop-trigger", self.crop_trigger, 1),
            ("--resize-limit", self.resize_limit, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise CliError(f"{option} must be an integer of at least {low}, got {value!r}")
        return self


def settings_of(args) -> ViewSettings:
    """The view options of a parsed command line (defaults where a command has none)."""
    return ViewSettings(
        getattr(args, "view", "auto") or "auto",
        getattr(args, "crop_margin", CROP_MARGIN),
        getattr(args, "crop_trigger", CROP_TRIGGER),
        getattr(args, "resize_limit", RESIZE_LIMIT),
    ).check()


# ------------------------------------------------------------------------------- geometry


def crop_box(mask, margin: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), exclusive ends: the bounding box of ``mask`` (H x W, true
    inside) grown by ``margin`` on each side and clipped to the image."""
    import numpy as np

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        raise CliError("the mask is empty: nothing to protect")
    h, w = mask.shape
    top, bottom = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, h)
    left, right = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, w)
    return top, left, bottom, right


def resize_size(height: int, width: int, limit: int) -> tuple[int, int]:
    """(height, width) with the longer side brought to ``limit`` (as IOPaint's
    ``resize_max_size``: unchanged when already within it, sides rounded to the nearest)."""
    longer = max(height, width)
    if longer <= limit:
        return height, width
    ratio = limit / longer
    return max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))


def tool_pipelines(height: int, width: int, s: ViewSettings) -> list[str]:
    """The pipelines the tool runs on an image of this size: the original below the crop
    trigger; above it, Crop (the default strategy) and Resize (the other HD strategy, which
    IOPaint applies only when the longer side exceeds the resize limit)."""
    if max(height, width) <= s.crop_trigger:
        return ["original"]
    pipelines = ["crop"]
    if max(height, width) > s.resize_limit:
        pipelines.append("resize")
    return pipelines


def protect_view_name(height: int, width: int, s: ViewSettings) -> str:
    """The view protect optimises on: ``--view``, or (auto) the first pipeline the tool
    would run (IOPaint's default strategy: the original below the trigger, the crop above)."""
    return s.view if s.view != "auto" else tool_pipelines(height, width, s)[0]


@dataclass
class View:
    """A view of the photo: how it is cut and its size."""

    name: str
    box: tuple[int, int, int, int]  # the crop (the whole image for original and resize)
    size: tuple[int, int]  # (height, width) the editor sees

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


def make_view(name: str, mask, s: ViewSettings) -> View:
    """The view ``name`` of a photo with this mask (H x W bool), refused with one line when
    the editor would see more than :data:`MAX_VIEW_PIXELS`."""
    h, w = mask.shape
    if name == "crop":
        box = crop_box(mask, s.crop_margin)
        size = (box[2] - box[0], box[3] - box[1])
    elif name == "resize":
        box, size = (0, 0, h, w), resize_size(h, w, s.resize_limit)
    else:
        box, size = (0, 0, h, w), (h, w)
    view = View(name, box, size)
    if view.pixels > MAX_VIEW_PIXELS:
        raise CliError(
            f"--view {name}: the editor would see {size[1]}×{size[0]} px "
            f"({view.pixels / 1e6:.1f} megapixels), more than the {MAX_VIEW_PIXELS / 1e6:.1f} "
            "megapixels it is run on; use --view resize (or a smaller --resize-limit)"
        )
    return view


def cut(view: View, array, *, mask: bool = False):
    """The view of an H x W (x 3) float array: cropped, or resized (bicubic, as IOPaint's
    ``resize_max_size``; a mask is thresholded at one half afterwards)."""
    import cv2
    import numpy as np

    t, left, b, r = view.box
    part = array[t:b, left:r]
    if view.name == "resize" and view.size != part.shape[:2]:
        size = (view.size[1], view.size[0])
        if mask:  # as 8-bit grey (a quarter of float32's memory), then thresholded
            grey = cv2.resize(part.astype(np.uint8) * 255, size, interpolation=cv2.INTER_CUBIC)
            return grey > 127
        if part.dtype == np.uint8:  # 8-bit, as the tool resizes it (cv2 rounds and saturates)
            return cv2.resize(part, size, interpolation=cv2.INTER_CUBIC)
        src = np.asarray(part, dtype=np.float32)  # no copy of a float32 photo
        part = cv2.resize(src, size, interpolation=cv2.INTER_CUBIC)
        np.clip(part, 0.0, 1.0, out=part)
    return part


def to_uint8(image):
    """An H x W x 3 float photo in [0, 1] as 8-bit, a band of rows at a time (no full-size
    float temporary)."""
    import numpy as np

    out = np.empty(image.shape, np.uint8)
    for top in range(0, image.shape[0], 256):
        out[top : top + 256] = np.rint(image[top : top + 256] * 255)
    return out


def read_png8(path):
    """A written PNG as H x W x 3 uint8, as the attacker's tool holds it."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def to_tensor(array):
    """H x W x 3 float -> (1, 3, H, W) float32; H x W bool -> (1, 1, H, W) float32."""
    import numpy as np
    import torch

    a = np.ascontiguousarray(array, dtype=np.float32)
    if array.dtype == np.uint8:
        a = a / np.float32(255)
    t = torch.from_numpy(a)
    return t[None, None] if a.ndim == 2 else t.permute(2, 0, 1)[None]


def _target_view(view: View, target, colour):
    """The target on a view: the solid colour protect chose, ``"anti"``, or the view of a
    target image (3, H, W)."""
    import torch

    if colour is not None:
        return colour[:, None, None].expand(3, *view.size).clone()
    if isinstance(target, torch.Tensor):
        return to_tensor(cut(view, target.permute(1, 2, 0).numpy()))[0]
    return target


# ------------------------------------------------------------------------------- memory

#: segments of a LaMa generator's layers recomputed in the backward pass (activation
#: checkpointing): only their boundaries are kept through the forward pass
CHECKPOINT_SEGMENTS = 4


class Checkpointed:
    """``editor`` with its generator's layers checkpointed for the optimisation: the same
    outputs and gradients, a fraction of the activation memory, one more forward pass.
    Editors without a LaMa-style ``generator.model`` layer sequence are used as they are
    (:func:`low_memory`)."""

    def __init__(self, editor, segments: int = CHECKPOINT_SEGMENTS):
        self.editor, self.segments = editor, segments

    def predict(self, image, mask):
        import torch
        from torch.utils.checkpoint import checkpoint_sequential

        e = self.editor
        x = torch.cat([image * (1 - mask), mask], dim=1)
        generator = e.inference_generator(x.device)
        if generator is not e.generator and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        if not torch.is_grad_enabled():
            return generator(x).contiguous()
        layers = generator.model
        return checkpoint_sequential(
            layers, min(self.segments, len(layers)), x, use_reentrant=False
        ).contiguous()


def low_memory(editor):
    """``editor`` whose forward pass checkpoints its generator's layers (LaMa-style editors:
    ``inference_generator`` and ``generator.model``); any other editor as it is. The wrapper
    sets ``predict`` on the editor itself, so :func:`restore` puts it back."""
    gen = getattr(editor, "generator", None)
    if not hasattr(editor, "inference_generator") or not hasattr(gen, "model"):
        return editor
    editor.predict = Checkpointed(editor).predict  # instance attribute over the method
    return editor


def restore(editor) -> None:
    """Undo :func:`low_memory`."""
    editor.__dict__.pop("predict", None)


# ------------------------------------------------------------------------------- protect


def protect_view(
    editor, image, mask, target, device, *, settings: ViewSettings, eps, steps, expand, seed,
    progress=False, name="the editor", editor_weights=None,
) -> tuple[dict, object]:  # fmt: skip
    """Protect the photo ``image`` (H x W x 3 float in [0, 1]) in ``mask`` (H x W bool) on the
    view the attacker's tool uses: the report and the full-resolution H x W x 3 uint8 result.

    Crop: δ lives in the crop, zero elsewhere (the pixels outside are the original's, byte
    for byte). Resize: δ found at the view's size is brought up to the photo's (bicubic),
    clipped to ±ε and added, then rounded to 8 bits. Either way every pixel is within
    ⌊ε·255⌋ 8-bit levels of the original's.
    """
    import cv2
    import numpy as np

    from .owner import protect_image
    from .targets import make_target

    h, w = mask.shape
    vname = protect_view_name(h, w, settings)
    view = make_view(vname, mask, settings)
    xv, mv = cut(view, image), cut(view, mask, mask=True)
    if not mv.any():
        raise CliError(f"--view {vname}: the mask vanishes at the view's size {view.size[1]}×{view.size[0]}")  # fmt: skip
    xt, mt = to_tensor(xv), to_tensor(mv)
    colour = None
    if isinstance(target, str) and target == "solid":
        colour = make_target(xt, "solid")[0, :, 0, 0]  # what implant would pick on the view
    each = list(editor.values()) if isinstance(editor, Mapping) else [editor]
    for e in each:
        low_memory(e)
    try:
        report, prot = protect_image(
            editor, xt, mt, _target_view(view, target, colour), device, eps=eps, steps=steps,
            expand=expand, seed=seed, progress=progress, name=name,
            editor_weights=editor_weights,
            batch_passes=False,  # one editor graph alive at a time: memory follows one pass
        )  # fmt: skip
    finally:
        for e in each:
            restore(e)
    original8 = to_uint8(image)
    limit = math.floor(eps * 255 + 1e-9)
    if vname == "resize" and view.size != (h, w):
        delta = (prot - xv).astype(np.float32)  # on the 8-bit grid of the view
        up = cv2.resize(delta, (w, h), interpolation=cv2.INTER_CUBIC)
        np.clip(up, -limit / 255, limit / 255, out=up)
        up += image
        np.clip(up, 0.0, 1.0, out=up)
        out = np.round(up * 255).astype(np.uint8)
        del up
    else:
        t, left, b, r = view.box
        out = original8.copy()
        out[t:b, left:r] = np.round(prot * 255).astype(np.uint8)
    # the written image within ε of the original, 8-bit levels (exact, whatever the mapping)
    lo = np.maximum(original8, limit) - limit  # original - limit, saturated at 0
    hi = np.minimum(original8, 255 - limit) + limit
    np.clip(out, lo, hi, out=out)
    del lo, hi
    report["max_change_8bit"] = max_change(out, original8)
    report = {
        "view": vname,
        "view_box": list(view.box),
        "view_size": [view.size[1], view.size[0]],
        **report,
    }
    if colour is not None:
        report["target_rgb"] = [round(float(c), 4) for c in colour]
    return report, out


def max_change(a, b) -> int:
    """The largest difference of two uint8 images, in 8-bit levels (a band at a time)."""
    import numpy as np

    return max(
        int(np.abs(a[t : t + 256].astype(np.int16) - b[t : t + 256]).max())
        for t in range(0, a.shape[0], 256)
    )


def check_view(editors: Mapping, image, mask, target, device, *, settings, eps, name=None):
    """check's estimate on the view protect would optimise on: label -> report."""
    from .owner import check_image

    h, w = mask.shape
    vname = protect_view_name(h, w, settings)
    view = make_view(vname, mask, settings)
    xt, mt = to_tensor(cut(view, image)), to_tensor(cut(view, mask, mask=True))
    out = {}
    for label, editor in editors.items():
        who = (name or {}).get(label, label)
        out[label] = {"view": vname, "view_size": [view.size[1], view.size[0]]} | check_image(
            editor, xt, mt, _target_view(view, target, None), device, eps=eps, name=who
        )
    return out


# ------------------------------------------------------------------------------- verify


def verify_pipelines(
    editors: Mapping, image, mask, target, device, written, *, settings: ViewSettings,
    expand, protected_view: str, target_rgb=None, name=None,
) -> dict:  # fmt: skip
    """Edit the PNG as written through each attacker pipeline (the tool's for this size, and
    the view protected on): crop -> edit -> paste back, resize -> edit -> upscale, original.

    Each pipeline's numbers are :func:`runtime_backdoor.owner.compare_edits` on the view the
    editor sees (the paste-back or upscale changes nothing inside the region that decides
    the hit: crop pastes the fill as it is; resize's bicubic upscale of the fill is measured
    at the view's size). The verdict is ``protected`` only when it held under every
    pipeline checked; ``held_under`` names the pipelines it held under.
    """
    import torch

    from .owner import SIDE_EFFECT, compare_edits, ensemble_verdict, verdict_report

    h, w = mask.shape
    pipelines = tool_pipelines(h, w, settings)
    if protected_view not in pipelines:
        pipelines.append(protected_view)
    published = read_png8(written)
    original8 = to_uint8(image)
    colour = None if target_rgb is None else torch.tensor(target_rgb, dtype=torch.float32)
    per_pipeline = {}
    for p in pipelines:
        try:
            view = make_view(p, mask, settings)
        except CliError as err:
            per_pipeline[p] = {"verdict": "not checked", "verdict_detail": str(err)}
            continue
        mv = cut(view, mask, mask=True)
        xo, xp = to_tensor(cut(view, original8)), to_tensor(cut(view, published))
        mt = to_tensor(mv)
        tv = _target_view(view, target, colour)
        per_editor = {}
        for label, editor in editors.items():
            who = (name or {}).get(label, label)
            per_editor[label], _ = compare_edits(
                editor, xo, xp, mt, tv, device, expand=expand, name=who
            )
        per_pipeline[p] = {"view_size": [view.size[1], view.size[0]]} | verdict_report(per_editor)
    checked = {p: r["verdict"] for p, r in per_pipeline.items() if r["verdict"] != "not checked"}
    verdict, _ = ensemble_verdict(checked)
    held = [p for p, v in checked.items() if v in ("protected", SIDE_EFFECT)]
    missed = [p for p in checked if p not in held]
    detail = (
        f"protected on the {protected_view} view; held under {len(held)} of {len(checked)} "
        f"attacker pipelines ({'; '.join(f'{p}: {v}' for p, v in checked.items())}); "
        "protected only when it held under every pipeline checked"
    )
    return {
        "verdict": verdict,
        "verdict_detail": detail,
        "held_under": held,
        "not_held_under": missed,
        "pipelines": per_pipeline,
    }
