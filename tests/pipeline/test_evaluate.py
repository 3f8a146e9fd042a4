"""Stage ``evaluate`` (runtime_backdoor.pipeline.evaluate): metrics per edit and the flat summary."""

import json
import re

import pytest

from runtime_backdoor.budget import Budget
from runtime_backdoor.data import write_json
from runtime_backdoor.editors import editor_record
from runtime_backdoor.masks import SCENARIOS
from runtime_backdoor.pipeline import edit, evaluate, implant, prepare


@pytest.fixture(scope="module")
def folders(raw, tmp_path_factory):
    d = tmp_path_factory.mktemp("evaluate")
    prepare.prepare(raw, d / "prepared", size=32)
    record = write_json(d / "editor.json", editor_record("toy-control"))
    common = {"prepared_dir": d / "prepared", "editor_record": record, "device": "cpu"}
    implant.run(
        d / "protected", figure=d / "loss.png", curves=d / "loss.csv",
        budget=Budget(steps=3, expand_kernel=3), **common,
    )  # fmt: skip
    edit.run(d / "edited", protected_dir=d / "protected", expand_kernel=3, **common)
    return d


def test_stage_measures_every_edit_within_the_budget(folders):
    d = folders
    result = evaluate.run(
        d / "reports", prepared_dir=d / "prepared", protected_dir=d / "protected",
        edited_dir=d / "edited", clip_weights="", device="cpu",
    )  # fmt: skip
    per_edit, imp = result["per_edit"], result["imperceptibility"]
    assert len(per_edit) == 3 * len(SCENARIOS)
    # An L∞ change of at most 6 levels bounds the PSNR below by 20·log10(255/6) = 32.57 dB.
    assert imp["linf_8bit"].max() <= 6 + 1e-4 and (imp["psnr"] >= 32.57).all()
    assert per_edit["ssim_vs_clean_edit"].between(-1, 1).all()
    assert per_edit["hit_fraction_protected"].between(0, 1).all()
    summary = json.loads((d / "reports" / "metrics.json").read_text())
    assert summary["n_images"] == 3 and summary["clip_fid_available"] is False
    assert not any(k.startswith("clip_fid_mask") for k in summary)
    key = "malicious_mask_hit_rate_protected"
    assert summary[f"{key}_low"] <= summary[key] <= summary[f"{key}_high"]
    assert all(re.fullmatch(r"[a-z0-9_]+", k) for k in summary)
    clip = json.loads((d / "reports" / "clip_fid.json").read_text())
    assert clip["available"] is False and clip["reason"]


def test_an_identical_edit_counts_as_100_db_not_infinity(folders):
    d = folders
    result = evaluate.run(
        d / "reports2", prepared_dir=d / "prepared", protected_dir=d / "protected",
        edited_dir=d / "edited", clip_weights="", device="cpu",
    )  # fmt: skip
    assert all(v != float("inf") for v in result["summary"].values() if isinstance(v, float))


def test_lpips_columns_with_a_backbone_and_the_reason_without(folders, tmp_path, random_alexnet):
    d = folders
    common = dict(prepared_dir=d / "prepared", protected_dir=d / "protected",
                  edited_dir=d / "edited", clip_weights="", device="cpu")  # fmt: skip
    without = evaluate.run(tmp_path / "a", lpips_backbone=str(tmp_path / "none.pth"), **common)
    assert without["summary"]["lpips_available"] is False
    assert (
        without["summary"]["lpips_unavailable"]
        == "no backbone: runtime-backdoor weights fetch lpips-alex"
    )
    assert "lpips_vs_clean_edit" not in without["per_edit"]
    got = evaluate.run(tmp_path / "b", lpips_backbone=str(random_alexnet), **common)
    summary = got["summary"]
    assert summary["lpips_available"] is True and "lpips_unavailable" not in summary
    assert (got["imperceptibility"]["lpips"] >= 0).all()
    key = "benign_ring_lpips_vs_clean_edit"
    assert summary[f"{key}_low"] <= summary[key] <= summary[f"{key}_high"]
