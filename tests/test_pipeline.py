"""The pipeline end to end on a tiny setting: each notebook, and `dvc repro`; source notebooks.

Each stage's own tests are in tests/pipeline/test_<stage>.py.

Notebooks run under papermill with tiny parameters (recommenders-style) and the values
their last cell records are asserted.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runtime_backdoor.masks import SCENARIOS
from runtime_backdoor.runs import copy_project
from runtime_backdoor.samples import make_sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    make_sample(folder, n_per_type=1, size=64, seed=0)
    return folder


@pytest.mark.slow
def test_every_notebook_on_a_tiny_setting(raw, tmp_path, run_notebook):
    d = tmp_path
    run_notebook("01_prepare", d, raw_dir=str(raw), out_dir="prepared", size=64, limit=2)
    assert json.loads((d / "prepared/summary.json").read_text()) == {"n_images": 2, "size": 64}

    run_notebook(
        "02_editor",
        d,
        name="mini-lama",
        train_steps=2,
        train_seconds=0,
        train_size=32,
        check_size=64,
        out_dir="editor",
        device="cpu",
    )
    editor = json.loads((d / "editor/summary.json").read_text())
    assert editor["name"] == "mini-lama" and editor["parameters"] > 10_000
    assert editor["training"]["steps"] == 2
    assert editor["gain_mean"] > 0 and editor["needed_mean"] > 0

    common = {"prepared_dir": "prepared", "editor_record": "editor/editor.json", "device": "cpu"}
    run_notebook("03_implant", d, **common, out_dir="protected", steps=2, expand_kernel=5)
    implant = json.loads((d / "protected/summary.json").read_text())
    assert implant["n_images"] == 2 and implant["linf_8bit_max"] <= 6.375 + 1e-6

    run_notebook(
        "04_edit", d, **common, protected_dir="protected", out_dir="edited", expand_kernel=5
    )
    edits = json.loads((d / "edited/summary.json").read_text())
    assert edits["n_edits"] == 12 and edits["scenarios"] == sorted(SCENARIOS)

    paths = {
        "prepared_dir": "prepared",
        "protected_dir": "protected",
        "edited_dir": "edited",
        "reports_dir": "reports",
    }
    run_notebook("05_evaluate", d, **paths, clip_weights="", device="cpu")
    metrics = json.loads((d / "reports/metrics.json").read_text())
    assert metrics["n_images"] == 2 and metrics["clip_fid_available"] is False
    assert metrics["protection_linf_8bit_max"] <= 6 + 1e-4
    assert 0 <= metrics["malicious_mask_hit_rate_protected"] <= 1
    clip = json.loads((d / "reports/clip_fid.json").read_text())
    assert "not" in clip["reason"].lower() or "no " in clip["reason"].lower()

    run_notebook("06_figures", d, **paths, rows_per_grid=1)
    for f in ("grids/face.png", "grids/logo.png", "scenarios.png"):  # limit 2: a face and a logo
        assert (d / "reports/figures" / f).stat().st_size > 5_000
    table = (d / "reports/results.md").read_text()
    assert "| malicious | mask |" in table and "| benign | ring |" in table
    assert re.search(r"\| malicious \| mask \| \d+% \[\d+, \d+\] → \d+% \[\d+, \d+\]", table)
    found = json.loads((d / "reports/conclusions.json").read_text())
    assert {c["id"] for c in found} >= {"scenario/mask/hit", "scenario/ring/target_mse"}
    # ipywidgets is installed: tqdm's notebook bars render, no "IProgress not found" warning.
    for executed in d.glob("*.out.ipynb"):
        assert "IProgress not found" not in executed.read_text(), executed.name


def flatten(tree) -> dict:
    """DVC's view of a metrics file: one key per leaf."""
    if not isinstance(tree, dict):
        return {"": tree}
    return {f"{k}.{sub}": v for k, t in tree.items() for sub, v in flatten(t).items()}


@pytest.mark.slow
def test_dvc_repro_end_to_end_on_a_tiny_setting(tmp_path):
    """The real dvc.yaml, with tiny parameters, in a copy of the project."""
    items = ("dvc.yaml", "params.yaml", "data.dvc", ".dvc/config", ".dvcignore", "notebooks")
    copy_project(ROOT, tmp_path, (*items, "src", "dvc-store"))
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }

    def dvc(*args):
        r = subprocess.run(
            [str(bin_dir / "dvc"), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("pull", "-q", "data.dvc")
    tiny = {
        "prepare.size": 64,
        "prepare.limit": 2,
        "editor.train_steps": 2,
        "editor.train_size": 32,
        "implant.steps": 2,
        "figures.rows_per_grid": 1,
        "eps_sweep.eps_8bit": "4,32",
    }
    params = (tmp_path / "params.yaml").read_text()
    import yaml

    p = yaml.safe_load(params)
    for key, value in tiny.items():
        section, name = key.split(".")
        p[section][name] = value
    p["evaluate"]["clip_weights"] = ""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    run = subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    # A quiet run: no notice a user cannot act on (an empty dep, the kernel's transport).
    lines = (run.stdout + run.stderr).splitlines()
    noticed = [line for line in lines if "WARNING" in line and not line.startswith("> ")]
    assert not noticed, noticed
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["n_images"] == 2
    assert "up to date" in dvc("status").lower()
    per_edit = pd.read_csv(tmp_path / "reports/per_edit.csv")
    assert len(per_edit) == 12
    # ε x (one seed of the pipeline editor and of blur-fill + 3 of the control) x images
    assert len(pd.read_csv(tmp_path / "reports/eps_sweep.csv")) == 2 * (1 + 1 + 3) * 2
    sweep = json.loads((tmp_path / "reports/eps_sweep.json").read_text())
    assert (sweep["control_seeds"], sweep["blur-fill_seeds"]) == (3, 1)
    rate = "control_hit_rate_at_paper_eps"
    assert sweep[f"{rate}_low"] <= sweep[rate] <= sweep[f"{rate}_high"]
    found = json.loads((tmp_path / "reports/beyond/conclusions.json").read_text())
    assert found and all(c["verdict"] in ("higher", "lower", "no difference") for c in found)

    # A reviewer's experiment, the DVC way: one -S change re-runs from implant on (the editor
    # is not retrained), the metrics stay readable and the data plots overlay both runs.
    git_env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    (tmp_path / "data" / ".gitignore").write_text((ROOT / "data" / ".gitignore").read_text())
    for args in (["add", "-A"], ["commit", "-qm", "baseline"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=git_env, check=True, capture_output=True)
    import vl_convert

    ran = dvc("exp", "run", "-S", "implant.eps=0.05")
    assert "Stage 'editor' didn't change" in ran and "Running stage 'implant'" in ran, ran
    shown = json.loads(dvc("metrics", "show", "--json"))
    assert 0 < sum(len(flatten(v)) for v in shown[""]["data"].values()) <= 100
    changed = dvc("exp", "show", "--only-changed", "--csv")
    assert "implant.eps" in changed.splitlines()[0] and "0.05" in changed
    plots = json.loads(dvc("plots", "diff", "HEAD", "--json"))["data"]
    for name in ("eps_sweep", "loss_curves", "purification_worst_case"):
        spec = plots[name][0]["content"]
        assert {row["rev"] for row in spec["data"]["values"]} == {"HEAD", "workspace"}, name
        assert "<svg" in vl_convert.vegalite_to_svg(spec)  # drawn offline: one chart, both runs


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_source_notebooks_are_thin_and_parameterised(path):
    """Committed without outputs; one `parameters` cell of literals papermill can parse."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for line in tagged[0].source.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, rest = line.partition(" = ")
            assert name.isidentifier(), line
            # papermill cannot parse a parameter line with '=' in its comment
            assert "=" not in rest, line
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # No machine paths or editor state in the committed metadata.
    assert set(nb.metadata) <= {"kernelspec", "language_info"}
    assert not re.search(r"/(home|work|tmp|Users)/", json.dumps(nb.metadata))
    # Every notebook finds the project folder first: JupyterLab, papermill and DVC see one tree.
    # (a cell that only builds the implantation budget from the parameters reads no path and may
    # come first: the budget in one expression, right under the parameters it is made of)
    rest = [c.source for c in code[1:] if not c.source.startswith("from runtime_backdoor.budget")]
    first = rest[0] if rest else ""
    assert "enter_project_root()" in first, (
        f"{path.name}: the first cell after the parameters (and the budget) enters the project root"
    )


@pytest.mark.parametrize(
    "path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name
)
def test_stage_notebooks_hold_no_logic(path):
    """A stage notebook calls its module and displays: no loops, no definitions, short cells."""
    import ast

    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(cell.source)
        banned = (ast.FunctionDef, ast.ClassDef, ast.While, ast.With)
        assert not any(isinstance(n, banned) for n in ast.walk(tree)), cell.source
        loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
        assert len(loops) <= 1 and len(cell.source.splitlines()) <= 25, cell.source


@pytest.mark.slow
def test_a_fresh_clone_pulls_every_output_and_is_up_to_date(tmp_path, jupyterlab_save):
    """A reviewer's clone: `dvc pull` restores every stage output from the in-repository
    remote (exit 0), and `dvc status` then finds nothing to re-run."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "dvc.lock", "dvc-store"],
                      capture_output=True, text=True).stdout.strip():  # fmt: skip
        pytest.skip("dvc.lock or dvc-store has uncommitted changes: the clone would not have them")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pulled = subprocess.run(
        [dvc, "pull"], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    for out in ("data/prepared", "data/protected", "data/edited", "models/editor/mini-lama.safetensors",
                "reports/notebooks/07_beyond.ipynb"):  # fmt: skip
        assert (clone / out).exists(), out
    status = subprocess.run(
        [dvc, "status"], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    # Front ends, the weight registry, downloads and the docs generator are in no stage's
    # closure: editing them re-runs nothing (the contract test checks the deps lists; this is
    # DVC's own view of the same clone).
    for rel in ("src/runtime_backdoor/downloads.py", "src/runtime_backdoor/weights.py",
                "src/runtime_backdoor/docs_text.py", "src/runtime_backdoor/cli.py"):  # fmt: skip
        with open(clone / rel, "a") as f:
            f.write("\n# a comment that changes no result\n")
    # A student opens, runs and saves every notebook in JupyterLab: outputs, kernel metadata and
    # cell ids go into the .ipynb, the py:percent twins that the stages run stay as they were.
    for notebook in sorted((clone / "notebooks").glob("*.ipynb")):
        jupyterlab_save(clone / "notebooks", notebook.name)
    assert subprocess.run(
        ["git", "-C", str(clone), "diff", "--quiet", "--", "notebooks/*.ipynb"]
    ).returncode
    status = subprocess.run(
        [dvc, "status"], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
