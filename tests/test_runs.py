"""Plumbing of `make reproduce-real` / `make reproduce-paper`, without running the pipeline."""

import hashlib
from pathlib import Path

import pytest
import yaml

from runtime_backdoor import runs
from runtime_backdoor.runs import RunError

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path):
    """A project folder with the real params, presets and stage files, and stand-in weights."""
    root = tmp_path / "project"
    (root / "params").mkdir(parents=True)
    for name in ("params.yaml", "params/real.yaml", "params/paper.yaml"):
        (root / name).write_text((PROJECT / name).read_text())
    (root / "dvc.yaml").write_text("stages: {}\n")
    for folder in ("notebooks", "src/runtime_backdoor", "data/raw", "reports"):
        (root / folder).mkdir(parents=True)
    (root / "notebooks" / "01_prepare.ipynb").write_text("{}")
    (root / "src" / "runtime_backdoor" / "owner.py").write_text("")
    (root / "data" / "raw" / "a_example.png").write_bytes(b"png")
    (root / "reports" / "metrics.json").write_text('{"n_images": 18}')
    (root / "models" / "clip" / "ViT-B-32-quickgelu").mkdir(parents=True)
    (root / "models" / "big-lama.pt").write_bytes(b"weights")
    (root / "models" / "clip" / "ViT-B-32-quickgelu" / "open_clip_pytorch_model.bin").write_bytes(
        b"clip"
    )
    return root


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_real_params_are_the_project_params_with_the_preset(project):
    params = runs.run_params("real", root=project, n=3)
    base = flatten(yaml.safe_load((project / "params.yaml").read_text()))
    got = flatten(params)
    # the project's keys, plus the weights' fingerprints that make DVC rerun when a file changes
    assert set(got) - set(base) == {"editor.weights_id", "evaluate.clip_weights_id"}
    assert set(base) <= set(got)
    assert got.pop("editor.weights_id") == f"sha256:{hashlib.sha256(b'weights').hexdigest()}"
    assert got.pop("evaluate.clip_weights_id") == f"sha256:{hashlib.sha256(b'clip').hexdigest()}"
    changed = {k: v for k, v in got.items() if base[k] != v}
    assert changed == {
        "prepare.size": 256,
        "prepare.limit": 3,
        "editor.name": "lama",
        "editor.weights": str(project / "models" / "big-lama.pt"),
        "implant.expand_kernel": 9,
        "implant.batch_size": 2,
        "edit.batch_size": 2,
        "evaluate.clip_weights": str(
            project / "models" / "clip" / "ViT-B-32-quickgelu" / "open_clip_pytorch_model.bin"
        ),
    }
    assert got["device"] == "auto"


def test_a_present_lpips_backbone_is_found_from_the_run_folder_and_fingerprinted(project):
    without = runs.run_params("real", root=project)
    assert without["evaluate"]["lpips_backbone"] == "models/lpips/alexnet-owt-7be5be79.pth"
    assert "lpips_backbone_id" not in without["evaluate"]  # absent: reported "not computed"
    backbone = project / "models" / "lpips" / "alexnet-owt-7be5be79.pth"
    backbone.parent.mkdir(parents=True)
    backbone.write_bytes(b"alexnet")
    params = runs.run_params("real", root=project)
    assert params["evaluate"]["lpips_backbone"] == str(backbone)  # absolute: runs/real/ finds it
    assert params["evaluate"]["lpips_backbone_id"] == (
        f"sha256:{hashlib.sha256(b'alexnet').hexdigest()}"
    )


def test_paper_params_follow_the_paper(project):
    (project / "models" / "sd15-inpainting").mkdir()
    params = runs.run_params("paper", root=project, editor="sd-inpainting", clip="none")
    assert params["prepare"]["size"] == 512 and params["prepare"]["limit"] == 0
    assert params["implant"]["expand_kernel"] == 17
    assert params["implant"]["eps"] == 0.025 and params["implant"]["steps"] == 20
    assert params["device"] == "cuda"
    assert params["editor"]["name"] == "sd-inpainting"
    assert params["editor"]["weights"] == str(project / "models" / "sd15-inpainting")
    assert params["evaluate"]["clip_weights"] == "" and "clip_weights_id" not in params["evaluate"]
    first = params["editor"]["weights_id"]
    assert first.startswith("listing:")
    (project / "models" / "sd15-inpainting" / "model_index.json").write_text("{}")
    again = runs.run_params("paper", root=project, editor="sd-inpainting", clip="none")
    assert again["editor"]["weights_id"] != first  # a changed folder reruns the stages


def test_missing_weights_name_make_weights(project):
    (project / "models" / "big-lama.pt").unlink()
    with pytest.raises(RunError) as err:
        runs.run_params("real", root=project)
    assert str(err.value) == (
        f"lama weights (big-lama) missing at {project / 'models' / 'big-lama.pt'}: run `make weights` "
        "(or `runtime-backdoor weights fetch big-lama`; WEIGHTS=PATH for another file)"
    )
    runs.run_params("real", root=project, weights=str(project / "models" / "clip"))  # any path
    with pytest.raises(RunError, match=r"CLIP=none to skip"):
        runs.run_params(
            "paper", root=project, weights=str(project / "models"), clip="elsewhere.safetensors"
        )
    with pytest.raises(RunError, match=r"mat weights \(mat-places512\) missing at .*Places_512"):
        runs.run_params("paper", root=project, editor="mat")


def test_bad_choices_are_one_line(project):
    with pytest.raises(
        RunError, match=r"^EDITOR=sdxl: unknown editor; choose one of lama, sd-inpainting, mat$"
    ):
        runs.run_params("paper", root=project, editor="sdxl")
    with pytest.raises(RunError, match=r"^EDITOR=blur-fill: unknown editor"):
        runs.run_params("paper", root=project, editor="blur-fill")  # nothing to fetch for it
    with pytest.raises(RunError, match=r"^N=0: "):
        runs.run_params("real", root=project, n=0)
    (project / "params" / "real.yaml").write_text("implant:\n  expand_kernal: 9\n")
    with pytest.raises(RunError, match=r"unknown parameter 'expand_kernal'"):
        runs.run_params("real", root=project)


def test_paper_without_gpu_stops_at_once(project, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(project)
    assert runs.main(["paper"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reproduce-paper: error: needs a CUDA GPU") and "FORCE=1" in err
    assert err.count("\n") == 1
    assert not (project / "runs").exists()
    runs.require_gpu(force=True)  # forced: no error


def test_setup_builds_a_separate_dvc_project(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    assert runs.main(["real", "--n", "2", "--clip", "none", "--setup-only"]) == 0
    run_dir = project / "runs" / "real"
    assert capsys.readouterr().out.strip() == str(run_dir)
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert params == runs.run_params("real", root=project, n=2, clip="none")
    for name in ("dvc.yaml", "notebooks/01_prepare.ipynb", "src/runtime_backdoor/owner.py"):
        assert (run_dir / name).read_bytes() == (project / name).read_bytes()
    assert (run_dir / "data" / "raw" / "a_example.png").read_bytes() == b"png"
    assert (run_dir / ".dvc").is_dir() and not (run_dir / "reports").exists()
    # nothing of the project changed, and nothing was written outside runs/
    after = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if "runs" not in p.relative_to(project).parts} == before
