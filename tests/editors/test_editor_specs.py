"""Editor specs (``label:name(key:value,...)``): parsing, building, the pipeline's record."""

import pytest

from runtime_backdoor.data import write_json
from runtime_backdoor.editors import editor_record, load_recorded_editor
from runtime_backdoor.editors.specs import (
    ParsedSpec,
    build_from_spec,
    parse_editor_spec,
    parse_editor_specs,
)


def test_editor_specs_parse_and_build():
    s = parse_editor_spec("control:global-mix(gain:800,reach:3)")
    assert (s.label, s.name, s.kwargs) == ("control", "global-mix", {"gain": 800, "reach": 3})
    plain = parse_editor_spec("lama(preset:mini,seed:1,ngf:8)")
    assert plain.label == "lama(preset:mini,seed:1,ngf:8)"
    editor = build_from_spec(plain)
    assert editor.generator.config.ngf == 8
    assert parse_editor_spec("pipeline").name == "pipeline"
    for bad in ("nope", "global-mix(gain800)", "global-mix(gain:1"):
        with pytest.raises(ValueError):
            parse_editor_spec(bad)
    with pytest.raises(ValueError, match="unique"):
        parse_editor_specs("a:global-mix a:blur-fill")
    specs = parse_editor_specs(["a:blur-fill", ParsedSpec("b", "toy-control")])
    assert [(s.label, s.name) for s in specs] == [("a", "blur-fill"), ("b", "toy-control")]


def test_unknown_spec_lists_the_registry_names():
    with pytest.raises(ValueError) as err:
        parse_editor_spec("x:sd-tiny(seed:0)")
    assert "unknown editor 'sd-tiny'" in str(err.value)
    assert "known: pipeline, lama, mini-lama, sd-inpainting, tiny-sd, mat" in str(err.value)


def test_pipeline_spec_loads_the_editor_stage_record(tmp_path):
    record = write_json(
        tmp_path / "editor.json", editor_record("lama", None, preset="mini", seed=0)
    )
    with pytest.raises(ValueError, match="editor_record"):
        build_from_spec("pipeline")
    editor = build_from_spec("pipeline", record)
    assert editor.generator.config == load_recorded_editor(record).generator.config
    assert not any(p.requires_grad for p in editor.parameters())
