"""notebooks/tutorial.ipynb under papermill on a tiny setting, and its helpers (tutorial.py)."""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from runtime_backdoor import tutorial
from runtime_backdoor.editors.specs import build_from_spec
from runtime_backdoor.masks import scaled_kernel

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "tutorial.ipynb"
MINIATURE = ROOT / "models" / "editor" / "mini-lama.safetensors"
CONTROL = "control:global-mix(gain:800,reach:8)"  # params.yaml's sensitive control
# At 64 px this image is hit by the control from every δ₀ seed tried (0-3): the test does not
# hang on one lucky start of a chaotic optimisation.
IMAGE, SIZE = "watermark_02", 64
FIGURES = {
    "regions.png", "terms_clean.png", "control_steps.png", "control_losses.png",
    "control_protected.png", "control_terms.png", "miniature_steps.png",
    "miniature_protected.png", "miniature_terms.png", "gain.png",
}  # fmt: skip


def _dvc() -> str:
    """The dvc of this interpreter's environment (the project's .venv), else the one on PATH."""
    local = Path(sys.executable).parent / "dvc"
    found = str(local) if local.is_file() else shutil.which("dvc")
    if found is None:
        pytest.fail("dvc is not installed: `make install` installs it into .venv")
    return found


@pytest.fixture(scope="module")
def trained_miniature() -> Path:
    """The pipeline's trained miniature in models/editor/, pulled from the DVC store committed
    with the repository (dvc-store/, offline) when a fresh clone does not have it yet."""
    if not MINIATURE.is_file():
        done = subprocess.run(
            [_dvc(), "pull", "editor"], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert MINIATURE.is_file(), f"`dvc pull editor` did not restore {MINIATURE}:\n{done.stderr}"
    return MINIATURE


def _files(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def _run(cwd: Path, out: Path, executed: Path) -> dict:
    import papermill as pm

    pm.execute_notebook(
        str(NOTEBOOK), str(executed), kernel_name="python3", cwd=str(cwd), progress_bar=False,
        parameters=dict(
            image=IMAGE, size=SIZE, expand_kernel=scaled_kernel(SIZE), frames=[1, 2, 5, 20],
            out_dir=str(out), device="cpu",
        ),
    )  # fmt: skip
    return json.loads((out / "tutorial.json").read_text())


@pytest.mark.slow
def test_tutorial_runs_the_same_from_the_project_folder_and_from_notebooks(
    tmp_path, trained_miniature
):
    """JupyterLab starts the kernel in notebooks/, papermill and DVC in the project folder: both
    find the trained miniature, write only to out_dir and record the same numbers."""
    watched = [ROOT / "notebooks" / "reports", ROOT / "reports" / "tutorial"]
    before = {str(f): _files(f) for f in watched}
    runs = {}
    for label, cwd in (("root", ROOT), ("notebooks", ROOT / "notebooks")):
        out = tmp_path / label
        runs[label] = _run(cwd, out, tmp_path / f"{label}.ipynb")
        assert {Path(p).name for p in runs[label]["figures"]} == FIGURES
        for name in FIGURES:
            assert (out / name).stat().st_size > 5_000
    # nothing written into the tree: no notebooks/reports/, reports/tutorial/ as it was
    assert {str(f): _files(f) for f in watched} == before
    assert before[str(watched[0])] or not watched[0].exists()

    a, b = runs["root"], runs["notebooks"]
    assert a["miniature"] == b["miniature"] == "trained"
    assert a["miniature_weights"] == "models/editor/mini-lama.safetensors"  # the default
    assert a["gain"]["miniature LaMa"] == pytest.approx(b["gain"]["miniature LaMa"], rel=1e-5)
    assert a["gain"]["miniature LaMa"] > 0.1  # trained weights: random ones gave about 0.0004
    assert a["hit"] == b["hit"] and a["control_hit_rates"] == b["control_hit_rates"]

    results = a
    assert results["big_lama"] is False or (ROOT / "models" / "big-lama.pt").exists()
    # the control: 20 steps take the fill from unrelated to the target colour: a hit
    assert results["control_error_start"] > 0.2
    assert results["control_error_final"] < 0.05
    assert results["hit"] == {"control": True, "miniature LaMa": False}
    # the miniature: the fill hardly moves
    assert results["miniature_error_final"] > 0.3
    assert results["miniature_error_final"] > 0.8 * results["miniature_error_start"]
    # and the gain says why: the control's is above what reaching φ needs, the miniature's far below
    gain, needed = results["gain"], results["needed"]
    assert gain["control"] > needed["control"] > 5
    assert gain["miniature LaMa"] < needed["miniature LaMa"] / 5
    assert results["linf_8bit_max"] <= 6.375 + 1e-4  # ε = 6.4/255 on the 8-bit grid
    for quality in results["protection"].values():
        assert 25 < quality["psnr"] < 60 and 0.5 < quality["ssim"] < 1
    assert all(25 < v < 80 for v in results["ring_psnr"].values())
    # the control's hit rates are read from the committed files, one name per definition
    sweep = json.loads((ROOT / "reports" / "eps_sweep.json").read_text())
    rates = results["control_hit_rates"]
    assert rates[tutorial.RATE_NAMES["sweep"]] == sweep["control_hit_rate_at_paper_eps"]
    assert rates[tutorial.RATE_NAMES["notebook"]] == 1.0
    # it closes on its summary, made from these results, not on the raw dict
    executed = json.loads((tmp_path / "root.ipynb").read_text(encoding="utf-8"))
    last = [c for c in executed["cells"] if c["cell_type"] == "code"][-1]
    printed = "".join("".join(o.get("text", "")) for o in last["outputs"])
    assert [o["output_type"] for o in last["outputs"]] == ["stream"]
    assert printed.strip() == tutorial.summary(results, saved=f"{tmp_path / 'root'}/tutorial.json")


#: what the tutorial's results dict holds, with made-up values (the keys its last cell writes)
RESULTS = {
    "image": "logo_01", "size": 128, "miniature": "trained", "big_lama": False,
    "control_error_start": 0.404, "control_error_final": 0.012,
    "miniature_error_start": 0.47, "miniature_error_final": 0.44,
    "protection": {"control": {"psnr": 39.21, "ssim": 0.99, "linf_8bit": 6.0},
                   "miniature LaMa": {"psnr": 32.7, "ssim": 0.97, "linf_8bit": 6.0}},
    "hit": {"control": True, "miniature LaMa": False},
    "hit_clean": {"control": False, "miniature LaMa": False},
    "ring_psnr": {"control": 38.2, "miniature LaMa": 32.8},
    "gain": {"control": 42.4, "miniature LaMa": 1.06},
    "needed": {"control": 15.9, "miniature LaMa": 18.7},
    "control_hit_rates": {tutorial.RATE_NAMES["sweep"]: 0.37, tutorial.RATE_NAMES["notebook"]: 1.0},
}  # fmt: skip


def test_the_summary_is_made_from_the_results():
    text = tutorial.summary(RESULTS, saved="reports/tutorial/tutorial.json")
    assert max(len(line) for line in text.splitlines()) <= 88  # printed: fits the column
    first, *items = [" ".join(item.split()) for item in text.split("\n- ")]
    assert first == "What this run showed on logo_01 (128 px):"
    control, mini, why, big, rate = items
    assert "from 0.40 to 0.01" in control and "not on the clean one: protected" in control
    assert "39.2 dB from the original" in control and "ring edit 38.2 dB" in control
    assert mini.startswith("The trained miniature LaMa:") and "not a hit: not protected" in mini
    assert "control 42.4 against 15.9 needed (enough to reach φ)" in why
    assert "miniature LaMa 1.06 against 18.7 needed (too little to reach φ)" in why
    assert big.startswith("Big-LaMa: skipped") and "ε-sweep hit rate is 37%" in rate
    assert rate.endswith("Every number above, and more: reports/tutorial/tutorial.json")
    # the numbers come from the dict: other results, other text
    other = RESULTS | {"hit_clean": {"control": True, "miniature LaMa": False}, "big_lama": True}
    text = " ".join(tutorial.summary(other | {"control_hit_rates": {}}).split())
    assert "on the clean image too" in text and "Big-LaMa" not in text and "37%" not in text
    assert tutorial.summary({}).startswith("What this run showed on ? (? px):")  # never raises


def test_the_tutorial_closes_with_its_summary_and_where_to_go_next():
    """Its last code cell prints :func:`tutorial.summary` (the dict stays in `results` and
    tutorial.json); its last cell links the stage notebooks, the owner's commands and the
    real-model page, and every link resolves."""
    from runtime_backdoor.pipeline import STAGES

    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    last = "".join(code[-1]["source"]).splitlines()
    assert last[-1].startswith("print(tutorial.summary(results")
    assert any(line.startswith("saved = write_json(") for line in last)
    closing = nb["cells"][-1]
    assert closing["cell_type"] == "markdown"
    links = re.findall(r"\]\(([^)\s]+)\)", "".join(closing["source"]))
    targets = [link.partition("#")[0] for link in links]
    assert targets == [
        *(Path(n).name for n in STAGES.values()),
        "../README.md", "../docs/owners.md", "../docs/real-models.md",
    ]  # fmt: skip
    assert "../README.md#protect-an-image" in links
    assert "## Protect an image" in (ROOT / "README.md").read_text()
    for target in targets:
        assert (NOTEBOOK.parent / target).is_file(), target


def test_a_missing_miniature_is_an_error_that_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc pull editor") as raised:
        tutorial.load_miniature(tmp_path / "absent" / "mini-lama.safetensors")
    assert "dvc repro editor" in str(raised.value)


def test_absent_big_lama_weights_skip_with_a_line_that_says_how_to_get_them(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no models/big-lama/ here either
    assert tutorial.big_lama_weights("models/big-lama.pt") is None
    line = capsys.readouterr().out
    assert line.startswith("Skipped: no Big-LaMa weights at models/big-lama.pt")
    assert "`runtime-backdoor weights fetch big-lama`" in line


def _parameters_cell() -> tuple[dict, list[str]]:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged `parameters`"
    lines = [line for line in "".join(cells[0]["source"]).splitlines() if line.strip()]
    values = {}
    for line in lines:
        (assign,) = ast.parse(line).body
        assert isinstance(assign, ast.Assign), line
        values[assign.targets[0].id] = ast.literal_eval(assign.value)  # a plain literal
    return values, lines


def test_parameter_defaults_are_the_pipelines():
    values, lines = _parameters_cell()
    assert all("  # " in line for line in lines), "every parameter has a comment"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    same = {
        "size": params["prepare"]["size"],
        "eps": params["implant"]["eps"],
        "steps": params["implant"]["steps"],
        "expand_kernel": params["implant"]["expand_kernel"],
        "target": params["implant"]["target"],
        "seed": params["implant"]["seed"],
        "hit_tol": params["evaluate"]["hit_tol"],
        "hit_min_fraction": params["evaluate"]["hit_min_fraction"],
        "amplify": params["figures"]["amplify"],
        "device": params["device"],
    }
    assert {k: values[k] for k in same} == same
    assert values["control"] in params["beyond"]["editors"].split()
    assert values["out_dir"] == "reports/tutorial"
    assert values["expand_kernel"] == scaled_kernel(values["size"])


def test_notebook_is_clean_and_enters_the_project_folder_first():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    text = json.dumps(nb["metadata"])
    assert "/work" not in text and "/home" not in text and "papermill" not in text
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    first = [i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", [])][0]
    assert "".join(code[first + 1]["source"]).startswith(
        "from runtime_backdoor.project import enter_project_root\nroot = enter_project_root()"
    )
    sources = "".join("".join(c["source"]) for c in code)
    assert "runtime_backdoor.study" not in sources and "import study" not in sources


def test_control_hit_rates_are_read_from_the_files_one_row_per_definition(tmp_path):
    rates = tutorial.control_hit_rates("logo_01", True, False, 0.025, CONTROL)
    assert list(rates.index) == list(tutorial.RATE_NAMES.values())
    sweep = json.loads((ROOT / "reports" / "eps_sweep.json").read_text())
    assert rates.iloc[0]["protected"] == sweep["control_hit_rate_at_paper_eps"]
    assert rates.iloc[0]["low"] <= rates.iloc[0]["protected"] <= rates.iloc[0]["high"]
    for name in ("mask", "official", "fair"):
        row = rates.loc[tutorial.RATE_NAMES[name]]
        assert 0 <= row["low"] <= row["protected"] <= row["high"] <= 1
        assert row["images × δ₀"] == "18 × 3"
    assert rates.iloc[-1]["protected"] == 1.0 and rates.iloc[-1]["clean"] == 0.0
    # without the reports: rows that say so, not an exception
    empty = tutorial.control_hit_rates("logo_01", False, False, 0.025, CONTROL, reports=tmp_path)
    assert (empty["logo_01 in that run"].iloc[:-1] == "file not found").all()
    assert math.isnan(empty.iloc[0]["protected"])


def test_edit_checks_compare_the_same_edits_of_both_images(tmp_path):
    x, m = tutorial.sample_image(IMAGE, SIZE, tmp_path)
    control = build_from_spec(CONTROL)
    kernel = scaled_kernel(SIZE)
    result = tutorial.implant_frames(control, x, m, [20], expand_kernel=kernel)[1]
    checks = tutorial.edit_checks(control, x, result.protected, m, kernel, result.target)
    assert list(checks.index) == ["m", "E(m)", "ring E(m) − m"]
    assert list(checks["kind"]) == ["malicious", "malicious", "benign"]
    assert bool(checks.loc["m", "hit, protected"]) and not checks.loc["m", "hit, clean"]
    same = tutorial.edit_checks(control, x, x, m, kernel, result.target)
    assert (same["hit, clean"] == same["hit, protected"]).all()
    assert (same["PSNR vs clean edit (image)"] == float("inf")).all()
    quality = tutorial.imperceptibility(x, result.protected)
    assert quality["linf_8bit"] <= 6.375 + 1e-4 and 25 < quality["psnr"] and quality["ssim"] < 1


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
        assert f.on_target.shape == (1,) and 0 <= float(f.on_target[0]) <= 1


def test_hole_error_and_on_target_count_only_the_hole():
    target = torch.zeros(1, 3, 8, 8)
    target[:, 2] = 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:4, 2:4] = 1
    fill = target.clone()
    fill[..., 6:, 6:] = 0.5  # outside the hole: ignored
    assert float(tutorial.hole_error(fill, target, mask)[0]) == 0
    assert float(tutorial.on_target(fill, target, mask)[0]) == 1
    fill[:, 0, 2, 2:4] = 0.15  # two of the four hole pixels off by 0.15 in one channel
    assert float(tutorial.on_target(fill, target, mask, tol=0.1)[0]) == pytest.approx(0.5)
    assert float(tutorial.on_target(fill, target, mask, tol=0.2)[0]) == 1
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
