"""Stage ``beyond`` (runtime_backdoor.pipeline.beyond) on a tiny setting: its functions, and its
notebook under papermill.

The fixture builds the folders the stage reads (prepared, editor record, protected) with the
earlier stages' functions; the editor stage's record is a random-weight miniature LaMa.
"""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from runtime_backdoor import reporting
from runtime_backdoor.budget import Budget
from runtime_backdoor.data import write_json
from runtime_backdoor.editors import editor_record, load_recorded_editor
from runtime_backdoor.editors.specs import parse_editor_spec
from runtime_backdoor.pipeline import beyond, implant, prepare
from runtime_backdoor.robustness import FAIR_SCENARIOS
from runtime_backdoor.samples import make_sample

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = "pipeline control:global-mix(gain:800,reach:3)"
TRANSFER = "lama-s1:lama(preset:mini,seed:1)"
TRANSFORMS = "none jpeg:75 crop:3px"
ROBUST = "mask ring fair_box benign_medium"

BUDGET = Budget(steps=2, expand_kernel=5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("beyond")
    make_sample(d / "raw", n_per_type=1, size=64, seed=0)
    prepare.prepare(d / "raw", d / "prepared", size=48)
    write_json(d / "editor" / "editor.json", editor_record("lama", None, preset="mini", seed=0))
    editor = load_recorded_editor(d / "editor" / "editor.json")
    implant.implant_folder(editor, d / "prepared", d / "protected", budget=BUDGET, progress=False)
    return d


def test_subset_is_round_robin_over_content():
    manifest = pd.DataFrame(
        {"name": list("abcdef"), "content": ["face"] * 3 + ["logo"] * 2 + ["watermark"]}
    )
    assert beyond.subset_names(manifest, 4) == ["a", "d", "f", "b"]
    assert beyond.subset_names(manifest, 0) == list("abcdef")


def test_stage_function_covers_every_part(folders):
    d = folders
    per_edit, protection = beyond.measure(
        d / "prepared", d / "protected", d / "editor" / "editor.json",
        editors=SOURCES, transfer_editors=TRANSFER, subset=2, transforms=TRANSFORMS,
        robust_scenarios=ROBUST, budget=BUDGET,
        seeds=2, progress=False,
    )  # fmt: skip
    n_scen, n_robust, n_methods = 6 + len(FAIR_SCENARIOS), 4, 5  # encoder is n/a here
    # δ₀ seeds: two for the control source, the implant stage's one for the pipeline editor.
    assert set(per_edit.loc[per_edit["source"] == "control", "seed"]) == {0, 1}
    assert set(per_edit.loc[per_edit["source"] == "pipeline", "seed"]) == {0}
    own = per_edit[per_edit["source"] == per_edit["editor"]]
    # Part 1: the pipeline's protected images, all 3, every scenario + robust ones transformed.
    pipe = own[(own["source"] == "pipeline") & (own["method"] == "backdoor")]
    assert pipe["name"].nunique() == 3
    assert len(pipe) == 3 * (n_scen + 2 * n_robust)
    # Part 2: every applicable method on the 2-image subset, for both sources.
    for source, n_seeds in (("pipeline", 1), ("control", 2)):
        d2 = own[(own["source"] == source) & (own["method"] != "backdoor")]
        assert set(d2["method"]) == {"backdoor_eot", "untargeted", "markpainting", "random"}
        # EOT under every transformation; the baselines untransformed (their table's rows).
        assert len(d2) == n_seeds * 2 * ((n_scen + 2 * n_robust) + 3 * n_scen)
        assert set(d2.loc[d2["method"] != "backdoor_eot", "transform"]) == {"none"}
    na = protection[protection["status"].str.startswith("n/a")]
    assert set(na["method"]) == {"encoder"} and set(na["source"]) == {"pipeline", "control"}
    # Part 3: transfer to every other editor, untransformed.
    cross = per_edit[per_edit["source"] != per_edit["editor"]]
    assert set(zip(cross["source"], cross["editor"], strict=True)) == {
        ("pipeline", "control"), ("pipeline", "lama-s1"),
        ("control", "pipeline"), ("control", "lama-s1"),
    }  # fmt: skip
    assert set(cross["transform"]) == {"none"} and set(cross["family"]) == {"official"}
    assert cross.groupby(["source", "editor"])["method"].nunique().eq(n_methods).all()
    # Values in range; every method within ε.
    for col in ("hit_fraction_clean", "hit_fraction_protected"):
        assert per_edit[col].between(0, 1).all()
    assert per_edit["ssim_region_vs_clean_edit"].between(-1, 1 + 1e-9).all()
    ok = protection[protection["status"] == "ok"]
    assert ok["linf_8bit"].max() <= 6.375 + 1e-4
    # The crop shrinks the scenario masks with the image.
    crop = pipe[pipe["transform"] == "crop:3px"].set_index(["name", "scenario"])["edited_fraction"]
    assert crop.notna().all()

    tables = {
        "fair": reporting.fair_mask_table(per_edit),
        "robust": reporting.robustness_table(per_edit),
        "eot": reporting.eot_table(per_edit, protection),
        "base": reporting.baseline_table(per_edit, protection),
        "transfer": reporting.transfer_table(per_edit),
    }
    assert set(tables["fair"]["scenario"]) == set(beyond.ALL_SCENARIOS)
    assert set(tables["robust"]["transform"]) == {"none", "jpeg:75", "crop:3px"}
    assert set(tables["eot"]["method"]) == {"backdoor", "backdoor_eot"}
    assert (tables["eot"]["n_images"] == 2).all()  # the same images for both
    base = tables["base"]
    assert (base[base["method"] == "encoder"]["status"].str.startswith("n/a")).all()
    assert (base[base["status"] == "ok"]["n_images"] == 2).all()
    for t in tables.values():  # every mean lies inside its 95 % interval
        ok_rows = t[t.get("status", "ok") == "ok"] if "status" in t else t
        for col in ("hit_rate_protected", "ssim_region_vs_clean_edit"):
            assert (ok_rows[f"{col}_low"] <= ok_rows[col] + 1e-12).all()
            assert (ok_rows[col] <= ok_rows[f"{col}_high"] + 1e-12).all()
    # Seeds are averaged within an image: the control's tables still count 2 images.
    assert (base[(base["source"] == "control") & (base["status"] == "ok")]["n_images"] == 2).all()
    found = reporting.conclusions(per_edit)
    ids = [c["id"] for c in found]
    assert len(ids) == len(set(ids)) and "control/fires" in ids and "pipeline/robust/jpeg:75" in ids
    assert {c["verdict"] for c in found} <= {"higher", "lower", "no difference"}
    md = reporting.markdown(per_edit, protection)
    assert "not applicable" in md and "## Transfer" in md and "## EOT" in md
    assert "## What the numbers support" in md and "[" in md
    summary = reporting.summarize(per_edit, protection)
    assert summary["n_edits"] == len(per_edit)
    assert 0 <= summary["pipeline_backdoor_mask_hit_rate"] <= 1
    assert (
        summary["pipeline_backdoor_mask_hit_rate_low"] <= summary["pipeline_backdoor_mask_hit_rate"]
    )
    assert "control_markpainting_seconds_per_image" in summary


@pytest.mark.slow
def test_beyond_notebook_on_a_tiny_setting(folders, run_notebook):
    d = folders
    run_notebook(
        "07_beyond",
        d,
        prepared_dir="prepared",
        protected_dir="protected",
        editor_record="editor/editor.json",
        reports_dir="reports",
        editors=SOURCES,
        transfer_editors=TRANSFER,
        subset=2,
        transforms=TRANSFORMS,
        robust_scenarios=ROBUST,
        **dataclasses.asdict(BUDGET),  # the notebook's literal parameters build the budget
        device="cpu",
    )
    out = d / "reports" / "beyond"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_edits"] > 300 and metrics["stage_seconds"] > 0
    assert 0 <= metrics["control_backdoor_mask_hit_rate"] <= 1
    assert metrics["pipeline_backdoor_linf_8bit_max"] <= 6.375 + 1e-4
    for name in (
        "per_edit",
        "protection",
        "fair_masks",
        "robustness",
        "eot",
        "baselines",
        "transfer",
    ):
        assert len(pd.read_csv(out / f"{name}.csv")) > 0, name
    md = (out / "results.md").read_text()
    assert "| control | encoder | not applicable |" in md
    for fig in ("fair_masks", "robustness", "baselines", "transfer"):
        assert (d / "reports" / "figures" / "beyond" / f"{fig}.png").stat().st_size > 5_000, fig


def test_params_yaml_specs_parse():
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    specs = (params["beyond"]["editors"] + " " + params["beyond"]["transfer_editors"]).split()
    labels = [parse_editor_spec(spec).label for spec in specs]
    assert labels == ["pipeline", "control", "lama-s1", "control-s1"]


def test_lpips_is_zero_for_identical_edits_and_positive_otherwise(folders, random_alexnet):
    import torch

    from runtime_backdoor.data import load_prepared
    from runtime_backdoor.metrics import load_lpips

    _, x, m = load_prepared(folders / "prepared")
    editor = load_recorded_editor(folders / "editor" / "editor.json")
    noisy = (x + 0.2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    df = beyond.evaluate_grid(
        editor, x, m, {"same": x, "noisy": noisy}, {"same": x, "noisy": x},
        names=[f"i{i}" for i in range(len(x))], kernel=5, scenarios=("mask", "ring"),
        lpips_model=load_lpips("alex", random_alexnet),
    )  # fmt: skip
    same, other = df[df["method"] == "same"], df[df["method"] == "noisy"]
    for col in ("lpips_vs_clean_edit", "lpips_region_vs_clean_edit"):
        assert same[col].abs().max() < 1e-6
        assert (other[col] > 1e-4).all()


def test_stage_reports_lpips_with_a_backbone_and_says_why_not_without(
    folders, random_alexnet, tmp_path
):
    d = folders
    common = dict(
        prepared_dir=d / "prepared", protected_dir=d / "protected",
        editor_record=d / "editor" / "editor.json", editors="pipeline", methods="backdoor",
        transforms="none jpeg:75", robust_scenarios="mask ring", budget=BUDGET, device="cpu",
    )  # fmt: skip
    without = beyond.run(tmp_path / "a", lpips_backbone=str(tmp_path / "none.pth"), **common)
    summary = json.loads((tmp_path / "a" / "beyond" / "metrics.json").read_text())
    assert summary["lpips_available"] is False
    assert summary["lpips_unavailable"] == "no backbone: runtime-backdoor weights fetch lpips-alex"
    assert (
        "LPIPS: not computed (no backbone: runtime-backdoor weights fetch lpips-alex)."
        in (without["markdown"])
    )
    assert "lpips_region_vs_clean_edit" not in without["tables"]["fair_masks"]
    got = beyond.run(tmp_path / "b", lpips_backbone=str(random_alexnet), **common)
    summary = json.loads((tmp_path / "b" / "beyond" / "metrics.json").read_text())
    assert summary["lpips_available"] is True and "lpips_unavailable" not in summary
    key = "pipeline_backdoor_mask_lpips_region"
    assert summary[f"{key}_low"] <= summary[key] <= summary[f"{key}_high"] and summary[key] > 0
    md = got["markdown"]
    assert "| LPIPS region |" in md and "benign LPIPS region |" in md
    for name in ("fair_masks", "robustness"):
        t = got["tables"][name]
        col = "lpips_region_vs_clean_edit"
        assert (t[f"{col}_low"] <= t[col] + 1e-12).all() and (
            t[col] <= t[f"{col}_high"] + 1e-12
        ).all()
    per_edit = pd.read_csv(tmp_path / "b" / "beyond" / "per_edit.csv")
    assert per_edit["lpips_vs_clean_edit"].ge(0).all()
