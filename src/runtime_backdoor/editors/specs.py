"""Editors named by compact specs, as ``params.yaml`` holds them: ``label:name(key:value,...)``.

A spec names one editor of the registry (:data:`runtime_backdoor.editors.EDITORS`) with its
options, so that a stage's parameters list several editors as one plain string (``pipeline
blur-fill control:global-mix(gain:800,reach:8)``); :func:`build_from_spec` builds it with
:func:`~runtime_backdoor.editors.build_editor`, so a spec's name and ``--editor NAME`` are
the same editor. ``weights:PATH`` is the option for the weights.
"""

from __future__ import annotations

import dataclasses

from . import EDITORS, build_editor, load_recorded_editor

#: the editor the pipeline's ``editor`` stage recorded (``models/editor/editor.json``)
PIPELINE = "pipeline"


@dataclasses.dataclass(frozen=True)
class ParsedSpec:
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


def parse_editor_spec(text: str) -> ParsedSpec:
    """Parse one spec (no spaces, no ``=``: papermill's parameter parser rejects it).

    ``pipeline`` (the editor stage's record), ``global-mix(gain:400,reach:8)``,
    ``lama(preset:mini,seed:1)`` (random weights; ``ngf``/``n_blocks``/``n_downsampling``/
    ``global_ratio`` override the preset), ``lama(weights:PATH)``, ``mini-lama(weights:PATH)``,
    ``sd-inpainting(weights:PATH)``, ``tiny-sd(seed:0)`` (random miniature SD inpainting),
    ``mat(weights:PATH)``, ``mat(seed:0)`` (random MAT), ``blur-fill``, ``toy-control``.
    A ``label:`` prefix names it (``control:global-mix(reach:8)``); the label defaults to the
    spec itself.
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
    if name != PIPELINE and name not in EDITORS:
        known = ", ".join([PIPELINE, *EDITORS])
        raise ValueError(f"editor spec {text!r}: unknown editor {name!r}; known: {known}")
    return ParsedSpec(label, name, tuple(options))


def parse_editor_specs(text: str | list) -> list[ParsedSpec]:
    """A space-separated string of specs (or a list of specs); labels must be unique."""
    items = text.split() if isinstance(text, str) else list(text)
    specs = [s if isinstance(s, ParsedSpec) else parse_editor_spec(s) for s in items]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"editor labels must be unique, got {labels}")
    return specs


def build_from_spec(spec: ParsedSpec | str, editor_record=None, device="cpu"):
    """Build the editor of ``spec``; ``pipeline`` loads ``editor_record`` (models/editor/editor.json)."""
    spec = parse_editor_spec(spec) if isinstance(spec, str) else spec
    if spec.name == PIPELINE:
        if editor_record is None:
            raise ValueError(
                "editor spec 'pipeline' needs the editor stage's record (editor_record)"
            )
        return load_recorded_editor(editor_record, device=device)
    options = spec.kwargs
    return build_editor(spec.name, weights=options.pop("weights", None), device=device, **options)


__all__ = [
    "PIPELINE",
    "ParsedSpec",
    "build_from_spec",
    "parse_editor_spec",
    "parse_editor_specs",
]
