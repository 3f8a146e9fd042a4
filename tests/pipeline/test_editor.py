"""Stage ``editor`` (runtime_backdoor.pipeline.editor)."""

import json

import pytest

from runtime_backdoor.pipeline import editor


def test_a_weightless_editor_is_recorded_with_its_sensitivity(tmp_path):
    result = editor.run(tmp_path, name="blur-fill", check_size=32, eps=0.025, device="cpu")
    record = json.loads((tmp_path / "editor.json").read_text())
    assert record == {"name": "blur-fill", "weights": None, "options": {}}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parameters"] == 0 and summary["training"] == {}
    # The classical fill is insensitive: far below the gain a solid target needs.
    assert 0 <= summary["gain_mean"] < 0.2 * summary["needed_mean"]
    assert len(result["check"]["gain"]) == 6


def test_the_control_is_far_more_sensitive_than_blur_fill(tmp_path):
    from runtime_backdoor.editors.simple import BlurFillEditor, GlobalMixEditor

    blur = editor.sensitivity_check(BlurFillEditor(), size=32, eps=0.025, seed=0, device="cpu")
    mix = editor.sensitivity_check(
        GlobalMixEditor(gain=800), size=32, eps=0.025, seed=0, device="cpu"
    )
    assert mix["gain_mean"] > 10 * blur["gain_mean"]


def test_unknown_editor_and_missing_weights_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown editor 'nope'"):
        editor.run(tmp_path, name="nope", device="cpu")
    with pytest.raises((FileNotFoundError, ValueError), match="missing.safetensors"):
        editor.run(
            tmp_path, name="mini-lama", weights=str(tmp_path / "missing.safetensors"), device="cpu"
        )


@pytest.mark.slow
def test_the_notebook_from_jupyterlabs_folder_uses_the_trained_miniature(tmp_path, run_notebook):
    """JupyterLab starts the kernel in notebooks/: the stage still reads the project's files
    (here the trained miniature) and records the same gain as the committed editor stage."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    weights = root / "models" / "editor" / "mini-lama.safetensors"
    if not weights.is_file():  # a fresh clone: restore it from the in-repository remote
        dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
        subprocess.run([dvc, "pull", "-q", "editor"], cwd=root, check=True, timeout=300)
    committed = json.loads((root / "models" / "editor" / "summary.json").read_text())
    run_notebook(
        "02_editor", root / "notebooks", out=tmp_path / "02_editor.out.ipynb", weights="models/editor/mini-lama.safetensors",
        out_dir=str(tmp_path / "editor"), device="cpu",
    )  # fmt: skip
    summary = json.loads((tmp_path / "editor" / "summary.json").read_text())
    assert summary["weights"] == "models/editor/mini-lama.safetensors"
    assert summary["parameters"] == committed["parameters"]
    assert summary["gain_mean"] == pytest.approx(committed["gain_mean"], rel=1e-3)
    assert not (root / "notebooks" / "models").exists()
