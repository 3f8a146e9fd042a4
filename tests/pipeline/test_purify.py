"""Stage ``purify`` (runtime_backdoor.pipeline.purify) on a tiny setting: the table, the worst
case, the unavailable diffusion purifiers, the adaptive defence, the outputs; and its notebook.

The fixture builds the folders the stage reads with the earlier stages' functions; the editor
stage's record is blur-fill (cheap), protected for 2 steps. No weights are present (the models
folder is an empty temporary one), so the diffusion purifiers must be reported unavailable.
"""

import json
import re

import pandas as pd
import pytest

from runtime_backdoor import weights
from runtime_backdoor.budget import Budget
from runtime_backdoor.data import write_json
from runtime_backdoor.editors import editor_record, load_recorded_editor
from runtime_backdoor.pipeline import implant, prepare, purify

EDITORS = "pipeline control:global-mix(gain:800,reach:3)"
CLASSICAL = "jpeg:75 noise:12.75 crop:10% adverse-cleaner"
DIFFUSION = "diffpure:0.1 noisy-upscale:20"

BUDGET = Budget(steps=2, expand_kernel=5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("purify")
    prepare.prepare(raw, d / "prepared", size=48)
    write_json(d / "editor" / "editor.json", editor_record("blur-fill"))
    editor = load_recorded_editor(d / "editor" / "editor.json")
    implant.implant_folder(editor, d / "prepared", d / "protected", budget=BUDGET, progress=False)
    (d / "models").mkdir()
    return d


@pytest.fixture(scope="module")
def stage(folders):
    d = folders
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(weights.MODELS_ENV, str(d / "models"))  # no weights here, whatever the machine
        return purify.run(
            d / "reports", prepared_dir=d / "prepared", protected_dir=d / "protected",
            editor_record=d / "editor" / "editor.json", editors=EDITORS, purifiers=CLASSICAL,
            diffusion=DIFFUSION, adaptive="control", seeds=2, budget=BUDGET, batch_size=2,
            device="cpu", progress=False,
        )  # fmt: skip


def test_one_row_per_editor_method_image_purifier_and_scenario(stage):
    per_edit = stage["per_edit"]
    methods = set(zip(per_edit["editor"], per_edit["method"], strict=True))
    assert methods == {
        ("blur-fill", "backdoor"), ("blur-fill", "random"), ("control", "backdoor"),
        ("control", "backdoor_adaptive"), ("control", "random"),
    }  # fmt: skip
    # two δ₀ seeds for every protection made here; the pipeline editor's (blur-fill here) images
    # come from the implant stage, one seed
    assert set(per_edit.loc[per_edit["editor"] == "control", "seed"]) == {0, 1}
    assert set(per_edit.loc[per_edit["editor"] == "blur-fill", "seed"]) == {0}
    purifiers = ["none", *CLASSICAL.split()]
    assert list(dict.fromkeys(per_edit["purifier"])) == purifiers
    # (method, seed) runs x images x purifiers x scenarios: blur-fill 2 x 1, control 3 x 2
    assert len(per_edit) == (2 + 3 * 2) * 3 * len(purifiers) * 2
    # the random baseline stays within the budget, one run per editor and seed
    rnd = stage["protection"][stage["protection"]["method"] == "random"]
    assert (rnd["linf_8bit"] <= 0.025 * 255 + 0.51).all() and len(rnd) == 1 + 2
    assert set(per_edit["scenario"]) == {"mask", "ring"}
    assert set(per_edit["family"]) == {"reference", "classical"}
    none = per_edit[per_edit["purifier"] == "none"]
    assert (none["purified_psnr"] == purify.PSNR_CAP).all()  # the 8-bit image is itself
    assert per_edit[["hit_fraction_protected", "ssim_vs_clean_edit"]].notna().all().all()
    # the protection made here stays within the budget
    assert (stage["protection"]["linf_8bit"] <= 0.025 * 255 + 0.51).all()


def test_worst_case_is_the_attackers_best_option_per_image(stage):
    per_edit = stage["per_edit"]
    worst = purify.worst_case(per_edit)
    assert set(worst["purifier"]) == {"worst:classical"}  # no diffusion purifier ran
    # BlurGuard's rule: no purification is one of the attacker's options.
    classical = per_edit[(per_edit["family"] == "classical") | (per_edit["purifier"] == "none")]
    keys = [k for k in ("editor", "method", "seed", "name", "scenario") if k in per_edit]
    best = classical.groupby(keys).agg(
        hit=("hit_fraction_protected", "min"), psnr=("psnr_vs_clean_edit", "max"),
        mse=("target_mse_protected", "max"),
    )  # fmt: skip
    w = worst.set_index(keys).loc[best.index]
    assert (w["hit_fraction_protected"] == best["hit"]).all()
    assert (w["psnr_vs_clean_edit"] == best["psnr"]).all()
    assert (w["target_mse_protected"] == best["mse"]).all()
    # the worst case never hits more often than any single purifier
    hits = classical.groupby(keys)["hit_protected"].min()
    assert (w["hit_protected"] == hits.loc[best.index]).all()


def test_unavailable_diffusion_purifiers_are_reported_with_the_fetch_command(stage):
    status = stage["status"].set_index("purifier")["status"]
    assert status["diffpure:0.1"] == "unavailable: weights (runtime-backdoor weights fetch sd15)"
    assert status["noisy-upscale:20"] == (
        "unavailable: weights (runtime-backdoor weights fetch sd-x4-upscaler)"
    )
    table = stage["table"]
    rows = table[table["purifier"] == "diffpure:0.1"]
    assert len(rows) == 5 * 2 and set(rows["status"]) == {status["diffpure:0.1"]}
    assert "unavailable: weights (runtime-backdoor weights fetch sd15)" in stage["markdown"]
    assert stage["metrics"]["diffpure0.1_available"] is False


def test_table_has_intervals_and_the_worst_case_rows(stage):
    t = stage["table"]
    ok = t[t["status"] == "ok"]
    assert set(ok["purifier"]) == {"none", *CLASSICAL.split(), "worst:classical"}
    assert (ok["n_images"] == 3).all()
    for col in ("hit_protected", "psnr_vs_clean_edit"):
        assert (ok[f"{col}_low"] <= ok[col] + 1e-9).all() and (
            ok[col] <= ok[f"{col}_high"] + 1e-9
        ).all()


def test_outputs_are_written_flat_and_complete(stage, folders):
    out = folders / "reports" / "purification"
    for name in ("per_edit.csv", "table.csv", "conclusions.json", "results.md", "metrics.json"):
        assert (out / name).is_file(), name
    assert (folders / "reports" / "figures" / "purification.png").stat().st_size > 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+", k) for k in metrics)
    assert all(v is None or isinstance(v, bool | int | float) for v in metrics.values())
    assert "control_backdoor_adaptive_worstclassical_mask_hit_rate" in metrics
    assert "blur_fill_jpeg75_mask_hit_rate_low" in metrics
    found = json.loads((out / "conclusions.json").read_text())
    ids = {c["id"] for c in found}
    assert {"control/backdoor/fires", "control/backdoor/jpeg:75/vs_none",
            "control/backdoor/worst:classical/fires", "control/adaptive/worst:classical"} <= ids  # fmt: skip
    # 3 images: fewer than stats.MIN_N, so no comparison may state a direction
    assert {c["verdict"] for c in found} == {"no difference"}
    assert pd.read_csv(out / "table.csv")["status"].str.startswith("unavailable").any()


def test_conclusions_state_a_direction_only_where_the_interval_excludes_zero():
    names = [f"i{k}" for k in range(12)]
    rows = []
    for n in names:
        for purifier, hit in (("none", 1.0), ("jpeg:75", 0.0), ("noise:12.75", 1.0)):
            family = "reference" if purifier == "none" else "classical"
            rows.append({"editor": "e", "method": "backdoor", "name": n, "scenario": "mask",
                         "purifier": purifier, "family": family, "hit_protected": hit,
                         "hit_clean": 0.0, "hit_purified_clean": 0.0,
                         "target_mse_protected": 0.1 + 0.2 * (1 - hit)})  # fmt: skip
    found = {c["id"]: c for c in purify.conclusions(pd.DataFrame(rows))}
    assert found["e/backdoor/fires"]["verdict"] == "higher"
    assert found["e/backdoor/jpeg:75/vs_none"]["verdict"] == "lower"
    assert "jpeg:75 before editing" in found["e/backdoor/jpeg:75/vs_none"]["sentence"]
    assert found["e/backdoor/noise:12.75/vs_none"]["verdict"] == "no difference"
    assert found["e/backdoor/noise:12.75/fires"]["verdict"] == "higher"
    assert not any(k.endswith("target_mse") for k in found)  # distances: the table only


def test_bad_settings_are_refused(folders):
    d = folders
    common = dict(prepared_dir=d / "prepared", protected_dir=d / "protected",
                  editor_record=d / "editor" / "editor.json", budget=BUDGET, device="cpu",
                  progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="classical"):
        purify.run(d / "r", purifiers="diffpure:0.1", diffusion="", **common)
    with pytest.raises(ValueError, match="diffusion"):
        purify.run(d / "r", purifiers="jpeg:75", diffusion="jpeg:50", **common)
    with pytest.raises(ValueError, match="adaptive"):
        purify.run(d / "r", editors="pipeline", purifiers="jpeg:75", diffusion="",
                   adaptive="nonesuch", **common)  # fmt: skip


@pytest.mark.slow
def test_purify_notebook_on_a_tiny_setting(folders, run_notebook, monkeypatch):
    d = folders
    monkeypatch.setenv(weights.MODELS_ENV, str(d / "models"))
    run_notebook(
        "09_purify", d, prepared_dir="prepared", protected_dir="protected",
        editor_record="editor/editor.json", reports_dir="nb-reports", editors=EDITORS,
        purifiers="jpeg:75 crop:10%", diffusion="diffpure:0.1", adaptive="", steps=2,
        batch_size=3, device="cpu",
    )  # fmt: skip
    assert (d / "nb-reports" / "purification" / "results.md").is_file()
    assert (d / "nb-reports" / "figures" / "purification.png").is_file()


def test_worst_case_over_draws_is_the_attackers_best_over_every_draw():
    """A hand-made table: per image, no purification, JPEG, and 3 draws of DiffPure; the
    worst case over all of them, computed by hand."""
    cols = ("hit_fraction_protected", "target_mse_protected", "psnr_vs_clean_edit",
            "ssim_vs_clean_edit", "psnr_vs_purified_clean_edit")  # fmt: skip
    table = {
        "a": {("none", None): (0.9, 0.01, 20, 0.5, 21), ("jpeg:75", None): (0.7, 0.03, 24, 0.6, 22),
              ("diffpure:0.1", 0): (0.8, 0.02, 26, 0.55, 25),
              ("diffpure:0.1", 1): (0.3, 0.05, 22, 0.7, 23),
              ("diffpure:0.1", 2): (0.6, 0.04, 25, 0.65, 30)},
        "b": {("none", None): (0.95, 0.01, 19, 0.4, 20), ("jpeg:75", None): (0.9, 0.02, 21, 0.45, 21),
              ("diffpure:0.1", 0): (0.85, 0.015, 23, 0.5, 22),
              ("diffpure:0.1", 1): (0.9, 0.012, 22, 0.48, 24),
              ("diffpure:0.1", 2): (0.92, 0.011, 20, 0.52, 23)},
    }  # fmt: skip
    family = {"none": "reference", "jpeg:75": "classical", "diffpure:0.1": "diffusion"}
    rows = pd.DataFrame(
        [{"editor": "e", "method": "backdoor", "seed": 0, "name": n, "scenario": "mask",
          "purifier": p, "family": family[p], "draw": d, **dict(zip(cols, v, strict=True)),
          "hit_protected": v[0] >= 0.5, "hit_clean": False, "hit_fraction_clean": 0.1}
         for n, by in table.items() for (p, d), v in by.items()]
    )  # fmt: skip
    w = purify.worst_case_over_draws(rows).set_index(["purifier", "name"])
    by_hand = {
        ("worst:classical", "a"): (0.7, 0.03, 24, 0.6, 22, True),
        ("worst:all", "a"): (0.3, 0.05, 26, 0.7, 30, False),  # draw 1 defeats the protection
        ("worst:classical", "b"): (0.9, 0.02, 21, 0.45, 21, True),
        ("worst:all", "b"): (0.85, 0.02, 23, 0.52, 24, True),
    }
    assert set(w.index) == set(by_hand) and (w["draws"] == 3).all()
    for key, values in by_hand.items():
        assert tuple(w.loc[key, [*cols, "hit_protected"]]) == values, key
        assert not w.loc[key, "hit_clean"] and w.loc[key, "hit_fraction_clean"] == 0.1
    # one draw only (the first) misses the attacker's best on image a
    first = purify.worst_case_over_draws(rows[rows["draw"].isna() | (rows["draw"] == 0)])
    first = first.set_index(["purifier", "name"])
    assert first.loc[("worst:all", "a"), "hit_fraction_protected"] == 0.7
    assert (first["draws"] == 1).all()
    # without a draw column it is worst_case itself, one draw
    plain = rows[rows["draw"].isna() | (rows["draw"] == 0)].drop(columns="draw")
    pd.testing.assert_frame_equal(
        purify.worst_case_over_draws(plain).drop(columns="draws"), purify.worst_case(plain)
    )
    with pytest.raises(ValueError, match="draws must be 0"):
        purify.worst_case_over_draws(rows.drop(index=rows.index[-1]))  # b lacks draw 2
    with pytest.raises(ValueError, match="more than one row"):
        purify.worst_case_over_draws(pd.concat([rows, rows[rows["purifier"] == "jpeg:75"]]))
