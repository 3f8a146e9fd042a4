from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from runtime_backdoor import stats as S


def test_zero_rate_gets_the_wilson_interval_not_a_point():
    e = S.estimate([0] * 18)
    assert (e.mean, e.low, e.n) == (0.0, 0.0, 18)
    # Wilson upper bound for 0 of n: z² / (n + z²) with z = 1.96.
    assert e.high == pytest.approx(1.959964**2 / (18 + 1.959964**2), rel=1e-5)
    assert S.estimate([1] * 6).low == pytest.approx(1 - 1.959964**2 / (6 + 1.959964**2), rel=1e-5)


def test_bootstrap_interval_of_a_mean_matches_normal_theory():
    v = np.random.default_rng(0).normal(0.9, 0.05, size=200)
    e = S.estimate(v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))
    assert e.mean == pytest.approx(v.mean())
    assert e.low == pytest.approx(v.mean() - half, abs=0.2 * half)
    assert e.high == pytest.approx(v.mean() + half, abs=0.2 * half)
    assert S.estimate(v) == e  # seeded: the same interval every time


def test_constant_non_binary_values_and_empty_input():
    assert S.estimate([0.5, 0.5]) == S.Estimate(0.5, 0.5, 0.5, 2)
    assert S.estimate([np.nan]).n == 0 and S.estimate([]).format() == "–"
    assert S.estimate([0, 1, 1, 0]).format(pct=True).startswith("50% [")


def test_comparisons_state_a_direction_only_when_the_interval_excludes_zero():
    n = 18
    clear = S.compare([1] * 8 + [0] * 10, [0] * n, label_a="A", label_b="B", metric="hit rate")
    assert clear.verdict == "higher" and clear.difference.low > 0
    assert clear.sentence(pct=True).startswith("hit rate is higher for A than for B (+44 points")
    weak = S.compare([1] * 3 + [0] * 15, [0] * n, label_a="A", label_b="B", metric="hit rate")
    assert weak.verdict == "no difference" and weak.difference.low <= 0
    assert weak.sentence(pct=True).startswith(
        "no detectable difference in hit rate between A and B at n = 18"
    )
    lower = S.compare([0.5] * 4 + [0.6] * 4, [0.9] * 8, label_a="A", label_b="B", metric="SSIM")
    assert lower.verdict == "lower" and lower.difference.high < 0


def test_identical_differences_use_a_sign_test():
    # Every image differs by the same amount: significant from 6 images on (p = 2^(1-n)).
    assert (
        S.compare([1] * 5, [0] * 5, label_a="a", label_b="b", metric="m").verdict == "no difference"
    )
    assert S.compare([1] * 6, [0] * 6, label_a="a", label_b="b", metric="m").verdict == "higher"
    assert (
        S.compare([0] * 9, [0] * 9, label_a="a", label_b="b", metric="m").verdict == "no difference"
    )
    with pytest.raises(ValueError, match="align"):
        S.compare([1, 2], [1], label_a="a", label_b="b", metric="m")


def test_group_estimates_average_seeds_within_an_image_first():
    df = pd.DataFrame(
        {
            "method": ["m"] * 6,
            "name": ["a", "a", "a", "b", "b", "b"],
            "seed": [0, 1, 2, 0, 1, 2],
            "hit": [1.0, 1.0, 1.0, 0.0, 0.0, 1.0],
        }
    )
    t = S.group_estimates(df, ["method"], ["hit"])
    assert t.loc[0, "n_images"] == 2
    assert t.loc[0, "hit"] == pytest.approx((1 + 1 / 3) / 2)
    assert t.loc[0, "hit_low"] == pytest.approx(1 / 3) and t.loc[0, "hit_high"] == pytest.approx(1)
    a, b = S.paired_frames(
        pd.DataFrame({"t": ["x", "x", "y"], "name": ["p", "q", "q"], "v": [1.0, 2.0, 5.0]}),
        "v", "t", "x", "y",
    )  # fmt: skip
    assert a.tolist() == [2.0] and b.tolist() == [5.0]


def test_readme_block_lists_directional_conclusions_and_counts_the_rest(tmp_path):
    from runtime_backdoor import reporting

    found = {
        "reports/x.json": [
            {"id": "a", "verdict": "higher", "sentence": "hit rate is higher for A than for B"},
            {"id": "b", "verdict": "no difference", "sentence": "no detectable difference"},
        ]
    }
    block = reporting.readme_block(found)
    assert "- hit rate is higher for A than for B (`reports/x.json`: `a`)." in block
    assert "1 further comparisons show no detectable difference" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reporting.README_BEGIN}\nold\n{reporting.README_END}\noutro\n")
    assert reporting.update_readme(readme, found)
    assert readme.read_text() == f"intro\n{block}\noutro\n"
    assert not reporting.update_readme(readme, found)


def test_readme_states_exactly_the_committed_conclusions():
    """README's conclusions are generated (`python -m runtime_backdoor.reporting`), not typed."""
    import json
    from pathlib import Path

    from runtime_backdoor import reporting

    root = Path(__file__).resolve().parents[1]
    files = ("reports/conclusions.json", "reports/beyond/conclusions.json")
    found = {f: json.loads((root / f).read_text()) for f in files}
    assert reporting.readme_block(found) in (root / "README.md").read_text()


def test_scenario_figure_is_the_same_file_on_every_run():
    """Its intervals come from the seeded bootstrap of ``stats`` (seaborn's is unseeded)."""
    import hashlib
    import io

    import matplotlib

    matplotlib.use("Agg")
    from runtime_backdoor import figures

    per_edit = pd.read_csv(Path(__file__).resolve().parents[1] / "reports" / "per_edit.csv")
    digests = set()
    for _ in range(2):
        buf = io.BytesIO()
        figures.scenario_plot(per_edit).savefig(buf, format="png")
        digests.add(hashlib.md5(buf.getvalue()).hexdigest())
    assert len(digests) == 1
