"""Stage ``ensemble`` (runtime_backdoor.pipeline.ensemble): leave-one-editor-out."""

import json

import pytest

from runtime_backdoor.budget import Budget
from runtime_backdoor.pipeline import ensemble, prepare

EDITORS = "a:global-mix(gain:800,reach:3,seed:0) b:global-mix(gain:800,reach:3,seed:1)"


@pytest.fixture(scope="module")
def stage(raw, tmp_path_factory):
    d = tmp_path_factory.mktemp("ensemble")
    prepare.prepare(raw, d / "prepared", size=32)
    result = ensemble.run(
        d / "reports", prepared_dir=d / "prepared", editors=EDITORS,
        budget=Budget(steps=4, expand_kernel=3), seeds=2,
        device="cpu",
    )  # fmt: skip
    return d, result


def test_every_editor_is_edited_under_every_protection(stage):
    d, result = stage
    rows = result["per_image"]
    # editors x protections x images x seeds
    assert len(rows) == 2 * len(ensemble.PROTECTIONS) * 3 * 2 and set(rows["seed"]) == {0, 1}
    assert set(rows["protection"]) == set(ensemble.PROTECTIONS)
    # Every protection stays within the budget: PSNR at least 20·log10(255/6.375).
    assert (rows["protection_psnr"] >= 32.0).all()
    assert rows["hit_fraction"].between(0, 1).all()
    table = result["table"]
    assert (table["hit_low"] <= table["hit"]).all() and (table["hit"] <= table["hit_high"]).all()


def test_reports_are_written_with_flat_keys(stage):
    d, result = stage
    out = d / "reports" / "ensemble"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 3
    assert {"a_alone_hit_rate", "b_without_hit_rate_high", "a_all_ring_psnr_low"} <= set(metrics)
    found = json.loads((out / "conclusions.json").read_text())
    # editors x (left out vs clean + (without, all) x (hit, ring PSNR))
    assert len(found) == 2 * (1 + 2 * 2)
    assert {c["family"] for c in found} == {
        "ensemble/left_out_fires", "ensemble/without_vs_alone/hit",
        "ensemble/without_vs_alone/ring_psnr", "ensemble/all_vs_alone/hit",
        "ensemble/all_vs_alone/ring_psnr",
    }  # fmt: skip
    assert all(c["m"] == 2 and 0 <= c["p"] <= c["p_adjusted"] <= 1 for c in found)
    assert {"a_alone_seed0_hit_rate", "a_alone_seed1_hit_rate", "b_all_hit_rate_seed_range",
            "a_without_clean_hit_rate"} <= set(metrics)  # fmt: skip
    # Three images: too few for any direction.
    assert all(c["verdict"] == "no difference" and c["n"] == 3 for c in found)
    assert "| a | the others (it left out) |" in (out / "results.md").read_text()
    assert (d / "reports" / "figures" / "ensemble.png").stat().st_size > 5_000


def test_one_editor_is_not_an_ensemble(raw, tmp_path):
    prepare.prepare(raw, tmp_path / "prepared", size=32)
    with pytest.raises(ValueError, match="ensemble.editors: give at least two"):
        ensemble.measure(tmp_path / "prepared", "a:blur-fill", budget=Budget(expand_kernel=3))
