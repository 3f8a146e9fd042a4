"""Every stated conclusion re-tested as a reviewer would, from the reports themselves.

- each entry of every ``conclusions.json`` carries its test, raw p, adjusted p, family, family
  size and n; the adjusted p is Holm's over its family's raw p values, and a direction is stated
  exactly when the adjusted p is below 0.05 (from 6 images on);
- each stage's conclusions are what its per-edit CSV gives (the stage's own function re-run on
  the CSV), and the exact p of every hit-rate conclusion is the two-sided binomial p of its
  images up and down; for the "does it fire" comparisons the counts are recomputed here from the
  CSV without the stage's code;
- the committed stability report covers every committed conclusion id.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from runtime_backdoor import docs_text, reporting
from runtime_backdoor.pipeline import ensemble, purify
from runtime_backdoor.stats import MIN_N, SIGN_TEST

ROOT = Path(__file__).resolve().parents[1]
FILES = docs_text.CONCLUSION_FILES
KEYS = {"id", "family", "m", "verdict", "n", "test", "p", "p_adjusted", "up", "down", "sentence"}


def load(rel: str) -> list[dict]:
    path = ROOT / rel
    if not path.exists():
        pytest.skip(f"{rel}: its stage has not run")
    return json.loads(path.read_text())


@pytest.mark.parametrize("rel", FILES)
def test_every_conclusion_carries_its_test_and_holm_within_its_family(rel):
    found = load(rel)
    assert found
    families: dict[str, list[dict]] = {}
    for c in found:
        assert KEYS <= set(c), f"{c['id']}: missing {KEYS - set(c)}"
        assert 0 <= c["p"] <= c["p_adjusted"] <= 1
        families.setdefault(c["family"], []).append(c)
        directional = c["verdict"] != "no difference"
        assert directional == (c["p_adjusted"] < 0.05 and c["n"] >= MIN_N) or (
            # a value comparison also needs its interval to exclude 0
            c["test"] != SIGN_TEST and not directional
        ), c["id"]
    for name, items in families.items():
        assert all(c["m"] == len(items) for c in items), name
        expected = multipletests([c["p"] for c in items], method="holm")[1]
        assert [c["p_adjusted"] for c in items] == pytest.approx(expected, rel=2e-3), name


@pytest.mark.parametrize("rel", FILES)
def test_exact_p_of_every_hit_rate_conclusion_is_its_sign_test(rel):
    for c in load(rel):
        if c["test"] != SIGN_TEST:
            continue
        moved = c["up"] + c["down"]
        p = stats.binomtest(c["up"], moved).pvalue if moved else 1.0
        assert c["p"] == pytest.approx(p, rel=1e-3), c["id"]


def recomputed(rel: str) -> list[dict]:
    """The stage's conclusions re-made from its CSV in the working tree."""
    reports = ROOT / "reports"
    if rel == "reports/conclusions.json":
        return reporting.scenario_conclusions(pd.read_csv(reports / "per_edit.csv"))
    if rel == "reports/beyond/conclusions.json":
        return reporting.conclusions(pd.read_csv(reports / "beyond" / "per_edit.csv"))
    if rel == "reports/purification/conclusions.json":
        per_edit = pd.read_csv(reports / "purification" / "per_edit.csv")
        return purify.conclusions(pd.concat([per_edit, purify.worst_case(per_edit)]))
    return ensemble.conclusions(pd.read_csv(reports / "ensemble" / "per_image.csv"))


@pytest.mark.parametrize("rel", FILES)
def test_each_stage_conclusions_are_what_its_csv_gives(rel):
    stored = {c["id"]: c for c in load(rel)}
    again = {c["id"]: c for c in recomputed(rel)}
    assert set(again) == set(stored)
    for cid, c in again.items():
        s = stored[cid]
        assert (c["verdict"], c["family"], c["n"], c["up"], c["down"]) == (
            s["verdict"], s["family"], s["n"], s["up"], s["down"]
        ), cid  # fmt: skip
        assert c["p"] == pytest.approx(s["p"], rel=1e-3), cid


def share_of_seeds(d: pd.DataFrame, column: str) -> pd.Series:
    return d.groupby("name")[column].apply(lambda v: v.astype(float).mean()).sort_index()


def test_does_it_fire_counted_here_from_the_csv_without_the_stages_code():
    beyond = {c["id"]: c for c in load("reports/beyond/conclusions.json")}
    per_edit = pd.read_csv(ROOT / "reports" / "beyond" / "per_edit.csv")
    checked = 0
    for source in per_edit["source"].unique():
        d = per_edit[(per_edit["source"] == source) & (per_edit["editor"] == source)
                     & (per_edit["method"] == "backdoor") & (per_edit["transform"] == "none")
                     & (per_edit["scenario"] == "mask")]  # fmt: skip
        diff = share_of_seeds(d, "hit_protected") - share_of_seeds(d, "hit_clean")
        up, down = int((diff > 0).sum()), int((diff < 0).sum())
        c = beyond[f"{source}/fires"]
        assert (c["up"], c["down"], c["n"]) == (up, down, len(diff))
        assert c["p"] == pytest.approx(stats.binomtest(up, up + down).pvalue if up + down else 1.0,
                                       rel=1e-3)  # fmt: skip
        checked += 1
    pur = {c["id"]: c for c in load("reports/purification/conclusions.json")}
    rows = pd.read_csv(ROOT / "reports" / "purification" / "per_edit.csv")
    rows = rows[(rows["purifier"] == "none") & (rows["scenario"] == "mask")]
    for (editor, method), d in rows.groupby(["editor", "method"]):
        diff = share_of_seeds(d, "hit_protected") - share_of_seeds(d, "hit_clean")
        up, down = int((diff > 0).sum()), int((diff < 0).sum())
        assert (pur[f"{editor}/{method}/fires"]["up"], pur[f"{editor}/{method}/fires"]["down"]) == (
            up, down
        )  # fmt: skip
        checked += 1
    assert checked >= 4


def test_the_stability_report_covers_every_committed_conclusion():
    text = docs_text.committed_text(ROOT, "reports/stability.json")
    assert text is not None, "reports/stability.json: run `make stability`"
    stability = json.loads(text)
    covered = {(r["file"], r["id"]): r["committed"] for r in stability["conclusions"]}
    runs = set(stability["seconds"])
    assert {"blas", "seed"} <= runs
    for rel in FILES:
        committed = docs_text.committed_text(ROOT, rel)
        assert committed is not None, rel
        for c in json.loads(committed):
            assert (rel, c["id"]) in covered, f"{rel}: {c['id']} not in reports/stability.json"
            assert covered[rel, c["id"]] == c["verdict"], f"{rel}: {c['id']} changed since"
    # and the fragile ones are exactly those a run broke
    broken = docs_text.fragile_runs(stability)
    assert all(set(v) <= runs for v in broken.values())
    assert np.isfinite(sum(stability["seconds"].values()))
