"""The reports' machine-readable side: flat metrics files, and the text the README and
docs/results.md generate from the reports, checked against the reports as committed."""

import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from runtime_backdoor import docs_text, reporting

ROOT = Path(__file__).resolve().parents[1]
KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")
SHORT = 64  # the longest string value a metrics file may hold


def small_per_edit() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A per_edit table in the beyond stage's layout: one source, its own editor and a
    transfer editor, two methods, three transformations (with ``:`` and ``.``), 3 images."""
    rng = np.random.default_rng(0)
    scenarios = (("mask", "malicious", "official"), ("ring", "benign", "official"),
                 ("fair_box", "malicious", "fair"))  # fmt: skip
    rows = []
    for editor, method, transform, (scenario, kind, family), name in itertools.product(
        ("control", "lama-s1"), ("backdoor", "untargeted"), ("none", "jpeg:75", "resize:0.5"),
        scenarios, ("a", "b", "c"),
    ):  # fmt: skip
        if editor != "control" and transform != "none":
            continue  # the transfer is untransformed
        rows.append({
            "source": "control", "editor": editor, "method": method, "transform": transform,
            "scenario": scenario, "kind": kind, "family": family, "name": name, "seed": 0,
            "hit_clean": False, "hit_protected": bool(rng.random() < 0.5),
            "hit_fraction_protected": rng.random(), "ssim_vs_clean_edit": rng.random(),
            "ssim_region_vs_clean_edit": rng.random(), "target_mse_clean": 0.3,
            "target_mse_protected": 0.3 - 0.01 * rng.random(),
        })  # fmt: skip
    protection = pd.DataFrame([
        {"source": "control", "method": m, "name": n, "status": "ok", "seconds": 1.0,
         "linf_8bit": 6.0}
        for m in ("backdoor", "untargeted") for n in "abc"
    ] + [{"source": "control", "method": "encoder", "name": "a", "status": "n/a: SD only",
          "seconds": math.nan, "linf_8bit": math.nan}])  # fmt: skip
    return pd.DataFrame(rows), protection


def test_summary_keys_are_flat_identifiers():
    per_edit, protection = small_per_edit()
    summary = reporting.summarize(per_edit, protection)
    bad = [k for k in summary if not KEY.match(k)]
    assert not bad, bad[:3]
    # The transform column, not the pandas method ``Series.transform``, names the keys.
    for t in ("none", "jpeg75", "resize0.5"):
        assert f"control_backdoor_malicious_{t}_hit_rate" in summary
        assert f"control_untargeted_benign_{t}_hit_rate_high" in summary
    assert "transfer_backdoor_control_to_lama_s1_malicious_hit_rate" in summary
    assert all(isinstance(v, int | float) for v in summary.values())
    assert reporting.metric_key("a b", "c/d", "x:y-z") == "a_b_c_d_xy_z"


def metrics_files() -> list[str]:
    """Every json file under ``metrics:`` in dvc.yaml (the headlines) and the full records the
    reports name."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = set()
    for stage in stages.values():
        for entry in stage.get("metrics", []):
            listed.update([entry] if isinstance(entry, str) else entry)
    assert {
        "reports/headline.json",
        "reports/beyond/headline.json",
        "reports/eps_sweep.json",
    } <= listed
    full = {"reports/metrics.json", "reports/beyond/metrics.json", "reports/purification/metrics.json",
            "reports/ensemble/metrics.json"}  # fmt: skip
    return sorted(f for f in listed | full if f.endswith(".json"))


@pytest.mark.parametrize("path", metrics_files())
def test_committed_metrics_files_are_flat(path):
    """Flat keys that `dvc metrics` and a reader can use; scalar values."""
    data = json.loads((ROOT / path).read_text())
    assert isinstance(data, dict) and data
    bad_keys = [k for k in data if not KEY.match(k)]
    assert not bad_keys, f"{len(bad_keys)} keys such as {bad_keys[0][:80]!r}"
    for k, v in data.items():
        if isinstance(v, float):
            assert math.isfinite(v), k
        else:
            assert (
                v is None or isinstance(v, bool | int) or (isinstance(v, str) and len(v) <= SHORT)
            ), (k, repr(v)[:80])


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.org",
         "-c", "commit.gpgsign=false", *args],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def perturb(path: Path) -> None:
    """Every comparison's numbers changed in the last digits, verdicts kept (another CPU)."""
    found = json.loads(path.read_text())
    for c in found:
        c["sentence"] = re.sub(r"\d(?=[\],)])", "9", c["sentence"])
    path.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")


def copy_project(dest: Path) -> list[str]:
    """The generated documents and every file their blocks are made from, copied from this
    checkout's working tree; the documents refreshed from those copies, as a commit would
    have them. Returns the copied paths."""
    files = [*dict.fromkeys(docs_text.GENERATED.values()), *docs_text.DATA_FILES]
    files = [f for f in files if (ROOT / f).exists()]  # a stage may not have run yet
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, dest / f)
    docs_text.update_docs(dest)
    return files


def test_generated_blocks_name_their_sources_and_count_the_conclusions(tmp_path):
    copy_project(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    results = (tmp_path / "docs/results.md").read_text()
    found = {
        f: json.loads((tmp_path / f).read_text())
        for f in docs_text.CONCLUSION_FILES
        if (tmp_path / f).exists()
    }
    stability = json.loads((tmp_path / "reports/stability.json").read_text())
    stated, fragile, _, _ = docs_text._tally(found, stability)
    directional = sum(c["verdict"] != "no difference" for cs in found.values() for c in cs)
    assert len(stated) + len(fragile) == directional
    headline = readme[readme.index(docs_text.HEADLINE_BEGIN) : readme.index(docs_text.HEADLINE_END)]
    assert f"**{len(stated)} directional conclusions**" in headline
    assert (f"{len(fragile)} fragile (not stated)" in headline) == bool(fragile)
    assert "[docs/results.md](docs/results.md)" in headline
    for source in ("`reports/metrics.json`", "`reports/eps_sweep.json`"):
        assert source in headline
    # The control's rates: each named by its definition, with its file.
    block = results[results.index(docs_text.CONTROL_BEGIN) : results.index(docs_text.CONTROL_END)]
    for name, source in (
        ("ε-sweep hit rate", "reports/eps_sweep.json"),
        ("beyond: hit rate, edit *m*", "reports/beyond/fair_masks.csv"),
        ("beyond: official malicious hit rate", "reports/beyond/baselines.csv"),
    ):  # fmt: skip
        row = next(ln for ln in block.splitlines() if ln.startswith(f"| {name} |"))
        assert source in row
    # The full list: one line per directional conclusion (stated, or fragile with the runs that
    # broke it), none in the README.
    listed = results[
        results.index(docs_text.CONCLUSIONS_BEGIN) : results.index(docs_text.CONCLUSIONS_END)
    ].count("\n- ")
    assert listed == directional
    assert docs_text.CONCLUSIONS_BEGIN not in readme


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_docs_check_follows_the_committed_reports(tmp_path):
    repo = tmp_path / "repo"
    files = copy_project(repo)
    git(repo, "init", "-q")
    git(repo, "add", *files)
    git(repo, "commit", "-q", "-m", "reports and docs")
    assert docs_text.docs_match_committed(repo) == []

    # (i) A local pipeline run rewrites the working-tree reports: the committed ones count.
    # (a conclusions file with a stated conclusion, whose sentence the docs quote)
    stability = json.loads((repo / "reports/stability.json").read_text())
    found = {f: json.loads((repo / f).read_text()) for f in docs_text.CONCLUSION_FILES}
    quoted = {source for source, _ in docs_text._tally(found, stability)[0]}
    target = repo / next(f for f in docs_text.CONCLUSION_FILES if f in quoted)
    before = target.read_text()
    perturb(target)
    assert target.read_text() != before
    assert docs_text.docs_match_committed(repo) == []

    # (ii) Refreshing the documents from reports that are not committed: the check fails.
    changed = docs_text.update_docs(repo)
    assert "docs/results.md" in changed and set(changed) <= {"docs/results.md", "docs/beyond.md"}
    problems = docs_text.docs_match_committed(repo)
    assert problems and problems[0].startswith("docs/results.md conclusions block line")
    assert "commit them together" in problems[-1]

    # (iii) Committing the reports with the refreshed documents settles it.
    git(repo, "commit", "-q", "-am", "new numbers, docs refreshed")
    assert docs_text.docs_match_committed(repo) == []

    # (iv) Committing new reports without refreshing the documents fails, in the README too.
    metrics = repo / "reports/metrics.json"
    data = json.loads(metrics.read_text())
    data["protection_psnr"] += 1.0
    metrics.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    git(repo, "commit", "-q", "-am", "new metrics, README not refreshed")
    problems = docs_text.docs_match_committed(repo)
    assert problems and problems[0].startswith("README.md headline block line")

    # (v) A block edited by hand fails at once.
    docs_text.update_docs(repo)
    git(repo, "commit", "-q", "-am", "README refreshed")
    readme = repo / "README.md"
    readme.write_text(readme.read_text().replace("directional conclusions", "conclusions", 1))
    assert docs_text.docs_match_committed(repo)


def test_docs_check_without_git_reads_the_files(tmp_path):
    copy_project(tmp_path)
    assert docs_text.docs_match_committed(tmp_path) == []
    perturb(tmp_path / docs_text.CONCLUSION_FILES[0])
    assert docs_text.docs_match_committed(tmp_path)
    # A stage that has not run: its conclusions are named as not written yet.
    (tmp_path / docs_text.CONCLUSION_FILES[0]).unlink()
    docs_text.update_docs(tmp_path)
    assert docs_text.docs_match_committed(tmp_path) == []
    text = (tmp_path / "docs/results.md").read_text()
    assert f"Not written yet (its stage has not run): `{docs_text.CONCLUSION_FILES[0]}`" in text
    # The other reports must be there.
    (tmp_path / "reports/metrics.json").unlink()
    assert "reports/metrics.json: missing" in docs_text.docs_match_committed(tmp_path)
    (tmp_path / "docs/results.md").write_text("# Results\n")
    assert (
        "docs/results.md: no <!-- control-rates:begin --> ... <!-- control-rates:end --> block"
        in (docs_text.docs_match_committed(tmp_path))
    )
