"""Expectation over transformations (EOT): one editor wrapper over any list of the vocabulary.

The optimiser (:func:`runtime_backdoor.implant.implant`) only sees an editor, so EOT is an
editor too: ``implant(EOTEditor(editor, ["jpeg", "resize", "dilate"]), ...)`` optimises the
expectation over random draws of the listed transformations, written in the one vocabulary of
:mod:`runtime_backdoor.transforms` (forms :data:`runtime_backdoor.transforms.EOT`).

Two ways to draw (``pick``):

- ``"each"`` (the ``beyond`` stage's ``backdoor_eot``): for every image and call, each listed
  transformation is applied independently with probability ``p``, in the listed order;
- ``"one"`` (the ``purify`` stage's adaptive defence): for every image and call, one listed
  transformation drawn with equal probabilities; the images that drew the same one go through
  it and the editor as one batch.

A transformation with a value is applied with it (``jpeg:75``, ``noise:12.75``); a bare word
is drawn at random: ``jpeg`` a quality in ``jpeg_quality``, ``resize`` a scale in ``scale``,
``noise`` σ = ``noise`` 8-bit levels, ``dilate`` / ``shift`` up to ``dilate_px`` /
``shift_px`` px (``dilate:N`` / ``shift:N``: up to N px). Gradients:

- ``jpeg``: the real PIL round trip forward, the identity backward (``jpeg_grad=
  "straight-through"``), or kornia's differentiable JPEG (``jpeg_grad="kornia"``);
- ``adverse-cleaner``: its real output forward, the identity backward (straight-through);
- ``resize`` (bilinear, antialiased), ``blur``, ``noise`` (a seeded sum), ``crop:P%``
  (bilinear crop-and-resize; the mask follows and the output is mapped back by the inverse
  crop-resize and pasted over the caller's image): differentiable;
- ``dilate``: the edit mask grown by 1..N px (mask jitter; growing keeps the loss regions
  filled by the editor); ``shift``: image and mask translated (reflected borders) and the
  output translated back, applied after the other draws;
- the [0, 1] clip passes gradients straight through, as in the optimiser.

The output is composited with the caller's mask on the caller's image. ``active``: ``None``
(default) draws only while gradients are recorded and is the plain editor under
``torch.no_grad()`` (``implant``'s clean ring reference must be the editor's normal behaviour).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import transforms as T
from .editors.base import Editor
from .purifiers import (
    _crop_resize,
    _uncrop,
    adverse_cleaner,
    crop_resize_mask,
    jpeg_differentiable,
    straight_through,
)
from .robustness import _translate, gaussian_blur, jpeg_straight_through, resize_differentiable

PICKS = ("each", "one")
JPEG_GRADS = ("straight-through", "kornia")


BARE = ("jpeg", "resize", "noise", "dilate", "shift")


def parse_draws(text) -> list[T.Spec]:
    """The EOT list of a ``params.yaml`` string (or a list): forms :data:`transforms.EOT`, the
    words of :data:`BARE` also bare (drawn at random)."""
    return T.parse_list(text, T.EOT, what="EOT draw", bare=BARE)


class EOTEditor(Editor):
    """``editor`` behind random draws of ``transforms`` (specs of :data:`transforms.EOT`)."""

    size_multiple = 1

    def __init__(
        self,
        editor: torch.nn.Module,
        transforms=("jpeg", "resize", "dilate"),
        *,
        pick: str = "each",
        p: float = 0.5,
        jpeg_quality: tuple[int, int] = (50, 95),
        scale: tuple[float, float] = (0.5, 1.0),
        noise: float = 2.0,
        dilate_px: int = 2,
        shift_px: int = 4,
        jpeg_grad: str = "straight-through",
        seed: int = 0,
        active: bool | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
        if jpeg_grad not in JPEG_GRADS:
            raise ValueError(f"jpeg_grad must be one of {', '.join(JPEG_GRADS)}, got {jpeg_grad!r}")
        self.specs = parse_draws(transforms)
        if not self.specs:
            raise ValueError("EOT needs at least one transformation")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be a probability, got {p}")
        if not 1 <= jpeg_quality[0] <= jpeg_quality[1] <= 100:
            raise ValueError(
                f"jpeg_quality must be (low, high) within [1, 100], got {jpeg_quality}"
            )
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (low, high) within (0, 1], got {scale}")
        T.parse(f"noise:{T.number(noise)}", ("noise",), what="EOT noise")  # 8-bit levels
        self.editor = editor
        inner = getattr(editor, "name", type(editor).__name__)
        self.name = name or (f"eot({inner})" if pick == "each" else f"purifier-eot({inner})")
        self.transforms = tuple(s.name for s in self.specs)
        self.pick = pick
        self.p = p
        self.jpeg_quality = jpeg_quality
        self.scale = scale
        self.noise = noise
        self.dilate_px = dilate_px
        self.shift_px = shift_px
        self.jpeg_grad = jpeg_grad
        self.active = active
        self.generator = torch.Generator().manual_seed(seed)

    # -------------------------------------------------------------------------- draws

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _integer(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def _apply(self, spec: T.Spec, x: torch.Tensor, m: torch.Tensor):
        """One transformation of a batch ``x`` (its masks ``m``): (x, m, undo, (dy, dx))."""
        w, v = spec.word, spec.value
        undo, move = None, None
        if w == "jpeg":
            q = self._integer(*self.jpeg_quality) if v is None else int(v)
            if self.jpeg_grad == "kornia":
                x = jpeg_differentiable(x, q if v is None else v)
            else:
                x = jpeg_straight_through(x, q)
        elif w == "resize":
            x = resize_differentiable(x, self._uniform(*self.scale) if v is None else v)
        elif w == "blur":
            x = gaussian_blur(x, v)
        elif w == "noise":
            sigma = (self.noise if v is None else v) / 255
            x = x + sigma * torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        elif w == "crop":
            fraction, before = v / 100, x
            x, m = _crop_resize(x, fraction, "bilinear"), crop_resize_mask(m, fraction)
            undo = lambda out: _uncrop(out, before, fraction)  # noqa: E731
        elif w == "adverse-cleaner":
            x = straight_through(x, adverse_cleaner)
        elif w == "dilate":
            r = self._integer(1, max(1, self.dilate_px if v is None else int(v)))
            m = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
        elif w == "shift":
            n = self.shift_px if v is None else int(v)
            move = (self._integer(-n, n), self._integer(-n, n))
        return x, m, undo, move

    def _edit(self, x, m, undos, move):
        """Clip (straight through), shift, edit as one batch, and undo in reverse order."""
        dy, dx = move
        x = x + (x.clamp(0, 1) - x).detach()
        mode = "reflect" if max(abs(dy), abs(dx)) < min(x.shape[-2:]) else "replicate"
        out = self.editor(_translate(x, dy, dx, mode), _translate(m, dy, dx, "constant"))
        out = _translate(out, -dy, -dx, mode)
        for undo in reversed(undos):
            out = undo(out)
        return out

    def transform(self, image: torch.Tensor, mask: torch.Tensor):
        """``pick="each"``: one random draw for one image (1, 3, H, W): (image, mask, undos,
        shift); the shift is applied after the other draws."""
        move, undos = (0, 0), []
        for spec in self.specs:
            if float(torch.rand((), generator=self.generator)) >= self.p:
                continue
            image, mask, undo, moved = self._apply(spec, image, mask)
            undos += [undo] if undo else []
            move = moved or move
        return image, mask, undos, move

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        active = torch.is_grad_enabled() if self.active is None else self.active
        if not active:
            return self.editor(image, mask)
        if self.pick == "each":
            return self._predict_each(image, mask)
        return self._predict_one(image, mask)

    def _predict_each(self, image, mask):
        drawn = [self.transform(image[i : i + 1], mask[i : i + 1]) for i in range(image.shape[0])]
        if all(not undos for _, _, undos, _ in drawn):
            # Every draw keeps the image size and frame: one batched editor call for all of them.
            images, masks, modes = [], [], []
            for img, msk, _, (dy, dx) in drawn:
                img = img + (img.clamp(0, 1) - img).detach()
                mode = "reflect" if max(abs(dy), abs(dx)) < min(img.shape[-2:]) else "replicate"
                images.append(_translate(img, dy, dx, mode))
                masks.append(_translate(msk, dy, dx, "constant"))
                modes.append(mode)
            out = self.editor(torch.cat(images), torch.cat(masks))
            return torch.cat(
                [
                    _translate(out[i : i + 1], -dy, -dx, mode)
                    for i, ((*_, (dy, dx)), mode) in enumerate(zip(drawn, modes, strict=True))
                ]
            )
        return torch.cat([self._edit(img, msk, undos, mv) for img, msk, undos, mv in drawn])

    def _predict_one(self, image, mask):
        draws = torch.randint(len(self.specs), (image.shape[0],), generator=self.generator)
        parts, order = [], []
        for j, spec in enumerate(self.specs):
            idx = torch.nonzero(draws == j).flatten().tolist()
            if not idx:
                continue
            x, m, undo, move = self._apply(spec, image[idx], mask[idx])
            parts.append(self._edit(x, m, [undo] if undo else [], move or (0, 0)))
            order += idx
        out = torch.cat(parts)
        return out[torch.argsort(torch.tensor(order, device=out.device))]


__all__ = ["BARE", "JPEG_GRADS", "PICKS", "EOTEditor", "parse_draws"]
