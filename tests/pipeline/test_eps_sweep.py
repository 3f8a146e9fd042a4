"""Stage ``eps_sweep`` (runtime_backdoor.pipeline.eps_sweep)."""

import pandas as pd

from runtime_backdoor.budget import Budget
from runtime_backdoor.editors.simple import BlurFillEditor, GlobalMixEditor
from runtime_backdoor.pipeline import eps_sweep, prepare


def test_pick_names_takes_the_first_of_each_content_type():
    manifest = pd.DataFrame({"name": list("abcd"), "content": ["face", "face", "logo", "logo"]})
    assert eps_sweep.pick_names(manifest, 1) == ["a", "c"]
    assert eps_sweep.pick_names(manifest, 0) == list("abcd")


def test_sweep_rows_per_budget_and_image_with_the_budget_respected(raw, tmp_path):
    prepare.prepare(raw, tmp_path / "prepared", size=32)
    budgets = [2 / 255, 32 / 255]
    sweep = eps_sweep.sweep_editor(
        BlurFillEditor(), tmp_path / "prepared", budgets, budget=Budget(steps=2, expand_kernel=3),
        progress=False,
    )  # fmt: skip
    assert len(sweep) == 2 * 3
    assert sweep.groupby("eps")["name"].count().tolist() == [3, 3]
    # PSNR of an L∞ change of at most ε·255 levels is at least 20·log10(255/(ε·255)).
    for eps, g in sweep.groupby("eps"):
        assert (g["protection_psnr"] >= 20 * __import__("math").log10(1 / eps) - 1e-6).all()
    # blur-fill is insensitive: no hit at any budget here.
    assert not sweep["hit"].any()


def test_the_sensitive_control_gets_closer_to_the_target_with_more_budget(raw, tmp_path):
    prepare.prepare(raw, tmp_path / "prepared", size=32)
    sweep = eps_sweep.sweep_editor(
        GlobalMixEditor(gain=800, reach=3), tmp_path / "prepared", [1 / 255, 32 / 255],
        budget=Budget(expand_kernel=3), progress=False,
    )  # fmt: skip
    mse = sweep.groupby("eps")["target_mse"].mean()
    assert mse.iloc[1] < mse.iloc[0]
