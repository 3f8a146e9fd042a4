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


def test_fewer_than_min_n_images_never_state_a_direction():
    # Two images, both a little lower: the percentile bootstrap's interval is their range,
    # which excludes 0; that is no evidence of a direction.
    c = S.compare([0.1, 0.2], [0.100123, 0.200125], label_a="A", label_b="B", metric="MSE")
    assert S.MIN_N == 6 and c.verdict == "no difference" and c.difference.n == 2
    assert c.sentence().startswith(
        "no direction can be shown in MSE between A and B at n = 2 images (fewer than 6; "
        "difference -0.000124 ["
    )
    # Five images all far lower: still none; from six on, the same pattern is "lower".
    five = S.compare([0.1, 0.2, 0.3, 0.4, 0.5], [1.1, 1.3, 1.2, 1.6, 1.5], label_a="A",
                     label_b="B", metric="m")  # fmt: skip
    assert five.verdict == "no difference" and "fewer than 6" in five.sentence()
    six = S.compare([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1.1, 1.3, 1.2, 1.6, 1.5, 1.6],
                    label_a="A", label_b="B", metric="m")  # fmt: skip
    assert six.verdict == "lower" and "fewer than" not in six.sentence()


def test_small_n_uses_the_t_interval_and_needs_the_sign_test_too():
    from scipy import stats

    # 8 images: the t interval excludes 0, but only 6 of 8 differences are positive
    # (sign test p = 0.29): no direction. The percentile bootstrap would have stated one.
    diff = np.array([5.0, 5.0, 5.0, 5.0, 5.0, 5.0, -0.1, -0.1])
    c = S.compare(diff, np.zeros(8), label_a="a", label_b="b", metric="m")
    low, high = stats.t.interval(0.95, 7, loc=diff.mean(), scale=stats.sem(diff))
    assert (c.difference.low, c.difference.high) == pytest.approx((low, high))
    assert low > 0 and c.verdict == "no difference"
    # All 8 positive: the t interval and the sign test agree.
    assert S.compare(np.abs(diff), np.zeros(8), label_a="a", label_b="b", metric="m").verdict == (
        "higher"
    )
    # Estimates below SMALL_N: Student t for values, Wilson for 0/1 values.
    v = [0.2, 0.4, 0.5, 0.9]
    e = S.estimate(v)
    assert (e.low, e.high) == pytest.approx(
        stats.t.interval(0.95, 3, loc=np.mean(v), scale=stats.sem(v))
    )
    w = S.estimate([1, 0, 0, 0])
    ci = stats.binomtest(1, 4).proportion_ci(0.95, method="wilson")
    assert (w.low, w.high) == pytest.approx((ci.low, ci.high))
    # From SMALL_N on, the seeded percentile bootstrap: its bounds are values' means.
    b = S.estimate([0.0, 1.0, 0.5] * 4)
    assert S.SMALL_N <= 12 and b.low >= 0 and b.high <= 1


def test_numbers_keep_significant_digits():
    assert S.format_numbers([-0.000123, -0.000201, -0.000045]) == [
        "-0.000123", "-0.000201", "-0.000045",
    ]  # fmt: skip
    assert S.format_numbers([0.912, 0.897, 0.925]) == ["0.912", "0.897", "0.925"]
    assert S.format_numbers([0.0279, 0.0366, 0.0201], sign=True) == [
        "+0.0279", "+0.0366", "+0.0201",
    ]  # fmt: skip
    assert S.format_numbers([3e-7, 1e-7, 5e-7]) == ["3.00e-07", "1.00e-07", "5.00e-07"]
    assert S.format_numbers([0.0, 0.0, 0.0]) == ["0.000", "0.000", "0.000"]
    assert S.Estimate(0.000123, 0.000045, 0.000201, 18).format() == "0.000123 [0.000045, 0.000201]"
    assert S.Estimate(31.42, 30.91, 31.93, 18).format(digits=1) == "31.4 [30.9, 31.9]"
    assert S.Estimate(0.17, 0.04, 0.41, 18).format(pct=True) == "17% [4, 41]"
    assert S.Estimate(1 / 54, 0.0, 0.0556, 18).format(pct=True) == "1.9% [0.0, 5.6]"
    # A tiny but clear difference over 18 images: significant digits, not "-0.000".
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1e-5, size=18)
    b = rng.uniform(0.2, 0.3, size=18)
    c = S.compare(b - 0.000123 + noise - noise.mean(), b, label_a="A", label_b="B", metric="MSE")
    assert c.verdict == "lower"
    assert c.sentence().startswith("MSE is lower for A than for B (-0.000123 [-0.0001")
    assert c.sentence().endswith("], n = 18 images)")
    pct = S.compare([0.01] * 9 + [0.0] * 9, [0.0] * 18, label_a="A", label_b="B", metric="m")
    assert (
        pct.sentence(pct=True)
        == "m is higher for A than for B (+0.50 points [+0.28, +0.72], n = 18 images)"
    )


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
    # The interval is over the two per-image means, not the six rows.
    e = S.estimate([1.0, 1 / 3])
    assert (t.loc[0, "hit_low"], t.loc[0, "hit_high"]) == pytest.approx((e.low, e.high))
    a, b = S.paired_frames(
        pd.DataFrame({"t": ["x", "x", "y"], "name": ["p", "q", "q"], "v": [1.0, 2.0, 5.0]}),
        "v", "t", "x", "y",
    )  # fmt: skip
    assert a.tolist() == [2.0] and b.tolist() == [5.0]


def test_conclusions_block_lists_directional_conclusions_and_counts_the_rest(tmp_path):
    from runtime_backdoor import reporting

    found = {
        "reports/x.json": [
            {"id": "a", "verdict": "higher", "sentence": "hit rate is higher for A than for B"},
            {"id": "b", "verdict": "no difference", "sentence": "no detectable difference"},
        ]
    }
    block = reporting.conclusions_block(found)
    assert "- hit rate is higher for A than for B (`reports/x.json`: `a`)." in block
    assert "1 further comparisons show no detectable difference" in block
    assert "too few" not in block
    few = {"reports/x.json": [*found["reports/x.json"], {"id": "c", "verdict": "no difference",
                                                           "n": 2, "sentence": "no direction"}]}  # fmt: skip
    assert "1 more had fewer than 6 images, too few to show a direction at all." in (
        reporting.conclusions_block(few)
    )
    page = tmp_path / "results.md"
    begin, end = reporting.markers("conclusions")
    page.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
    new = reporting.replace_block(page.read_text(), "conclusions", block)
    assert new == f"intro\n{block}\noutro\n"
    assert reporting.replace_block(new, "conclusions", block) == new
    with pytest.raises(ValueError, match="headline"):
        reporting.replace_block(new, "headline", "x")


def test_headline_states_rates_with_intervals_and_counts():
    from runtime_backdoor import reporting

    metrics = {"n_images": 18, "protection_linf_8bit_max": 6.000007}
    for key, (m, lo, hi) in {
        "malicious_mask_hit_rate_clean": (0.0, 0.0, 0.176),
        "malicious_mask_hit_rate_protected": (0.5, 0.3, 0.7),
        "protection_psnr": (32.78, 32.73, 32.84),
    }.items():  # fmt: skip
        metrics |= {key: m, f"{key}_low": lo, f"{key}_high": hi}
    sweep = {"n_images": 18, "control_seeds": 3, "control_hit_rate_at_paper_eps": 0.389,
             "control_hit_rate_at_paper_eps_low": 0.204, "control_hit_rate_at_paper_eps_high": 0.574}  # fmt: skip
    found = {"a.json": [{"id": "x", "verdict": "lower", "n": 18, "sentence": "s"},
                        {"id": "y", "verdict": "no difference", "n": 18, "sentence": "t"}]}  # fmt: skip
    block = reporting.headline_block(metrics, sweep, found, 0.025)
    assert "clean 0% [0, 18] → protected 50% [30, 70] over 18 images" in block
    assert "3 δ₀ seeds: 39% [20, 57]" in block
    assert "PSNR 32.8 [32.7, 32.8] dB" in block and "at most 6/255" in block
    assert "**1 directional conclusions** and 1 comparisons with no detectable difference" in block
    assert block.startswith(reporting.HEADLINE_BEGIN) and block.endswith(reporting.HEADLINE_END)


def test_docs_state_exactly_the_committed_reports():
    """The README's headline and docs/results.md's generated blocks are generated
    (`python -m runtime_backdoor.reporting`), not typed.

    Against the reports as committed in git, not as a local pipeline run rewrote them
    (another CPU changes their last digits); tests/test_reporting.py checks both ways.
    """
    from runtime_backdoor import reporting

    root = Path(__file__).resolve().parents[1]
    assert reporting.docs_match_committed(root) == []
