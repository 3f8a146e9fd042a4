"""Editors named by compact specs, as ``params.yaml`` holds them: ``label:name(key:value,...)``.

A spec names one editor kind of :data:`EDITOR_KINDS` with its options, so that a stage's
parameters list several editors as one plain string (``pipeline blur-fill
control:global-mix(gain:800,reach:8)``); :func:`build_from_spec` builds it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import build_editor

#: the editor the pipeline's ``editor`` stage recorded (``models/editor/editor.json``)
PIPELINE = "pipeline"


@dataclasses.dataclass(frozen=True)
class EditorSpec:
    """An editor named in ``params.yaml``: ``label:name(key:value,key:value)``."""

    label: str
    name: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def kwargs(self) -> dict:
        return dict(self.options)


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_editor_spec(text: str) -> EditorSpec:
    """Parse one spec (no spaces, no ``=``: papermill's parameter parser rejects it).

    ``pipeline`` (the editor stage's record), ``global-mix(gain:400,reach:8)``,
    ``lama(preset:mini,seed:1)`` (random weights; ``ngf``/``n_blocks``/``n_downsampling``/
    ``global_ratio`` override the preset), ``lama(weights:PATH)``, ``mini-lama(weights:PATH)``,
    ``sd-inpainting(weights:PATH)``, ``tiny-sd(seed:0)`` (random miniature SD inpainting),
    ``blur-fill``. A ``label:`` prefix names it (``control:global-mix(reach:8)``); the label
    defaults to the spec itself.
    """
    text = str(text).strip()
    head, paren, rest = text.partition("(")
    if paren and not rest.endswith(")"):
        raise ValueError(f"editor spec {text!r}: options must end with ')'")
    label, _, name = head.rpartition(":")
    label = label or text
    options = []
    for item in filter(None, rest[:-1].split(",") if paren else []):
        key, colon, value = item.partition(":")
        if not colon:
            raise ValueError(f"editor spec {text!r}: option {item!r} is not key:value")
        options.append((key.strip(), _literal(value.strip())))
    if name not in EDITOR_KINDS:
        raise ValueError(
            f"editor spec {text!r}: unknown editor {name!r}; known: {', '.join(EDITOR_KINDS)}"
        )
    return EditorSpec(label, name, tuple(options))


def parse_editor_specs(text: str | list) -> list[EditorSpec]:
    """A space-separated string of specs (or a list of specs); labels must be unique."""
    items = text.split() if isinstance(text, str) else list(text)
    specs = [s if isinstance(s, EditorSpec) else parse_editor_spec(s) for s in items]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"editor labels must be unique, got {labels}")
    return specs


def _build_lama(opts: dict):
    from .lama import PRESETS

    weights = opts.pop("weights", None)
    preset = opts.pop("preset", "mini" if weights is None else "big-lama")
    overrides = {
        k: opts.pop(k) for k in ("ngf", "n_blocks", "n_downsampling", "global_ratio") if k in opts
    }
    config = dataclasses.replace(PRESETS[preset], **overrides)
    if weights is None:
        opts.setdefault("seed", 0)
    return build_editor("lama", weights=weights, preset=config, **opts)


def _build_simple(cls_name: str):
    def build(opts: dict):
        from . import simple

        return getattr(simple, cls_name)(**opts).eval().requires_grad_(False)

    return build


def _build_registry(name: str):
    def build(opts: dict):
        return build_editor(name, weights=opts.pop("weights", None), **opts)

    return build


def _build_tiny_sd(opts: dict):
    from .diffusion import tiny_sd_inpainting

    return tiny_sd_inpainting(**opts).eval().requires_grad_(False)


EDITOR_KINDS = {
    PIPELINE: None,
    "global-mix": _build_simple("GlobalMixEditor"),
    "blur-fill": _build_simple("BlurFillEditor"),
    "lama": _build_lama,
    "mini-lama": _build_registry("mini-lama"),
    "sd-inpainting": _build_registry("sd-inpainting"),
    "tiny-sd": _build_tiny_sd,
}


def build_from_spec(spec: EditorSpec | str, editor_record=None, device="cpu"):
    """Build the editor of ``spec``; ``pipeline`` loads ``editor_record`` (models/editor/editor.json)."""
    spec = parse_editor_spec(spec) if isinstance(spec, str) else spec
    if spec.name == PIPELINE:
        if editor_record is None:
            raise ValueError(
                "editor spec 'pipeline' needs the editor stage's record (editor_record)"
            )
        return load_record(editor_record, device=device)
    return EDITOR_KINDS[spec.name](spec.kwargs).to(device)


def load_record(record_path, device: str | torch.device = "cpu"):
    """Build the editor described by the ``editor`` stage's record (``models/editor/editor.json``)."""
    record = json.loads(Path(record_path).read_text())
    return build_editor(
        record["name"], weights=record["weights"], device=device, **record.get("options", {})
    )


__all__ = [
    "EDITOR_KINDS",
    "PIPELINE",
    "EditorSpec",
    "build_from_spec",
    "load_record",
    "parse_editor_spec",
    "parse_editor_specs",
]
