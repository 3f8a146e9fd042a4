"""Stage ``figures`` (runtime_backdoor.pipeline.figures): grids, the scenario figure, the table."""

import hashlib
import io
import json
from pathlib import Path

import pandas as pd

from runtime_backdoor.pipeline import figures

ROOT = Path(__file__).resolve().parents[2]


def test_scenario_figure_is_the_same_file_on_every_run():
    """Its intervals come from the seeded bootstrap of ``stats`` (seaborn's is unseeded)."""
    per_edit = pd.read_csv(ROOT / "reports" / "per_edit.csv")
    digests = set()
    for _ in range(2):
        buf = io.BytesIO()
        figures.scenario_plot(per_edit).savefig(buf, format="png")
        digests.add(hashlib.md5(buf.getvalue()).hexdigest())
    assert len(digests) == 1


def test_results_table_states_each_scenario_with_its_interval():
    summary = json.loads((ROOT / "reports" / "metrics.json").read_text())
    table = figures.results_table(summary, [{"sentence": "a stated comparison"}])
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| malicious") or line.startswith("| benign")
    ]
    assert len(rows) == 6
    from runtime_backdoor.stats import Estimate

    key = "malicious_mask_hit_rate_protected"
    rate = Estimate(
        summary[key], summary[f"{key}_low"], summary[f"{key}_high"], summary["n_images"]
    )
    assert f"→ {rate.format(True)} |" in table or f"→ {rate.format(True)} " in table
    assert "- a stated comparison." in table
