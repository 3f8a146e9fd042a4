"""Editors by name: the one registry that the CLI, the demo, ``params.yaml``, the real-model
runs and the benchmarks share.

:data:`EDITORS` maps each name to an :class:`EditorEntry`: how to build it, whether it reads
weights (``none``, a ``file`` or a ``folder``), and which entries of
:data:`runtime_backdoor.weights.REGISTRY` hold them, so that a name means the same editor
everywhere: ``--editor NAME``, ``editor.name`` and the specs ``NAME(key:value,...)`` of
:mod:`.specs`. ``build_editor(name, weights=..., device=..., **options)`` returns it frozen.
Heavy dependencies (diffusers, spandrel) are imported only when their editor is built.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import Editor, check_image_mask, pad_to_multiple

WEIGHT_KINDS = ("none", "file", "folder")


@dataclass(frozen=True)
class EditorEntry:
    """One registered editor."""

    #: a few words for menus (the demo's editor list)
    title: str
    #: what ``runtime-backdoor editors`` says of it
    description: str
    #: ``build(weights=None, **options)``: the editor on the CPU
    build: Callable[..., Editor]
    #: what ``--weights`` names: nothing, a file, or a folder (a diffusers model)
    weight_kind: str = "none"
    #: entries of ``weights.REGISTRY`` this editor reads, its default first
    weights: tuple[str, ...] = ()
    #: where its default weights lie under ``models/`` when no ``weights.REGISTRY`` entry
    #: fetches them (the miniature the pipeline's editor stage trains)
    default_path: str | None = None

    @property
    def needs_weights(self) -> bool:
        """Real weights are needed to edit with it (random ones only stand in, in tests)."""
        return self.weight_kind != "none"


def _build_blur(weights=None, **options) -> Editor:
    from .simple import BlurFillEditor

    return BlurFillEditor(**options)


def _build_global_mix(weights=None, **options) -> Editor:
    from .simple import GlobalMixEditor

    return GlobalMixEditor(**options)


#: the sensitive control of the pipeline's beyond and ε-sweep stages (params.yaml)
TOY_CONTROL = {"gain": 800.0, "reach": 8}


def _build_toy_control(weights=None, **options) -> Editor:
    return _build_global_mix(**(TOY_CONTROL | options))


#: options that change one number of the LaMa preset (random weights of other sizes)
LAMA_OVERRIDES = ("ngf", "n_blocks", "n_downsampling", "global_ratio")


def _build_lama(weights=None, preset=None, **options) -> Editor:
    """Big-LaMa for a weight file; random weights (``seed=...``) default to the miniature
    preset, a stand-in cheap enough for tests and transfer tables on a CPU."""
    from .lama import _resolve_preset, load_lama

    preset = preset or ("mini" if weights is None else "big-lama")
    overrides = {k: options.pop(k) for k in LAMA_OVERRIDES if k in options}
    if overrides:
        preset = dataclasses.replace(_resolve_preset(preset), **overrides)
    return load_lama(weights, preset=preset, **options)


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


def _build_tiny_sd(weights=None, **options) -> Editor:
    from .diffusion import tiny_sd_inpainting

    return tiny_sd_inpainting(**options)


def _build_mat(weights=None, **options) -> Editor:
    from .mat import MAT_HELP, load_mat

    if weights is None and options.get("seed") is None:
        raise ValueError(f"editor 'mat' needs its weights (--weights). {MAT_HELP}")
    return load_mat(weights, **options)


EDITORS: dict[str, EditorEntry] = {
    "lama": EditorEntry(
        "LaMa",
        "LaMa (Big-LaMa checkpoint: best.ckpt, big-lama.pt or safetensors; "
        "random weights: preset, seed)",
        _build_lama,
        "file",
        ("big-lama", "big-lama-ckpt"),
    ),
    "mini-lama": EditorEntry(
        "the embedded miniature LaMa",
        "the embedded miniature LaMa trained by the pipeline's editor stage",
        _build_mini_lama,
        "file",
        default_path="editor/mini-lama.safetensors",
    ),
    "sd-inpainting": EditorEntry(
        "Stable Diffusion inpainting",
        "Stable Diffusion inpainting through diffusers (folder or hub id)",
        _build_sd,
        "folder",
        ("sd15-inpainting", "sd2-inpainting"),
    ),
    "tiny-sd": EditorEntry(
        "a random miniature SD inpainting, for tests",
        "a random miniature SD-inpainting stack for CPU runs (no weights; its numbers say "
        "nothing about real SD)",
        _build_tiny_sd,
    ),
    "mat": EditorEntry(
        "MAT",
        "MAT, 512 px (Places_512_FullData_G.pth, official .pkl or safetensors; extra '.[mat]')",
        _build_mat,
        "file",
        ("mat-places512",),
    ),
    "blur-fill": EditorEntry(
        "classical fill (insensitive)",
        "classical normalised-convolution fill (no weights; insensitive)",
        _build_blur,
    ),
    "toy-control": EditorEntry(
        "a TOY sensitive control, not an inpainter",
        "TOY control, not an inpainter: fills the hole with one colour that depends steeply "
        "on the pixels around it (no weights)",
        _build_toy_control,
    ),
    "global-mix": EditorEntry(
        "the toy control with its own defaults",
        "the toy control with its own defaults (gain, reach, seed, size as options; no weights)",
        _build_global_mix,
    ),
}


def _entry(name: str) -> EditorEntry:
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known editors: {', '.join(EDITORS)}")
    return EDITORS[name]


def build_editor(
    name: str,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options,
) -> Editor:
    """Build the editor registered as ``name``, frozen and in eval mode, on ``device``."""
    entry = _entry(name)
    if weights is not None and not entry.needs_weights:
        raise ValueError(f"editor {name!r} has no weights; drop --weights")
    editor = entry.build(weights=weights, **options)
    editor = editor.to(device=device, dtype=dtype).eval()
    editor.requires_grad_(False)
    return editor


def editor_record(name: str, weights: str | None = None, **options) -> dict:
    """What the ``editor`` stage writes to ``models/editor/editor.json`` for later stages."""
    _entry(name)
    return {"name": name, "weights": weights or None, "options": options}


def load_recorded_editor(record_path, device: str | torch.device = "cpu") -> Editor:
    """Build the editor described by the ``editor`` stage's record (``editor.json``)."""
    path = Path(record_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run the editor stage first (`dvc pull editor` or `dvc repro editor`)"
        )
    record = json.loads(path.read_text())
    return build_editor(
        record["name"], weights=record["weights"], device=device, **record.get("options", {})
    )


__all__ = [
    "EDITORS",
    "Editor",
    "EditorEntry",
    "TOY_CONTROL",
    "build_editor",
    "check_image_mask",
    "editor_record",
    "load_recorded_editor",
    "pad_to_multiple",
]
