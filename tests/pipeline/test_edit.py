"""Stage ``edit`` (runtime_backdoor.pipeline.edit): every scenario on clean and protected."""

import json

import numpy as np
import torch

from runtime_backdoor.data import read_image, read_mask, write_json
from runtime_backdoor.editors import editor_record
from runtime_backdoor.masks import SCENARIOS, scenario_masks
from runtime_backdoor.pipeline import edit, prepare


def test_scenario_masks_relations():
    m = torch.zeros(1, 1, 48, 48)
    m[..., 10:20, 12:24] = 1
    s = scenario_masks(m, kernel=5)
    assert list(s) == list(SCENARIOS)
    assert torch.all(s["ring"] * m == 0)
    assert torch.all(s["half_ring"] <= s["ring"])
    assert torch.all(s["elsewhere"] * s["expanded"] == 0)
    assert torch.all(s["incomplete"] <= s["expanded"])


def test_stage_edits_every_scenario_and_keeps_pixels_outside_the_mask(raw, tmp_path):
    prepare.prepare(raw, tmp_path / "prepared", size=32)
    # The clean images stand in for protected ones: both edits must then be identical.
    record = write_json(tmp_path / "editor.json", editor_record("blur-fill"))
    result = edit.run(
        tmp_path / "edited", prepared_dir=tmp_path / "prepared", protected_dir=tmp_path / "prepared",
        editor_record=record, expand_kernel=3, device="cpu",
    )  # fmt: skip
    edits = result["edits"]
    assert len(edits) == 3 * len(SCENARIOS) and set(edits["scenario"]) == set(SCENARIOS)
    assert json.loads((tmp_path / "edited" / "summary.json").read_text())["n_edits"] == 18
    for row in edits.head(6).to_dict("records"):
        stem = f"{row['name']}__{row['scenario']}.png"
        clean = read_image(tmp_path / "edited" / "clean" / stem)
        np.testing.assert_array_equal(clean, read_image(tmp_path / "edited" / "protected" / stem))
        region = read_mask(tmp_path / "edited" / "masks" / stem)
        original = read_image(tmp_path / "prepared" / f"{row['name']}.png")
        assert np.abs(clean - original)[~region].max() <= 1 / 255 + 1e-6
