"""Editor specs (``label:name(key:value,...)``): parsing, building, the pipeline's record."""

import pytest

from runtime_backdoor import study
from runtime_backdoor.editors.specs import (
    build_from_spec,
    load_record,
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


def test_pipeline_spec_loads_the_editor_stage_record(tmp_path):
    record = study.write_json(
        tmp_path / "editor.json", study.editor_record("lama", None, preset="mini", seed=0)
    )
    with pytest.raises(ValueError, match="editor_record"):
        build_from_spec("pipeline")
    editor = build_from_spec("pipeline", record)
    assert editor.generator.config == load_record(record).generator.config
    assert not any(p.requires_grad for p in editor.parameters())
