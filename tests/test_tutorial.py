"""notebooks/tutorial.ipynb under papermill on a tiny setting, and its helpers (tutorial.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from runtime_backdoor import tutorial
from runtime_backdoor.editors.specs import build_from_spec

ROOT = Path(__file__).resolve().parents[1]
CONTROL = "control:global-mix(gain:800,reach:8)"  # params.yaml's sensitive control
# At 64 px this image is hit by the control from every δ₀ seed tried (0-3): the test does not
# hang on one lucky start of a chaotic optimisation.
IMAGE, SIZE = "watermark_02", 64


def trained_miniature(dest: Path) -> Path | None:
    """The pipeline's trained miniature, copied from the DVC store committed with the repo."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"]["editor"]["outs"]}
    digest = outs.get("models/editor", {}).get("md5", "")
    store = ROOT / "dvc-store" / "files" / "md5"
    listing = store / digest[:2] / digest[2:]
    if not digest.endswith(".dir") or not listing.is_file():
        return None
    dest.mkdir(parents=True, exist_ok=True)
    for entry in json.loads(listing.read_text()):
        if entry["relpath"].startswith("mini-lama."):
            shutil.copyfile(store / entry["md5"][:2] / entry["md5"][2:], dest / entry["relpath"])
    weights = dest / "mini-lama.safetensors"
    return weights if weights.is_file() else None


@pytest.mark.slow
def test_tutorial_notebook_shows_the_control_fire_and_the_miniature_not(tmp_path, run_notebook):
    miniature = trained_miniature(tmp_path / "models" / "editor")
    run_notebook(
        "tutorial", tmp_path, image=IMAGE, size=SIZE, frames=[1, 2, 5, 20], control=CONTROL,
        miniature=str(miniature or tmp_path / "absent.safetensors"), out_dir="out", device="cpu",
    )  # fmt: skip
    results = json.loads((tmp_path / "out" / "tutorial.json").read_text())
    assert results["miniature"] == ("trained" if miniature else "random")
    assert results["big_lama"] is False  # no weights in the test's folder: the section is skipped
    # the control: 20 steps take the fill from unrelated to the target colour
    assert results["control_error_start"] > 0.2
    assert results["control_error_final"] < 0.05
    # the miniature: the fill hardly moves (0.47 -> 0.45 with the trained one)
    assert results["miniature_error_final"] > 0.3
    assert results["miniature_error_final"] > 0.8 * results["miniature_error_start"]
    # and the gain says why: the control's is above what reaching φ needs, the miniature's far below
    gain, needed = results["gain"], results["needed"]
    assert gain["control"] > needed["control"] > 5
    assert gain["miniature LaMa"] < needed["miniature LaMa"] / 5
    assert results["linf_8bit_max"] <= 6.375 + 1e-4  # ε = 6.4/255 on the 8-bit grid
    names = {Path(p).name for p in results["figures"]}
    assert names == {
        "regions.png", "terms_clean.png", "control_steps.png", "control_losses.png",
        "control_terms.png", "miniature_steps.png", "gain.png",
    }  # fmt: skip
    for name in names:
        assert (tmp_path / "out" / name).stat().st_size > 5_000


def test_implant_frames_are_the_states_of_one_run(tmp_path):
    x, m = tutorial.sample_image(IMAGE, SIZE, tmp_path)
    control = build_from_spec(CONTROL)
    frames, result = tutorial.implant_frames(control, x, m, [5, 1, 2, 5], expand_kernel=3)
    assert [f.step for f in frames] == [1, 2, 5]
    assert torch.equal(frames[-1].protected, result.protected)
    assert result.losses["total"].shape == (5, 1)
    for f in frames:
        assert (f.protected - x).abs().max() <= 6.375 / 255 + 1e-6
        assert f.error.shape == (1,) and 0 <= float(f.error[0]) <= 1


def test_hole_error_is_zero_on_target_and_counts_only_the_hole():
    target = torch.zeros(1, 3, 8, 8)
    target[:, 2] = 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:4, 2:4] = 1
    fill = target.clone()
    fill[..., 6:, 6:] = 0.5  # outside the hole: ignored
    assert float(tutorial.hole_error(fill, target, mask)[0]) == 0
    fill[..., 2:4, 2:4] = 1 - target[..., 2:4, 2:4]  # every channel off by 1 in the hole
    assert float(tutorial.hole_error(fill, target, mask)[0]) == pytest.approx(1.0)


def test_sample_image_names_what_it_accepts(tmp_path):
    x, m = tutorial.sample_image("logo_00", 64, tmp_path)
    assert x.shape == (1, 3, 64, 64) and m.shape == (1, 1, 64, 64)
    assert 0 < float(m.mean()) < 1 and set(m.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="CONTENT_NN"):
        tutorial.sample_image("logo", 64, tmp_path)
    with pytest.raises(ValueError, match="not in the embedded sample"):
        tutorial.sample_image("tree_00", 64, tmp_path)
