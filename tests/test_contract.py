"""The layout's promises, checked: stage ↔ notebook ↔ module ↔ outputs ↔ test.

- every DVC stage has ``notebooks/NN_<stage>.ipynb`` with its py:percent twin
  ``notebooks/NN_<stage>.py`` (the stage's dep and what it runs), ``runtime_backdoor/pipeline/<stage>.py``
  and ``tests/pipeline/test_<stage>.py``, and its notebook calls that module;
- a stage's ``deps`` list exactly the package files its notebook imports, transitively, counting
  every import statement (also those inside functions: a lazily imported editor still shapes the
  outputs), plus the notebook and its data inputs;
- every ``parameters`` cell default equals what ``dvc.yaml`` passes from ``params.yaml``, and
  every notebook parameter is passed;
- metrics files have flat identifier keys.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "runtime_backdoor"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def module_file(name: str) -> Path | None:
    """The source file of a package module (``a.b`` -> ``src/a/b.py`` or ``src/a/b/__init__.py``)."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every package module an import statement anywhere in ``tree`` names (with its parents)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE and module_file(name) is not None:
                parts = name.split(".")
                found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return found


def closure(start: set[str]) -> set[Path]:
    """The package files ``start`` imports, transitively."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        tree = ast.parse(path.read_text())
        todo += imported_modules(tree, name, path.name == "__init__.py") - seen
    return {module_file(n) for n in seen}


def notebook_code(path: Path) -> str:
    nb = jupytext.read(path)  # the .py twin or the .ipynb
    cells = [c.source for c in nb.cells if c.cell_type == "code"]
    return "\n".join(
        line for c in cells for line in c.splitlines() if not line.startswith(("%", "!"))
    )


def stage_notebook(stage: dict) -> Path:
    """The notebook source a stage runs: the py:percent twin its cmd converts."""
    words = shlex.split(stage["cmd"])
    return ROOT / next(w for w in words if w.startswith("notebooks/"))


def code_deps(notebook: Path) -> set[str]:
    start = imported_modules(ast.parse(notebook_code(notebook)), "__main__", False)
    return {str(p.relative_to(ROOT)) for p in closure(start)}


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_has_its_notebook_module_and_test(name):
    from runtime_backdoor.pipeline import STAGES

    assert list(STAGES) == list(DVC), "pipeline.STAGES and dvc.yaml list the same stages in order"
    notebook = stage_notebook(DVC[name])
    assert notebook.with_suffix(".ipynb").relative_to(ROOT).as_posix() == STAGES[name]
    assert re.fullmatch(rf"\d\d_{name}\.py", notebook.name)
    assert notebook.with_suffix(".ipynb").is_file()
    assert (SRC / PACKAGE / "pipeline" / f"{name}.py").is_file()
    assert (ROOT / "tests" / "pipeline" / f"test_{name}.py").is_file()
    assert f"from {PACKAGE}.pipeline import {name}" in notebook_code(notebook)


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_deps_are_exactly_what_its_notebook_imports(name):
    stage = DVC[name]
    deps = [str(d) for d in stage["deps"]]
    notebook = stage_notebook(stage)
    code = {d for d in deps if d.startswith("src/")}
    expected = code_deps(notebook)
    missing, extra = sorted(expected - code), sorted(code - expected)
    assert not missing and not extra, (
        f"dvc.yaml stage {name}: add {missing}, remove {extra}. Its code deps are:\n"
        + "\n".join(f"      - {d}" for d in sorted(expected))
    )
    assert str(notebook.relative_to(ROOT)) in deps
    others = [d for d in deps if not d.startswith(("src/", "notebooks/"))]
    assert all(not d.startswith("src") for d in others)


def test_a_change_to_the_expansion_reruns_implant_and_sweep_code_only_the_sweep():
    """The two measured cases: E(m) shapes the protected images; the ε sweep's own code
    shapes nothing but the sweep."""
    assert "src/runtime_backdoor/masks.py" in DVC["implant"]["deps"]
    holders = [
        n for n, s in DVC.items() if "src/runtime_backdoor/pipeline/eps_sweep.py" in s["deps"]
    ]
    assert holders == ["eps_sweep"]


def resolved(value: str):
    """A ``-p`` value as papermill receives it from DVC: ``${a.b}`` taken from params.yaml."""
    m = re.fullmatch(r"\$\{([\w.]+)\}", value)
    if not m:
        return yaml.safe_load(value) if value else ""
    out = PARAMS
    for key in m.group(1).split("."):
        out = out[key]
    return out


def passed_parameters(stage: dict) -> dict:
    words = shlex.split(stage["cmd"].split("&&")[-1])
    return {words[i + 1]: resolved(words[i + 2]) for i, w in enumerate(words) if w == "-p"}


def notebook_defaults(notebook: Path) -> dict:
    nb = jupytext.read(notebook)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{notebook.name}: one cell tagged parameters"
    out = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign), f"{notebook.name}: plain assignments only"
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


@pytest.mark.parametrize("name", sorted(DVC))
def test_notebook_defaults_are_what_dvc_passes(name):
    stage = DVC[name]
    passed = passed_parameters(stage)
    defaults = notebook_defaults(stage_notebook(stage))
    assert set(defaults) == set(passed), (
        f"{name}: notebook parameters never passed {sorted(set(defaults) - set(passed))}, "
        f"passed but not in the notebook {sorted(set(passed) - set(defaults))}"
    )
    for key, value in passed.items():
        assert defaults[key] == value, (
            f"{name}: notebook default {key}={defaults[key]!r}, dvc passes {value!r}"
        )


@pytest.mark.parametrize("name", sorted(DVC))
def test_stage_params_cover_every_value_it_reads(name):
    """What a stage's cmd reads from params.yaml is listed under its ``params`` (so that
    ``dvc exp run -S key=value`` re-runs exactly the stages that read it)."""
    stage = DVC[name]
    read = set(re.findall(r"\$\{([\w.]+)\}", stage["cmd"]))
    listed = {str(p) for p in stage.get("params", [])}
    for key in read:
        assert key in listed or key.split(".")[0] in listed, f"{name}: {key} read but not in params"


def metrics_files() -> list[Path]:
    out = []
    for stage in DVC.values():
        for item in stage.get("metrics", []):
            out.append(ROOT / (next(iter(item)) if isinstance(item, dict) else item))
    return out


@pytest.mark.parametrize("path", metrics_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_metrics_have_flat_identifier_keys(path):
    import json

    data = json.loads(path.read_text())
    bad = [k for k in data if not re.fullmatch(r"[A-Za-z0-9_.\-]+", k)]
    assert not bad, f"{path.name}: keys that are not identifiers: {bad[:3]}"
    for key, value in data.items():
        ok = (
            value is None
            or isinstance(value, bool | int | float)
            or (isinstance(value, str) and len(value) < 200)
        )
        assert ok, f"{path.name}: {key} holds {type(value).__name__}, not a flat value"


def test_a_new_budget_reruns_from_implant_on_without_retraining_the_editor():
    """``dvc exp run -S implant.eps=0.05``: the stages that read implant.* are implant and the
    analyses; the editor stage (the trained miniature) does not."""
    readers = {n for n, s in DVC.items() if re.search(r"\$\{implant\.", s["cmd"])}
    assert {"implant", "edit", "beyond", "eps_sweep"} <= readers
    assert not readers & {"prepare", "editor"}
    assert (
        "implant" not in str(DVC["editor"]["params"]) and "${implant." not in DVC["editor"]["cmd"]
    )


# ----------------------------------------------------------------------- the budget, the hit


def builds_budget(notebook: Path) -> bool:
    return "budget = Budget(" in notebook_code(notebook)


BUDGET_STAGES = sorted(n for n, s in DVC.items() if builds_budget(stage_notebook(s)))
#: stages that count hits (their notebooks take the evaluate stage's thresholds)
HIT_STAGES = sorted(n for n, s in DVC.items() if "hit_tol" in notebook_defaults(stage_notebook(s)))


def test_the_budget_stages_and_the_hit_stages_are_the_expected_ones():
    assert BUDGET_STAGES == ["beyond", "ensemble", "eps_sweep", "implant", "purify"]
    assert HIT_STAGES == ["beyond", "ensemble", "eps_sweep", "evaluate", "purify"]


@pytest.mark.parametrize("name", BUDGET_STAGES)
def test_every_stage_that_builds_a_budget_passes_all_of_implant(name):
    """Each budget field from params.yaml's ``implant`` section, none from a code default; the
    notebook builds the Budget in one expression from them, right after the parameters."""
    from runtime_backdoor.budget import BUDGET_FIELDS

    stage = DVC[name]
    words = shlex.split(stage["cmd"].split("&&")[-1])
    passed = {words[i + 1]: words[i + 2] for i, w in enumerate(words) if w == "-p"}
    for field in BUDGET_FIELDS:
        assert passed.get(field) == f"${{implant.{field}}}", (
            f"{name}: -p {field} ${{implant.{field}}}"
        )
    assert "implant" in [str(p) for p in stage["params"]], f"{name}: params lists implant whole"
    nb = jupytext.read(stage_notebook(stage))
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    built = nb.cells[at + 1].source
    call = ", ".join(f"{f}={f}" for f in BUDGET_FIELDS)
    assert f"budget = Budget({call})" in built, f"{name}: the cell after the parameters"


@pytest.mark.parametrize("name", HIT_STAGES)
def test_every_stage_that_counts_hits_passes_the_evaluate_thresholds(name):
    stage = DVC[name]
    words = shlex.split(stage["cmd"].split("&&")[-1])
    passed = {words[i + 1]: words[i + 2] for i, w in enumerate(words) if w == "-p"}
    listed = [str(p) for p in stage["params"]]
    for key in ("hit_tol", "hit_min_fraction"):
        assert passed.get(key) == f"${{evaluate.{key}}}", f"{name}: -p {key} ${{evaluate.{key}}}"
        assert f"evaluate.{key}" in listed or "evaluate" in listed, f"{name}: params evaluate.{key}"


def test_the_budget_defaults_are_the_papers_and_match_the_modules():
    from runtime_backdoor.budget import Budget
    from runtime_backdoor.masks import PAPER_EXPAND_KERNEL
    from runtime_backdoor.targets import TARGET_KINDS

    b = Budget()
    assert (b.eps, b.steps, b.lr, b.init_high, b.target, b.seed) == (
        0.025,
        20,
        0.1,
        0.01,
        "solid",
        0,
    )
    assert b.expand_kernel == PAPER_EXPAND_KERNEL and b.target in TARGET_KINDS
    assert b.eps_8bit == 6.375


# ----------------------------------------------------------------- what no stage may import

#: front ends, the weight registry and the docs generator: editing them re-runs no stage
FORBIDDEN_IN_STAGES = (
    "runtime_backdoor.cli",
    "runtime_backdoor.demo",
    "runtime_backdoor.owner",
    "runtime_backdoor.owner_io",
    "runtime_backdoor.downloads",
    "runtime_backdoor.weights",
    "runtime_backdoor.runs",
    "runtime_backdoor.docs_text",
    "runtime_backdoor.batch",
    "runtime_backdoor.comparison",
    "runtime_backdoor.tutorial",
    "runtime_backdoor.views",
)


def forbidden_files() -> list[str]:
    """The files of :data:`FORBIDDEN_IN_STAGES` (every file of a package)."""
    out = []
    for m in FORBIDDEN_IN_STAGES:
        base = SRC.joinpath(*m.split("."))
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        out += [str(f.relative_to(ROOT)) for f in files]
    return out


@pytest.mark.parametrize("name", sorted(DVC))
def test_no_stage_depends_on_a_front_end_the_registry_or_the_docs(name):
    notebook = stage_notebook(DVC[name])
    found = sorted(set(forbidden_files()) & code_deps(notebook))
    assert not found, f"stage {name} imports {found} (transitively)"
    deps = [str(d) for d in DVC[name]["deps"]]
    assert not set(forbidden_files()) & set(deps), f"dvc.yaml stage {name} lists {found}"


def test_editing_the_registry_downloads_or_docs_changes_no_stage_deps():
    """A comment appended to downloads.py, weights.py or docs_text.py changes no stage's deps
    hash: those files are in no stage's deps, listed or imported."""
    touched = {
        "src/runtime_backdoor/downloads.py",
        "src/runtime_backdoor/weights.py",
        "src/runtime_backdoor/docs_text.py",
    }
    for name, stage in DVC.items():
        listed = {str(d) for d in stage["deps"]}
        assert not touched & listed, name
        assert not touched & code_deps(stage_notebook(stage)), name
