"""Editors by name: the registry the CLI, the notebooks and ``params.yaml`` share.

``build_editor(name, weights=..., device=..., **options)`` returns a frozen
:class:`~runtime_backdoor.editors.base.Editor`. Heavy dependencies (diffusers)
are imported only when their editor is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Editor, check_image_mask, pad_to_multiple


@dataclass(frozen=True)
class EditorSpec:
    description: str
    needs_weights: bool
    build: Callable[..., Editor]


def _build_blur(weights=None, **options) -> Editor:
    if weights is not None:
        raise ValueError("editor 'blur-fill' has no weights; drop --weights")
    from .simple import BlurFillEditor

    return BlurFillEditor(**options)


#: the sensitive control of the pipeline's beyond and ε-sweep stages (params.yaml)
TOY_CONTROL = {"gain": 800.0, "reach": 8}


def _build_toy_control(weights=None, **options) -> Editor:
    if weights is not None:
        raise ValueError("editor 'toy-control' has no weights; drop --weights")
    from .simple import GlobalMixEditor

    return GlobalMixEditor(**(TOY_CONTROL | options))


def _build_lama(weights=None, **options) -> Editor:
    from .lama import load_lama

    return load_lama(weights, **options)


def _build_mini_lama(weights=None, **options) -> Editor:
    from .mini import EDITOR_STAGE_HELP, load_miniature

    if weights is None:
        raise ValueError(
            f"editor 'mini-lama' needs its trained weights (--weights); {EDITOR_STAGE_HELP}"
        )
    return load_miniature(weights, **options)


def _build_sd(weights=None, **options) -> Editor:
    from .diffusion import load_sd_inpainting

    model = weights if weights is not None else options.pop("model", None)
    if model is None:
        raise ValueError(
            "editor 'sd-inpainting' needs a model: a local diffusers folder or a hub id "
            "such as stable-diffusion-v1-5/stable-diffusion-inpainting (--weights)"
        )
    return load_sd_inpainting(model, **options)


def _build_mat(weights=None, **options) -> Editor:
    from .mat import MAT_HELP, load_mat

    if weights is None and options.get("seed") is None:
        raise ValueError(f"editor 'mat' needs its weights (--weights). {MAT_HELP}")
    return load_mat(weights, **options)


EDITORS: dict[str, EditorSpec] = {
    "lama": EditorSpec(
        "LaMa (Big-LaMa checkpoint: best.ckpt, big-lama.pt or safetensors)", True, _build_lama
    ),
    "mini-lama": EditorSpec(
        "the embedded miniature LaMa trained by the pipeline's editor stage", True, _build_mini_lama
    ),
    "sd-inpainting": EditorSpec(
        "Stable Diffusion inpainting through diffusers (folder or hub id)", True, _build_sd
    ),
    "blur-fill": EditorSpec(
        "classical normalised-convolution fill (no weights; insensitive)", False, _build_blur
    ),
    "toy-control": EditorSpec(
        "TOY control, not an inpainter: fills the hole with one colour that depends steeply "
        "on the pixels around it (no weights)",
        False,
        _build_toy_control,
    ),
    "mat": EditorSpec(
        "MAT, 512 px (Places_512_FullData_G.pth, official .pkl or safetensors; extra '.[mat]')",
        True,
        _build_mat,
    ),
}


def build_editor(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options,
) -> Editor:
    """Build the editor registered as ``name``, frozen and in eval mode, on ``device``."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known editors: {', '.join(EDITORS)}")
    editor = EDITORS[name].build(weights=weights, **options)
    editor = editor.to(device=device, dtype=dtype).eval()
    editor.requires_grad_(False)
    return editor


__all__ = ["EDITORS", "Editor", "EditorSpec", "build_editor", "check_image_mask", "pad_to_multiple"]
