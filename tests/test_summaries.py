"""What DVC shows: headline metrics a reviewer can read and data plots that overlay experiments."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from runtime_backdoor import summaries as S

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
#: the stage whose full record each headline file is cut from
HEADLINE_FILES = {
    "evaluate": "reports",
    "beyond": "reports/beyond",
    "purify": "reports/purification",
    "ensemble": "reports/ensemble",
}


def declared_metrics() -> dict[str, list[str]]:
    out = {}
    for name, stage in DVC["stages"].items():
        items = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
        if items:
            out[name] = items
    return out


def test_the_dvc_metrics_are_the_headlines_under_100_keys_in_all():
    declared = declared_metrics()
    for stage, folder in HEADLINE_FILES.items():
        assert declared[stage] == [f"{folder}/headline.json"], stage
    keys = sum(
        len(json.loads((ROOT / f).read_text())) for files in declared.values() for f in files
    )
    assert 50 <= keys <= 100, keys


@pytest.mark.parametrize("stage", sorted(HEADLINE_FILES))
def test_each_headline_is_cut_from_its_full_record(stage):
    folder = ROOT / HEADLINE_FILES[stage]
    full = json.loads((folder / "metrics.json").read_text())
    shown = json.loads((folder / "headline.json").read_text())
    assert shown == S.headline(full, stage)
    assert 8 <= len(shown) <= 25, (stage, len(shown))
    # every pattern names at least one key: a renamed metric cannot silently leave the headline
    for pattern in S.HEADLINES[stage]:
        assert any(re.fullmatch(pattern, k) for k in shown), (stage, pattern)


def test_headline_keeps_only_the_named_keys():
    recorded = {
        "n_images": 18,
        "c0_alone_hit_rate": 0.5,
        "c0_alone_hit_rate_low": 0.1,
        "c10_all_hit_rate": 1.0,
    }
    assert S.headline(recorded, "ensemble") == {
        "n_images": 18,
        "c0_alone_hit_rate": 0.5,
        "c10_all_hit_rate": 1.0,
    }


def test_eps_sweep_curves_average_images_and_seeds_per_editor():
    per_image = pd.DataFrame(
        {
            "eps_8bit": [4.0, 4.0, 4.0, 4.0, 8.0, 8.0],
            "editor": ["control", "control", "control", "blur-fill", "control", "blur-fill"],
            "seed": [0, 1, 2, 0, 0, 0],
            "hit": [True, False, False, False, True, True],
        }
    )
    curves = S.eps_sweep_curves(per_image)
    assert list(curves.columns) == ["eps_8bit", "blur-fill", "control"]
    assert curves["control"].tolist() == pytest.approx([1 / 3, 1.0])
    assert curves["blur-fill"].tolist() == [0.0, 1.0]


def test_loss_curves_are_per_step_medians():
    losses = pd.DataFrame({"name": ["a", "b", "c"] * 2, "step": [0, 0, 0, 1, 1, 1],
                           "implant": [1.0, 3.0, 2.0, 0.5, 0.1, 0.2], "total": [2.0, 2, 2, 1, 1, 4]})  # fmt: skip
    curves = S.loss_curves(losses)
    assert curves.to_dict("list") == {"step": [0, 1], "implant": [2.0, 0.2], "total": [2.0, 1.0]}


def test_the_committed_plot_data_is_what_the_stages_tables_give():
    sweep = pd.read_csv(ROOT / "reports/plots/eps_sweep.csv")
    expected = S.eps_sweep_curves(pd.read_csv(ROOT / "reports/eps_sweep.csv"))
    pd.testing.assert_frame_equal(sweep, expected, check_exact=False, rtol=1e-12)
    worst = pd.read_csv(ROOT / "reports/plots/purification_worst_case.csv")
    expected = S.purification_worst_case(pd.read_csv(ROOT / "reports/purification/table.csv"))
    pd.testing.assert_frame_equal(worst, expected, check_exact=False, rtol=1e-12)
    assert len(worst) == 2 * worst["protection"].str.rsplit(" · ", n=1).str[0].nunique()
    losses = ROOT / "data/protected/losses.csv"
    if losses.is_file():  # a DVC output: present after `dvc pull` or `make reproduce`
        expected = S.loss_curves(pd.read_csv(losses))
        got = pd.read_csv(ROOT / "reports/plots/loss_curves.csv")
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-6)


def test_the_data_plots_render_offline_from_dvc_plots_show():
    vl_convert = pytest.importorskip("vl_convert")
    dvc = Path(sys.executable).parent / "dvc"
    names = [next(iter(p)) for p in DVC["plots"]]
    assert names == ["eps_sweep", "loss_curves", "purification_worst_case"]
    shown = subprocess.run([str(dvc), "plots", "show", "--json", *names], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    plots = json.loads(shown.stdout)["data"]
    for name in names:
        spec = plots[name][0]["content"]
        assert spec["data"]["values"], name
        svg = vl_convert.vegalite_to_svg(spec)
        assert svg.startswith("<svg") and svg.count("<path") > 5, name
