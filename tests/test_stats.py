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


def test_hit_rates_use_the_exact_sign_test_and_its_interval():
    from scipy import stats

    n = 18
    clear = S.compare([1] * 8 + [0] * 10, [0] * n, label_a="A", label_b="B", metric="hit rate",
                      kind=S.RATE)  # fmt: skip
    # 8 images up, none down: exact McNemar p = 2 * 0.5^8.
    assert clear.p == pytest.approx(2 * 0.5**8) and (clear.up, clear.down) == (8, 0)
    assert clear.verdict == "higher" and clear.difference.mean == pytest.approx(8 / 18)
    assert clear.sentence(pct=True).startswith(
        "hit rate is higher for A than for B (net share of images up +44 points [+12, +44]: "
        "8 up, 0 down, n = 18 images; exact sign test, p = 0.0078)"
    )
    # 3 up of 18: p = 0.25, no direction, whatever a bootstrap interval would say.
    weak = S.compare([1] * 3 + [0] * 15, [0] * n, label_a="A", label_b="B", metric="hit rate",
                     kind=S.RATE)  # fmt: skip
    assert weak.verdict == "no difference" and weak.p == pytest.approx(0.25)
    assert weak.difference.low <= 0 < weak.difference.high
    # The interval excludes 0 exactly when the sign test rejects (every split of 10 movers).
    for up in range(11):
        c = S.compare([1] * up + [0] * (10 - up) + [0] * 8, [0] * up + [1] * (10 - up) + [0] * 8,
                      label_a="a", label_b="b", metric="m", kind=S.RATE)  # fmt: skip
        excludes = c.difference.low > 0 or c.difference.high < 0
        assert excludes == (stats.binomtest(up, 10).pvalue < 0.05) == (c.verdict != "no difference")
    # Seed shares: an image counts once, up or down, by the sign of its share's change.
    shares = S.compare([2 / 3] * 7 + [0.0] * 11, [1 / 3] * 7 + [0.0] * 11, label_a="a",
                       label_b="b", metric="m", kind=S.RATE)  # fmt: skip
    assert (shares.up, shares.p) == (7, pytest.approx(2 * 0.5**7))
    assert shares.mean_difference == pytest.approx(7 / 18 / 3)
    with pytest.raises(ValueError, match="kind"):
        S.compare([1], [0], label_a="a", label_b="b", metric="m", kind="ratio")


def test_values_use_the_signed_rank_test_and_the_interval_must_agree():
    from scipy import stats

    lower = S.compare([0.5] * 4 + [0.6] * 4, [0.9] * 8, label_a="A", label_b="B", metric="SSIM")
    assert lower.verdict == "lower" and lower.difference.high < 0
    assert lower.p == pytest.approx(stats.wilcoxon([-0.4] * 4 + [-0.3] * 4).pvalue)
    # 8 images: the t interval excludes 0, but 2 of 8 differences are negative and the
    # signed-rank test keeps p above 0.05 only if they rank high; here they rank lowest:
    diff = np.array([5.0, 5.0, 5.0, 5.0, 5.0, 5.0, -0.1, -0.1])
    c = S.compare(diff, np.zeros(8), label_a="a", label_b="b", metric="m")
    low, high = stats.t.interval(0.95, 7, loc=diff.mean(), scale=stats.sem(diff))
    assert (c.difference.low, c.difference.high) == pytest.approx((low, high))
    assert c.p == pytest.approx(stats.wilcoxon(diff).pvalue)
    assert (c.verdict == "higher") == (c.p < 0.05)
    # No difference at all: p = 1.
    assert S.compare([0.3] * 9, [0.3] * 9, label_a="a", label_b="b", metric="m").p == 1.0
    with pytest.raises(ValueError, match="align"):
        S.compare([1, 2], [1], label_a="a", label_b="b", metric="m")


def test_fewer_than_min_n_images_never_state_a_direction():
    c = S.compare([0.1, 0.2], [0.100123, 0.200125], label_a="A", label_b="B", metric="MSE")
    assert S.MIN_N == 6 and c.verdict == "no difference" and c.difference.n == 2
    assert c.sentence().startswith(
        "no direction can be shown in MSE between A and B at n = 2 images (fewer than 6; "
        "difference -0.000124 ["
    )
    five = S.compare([1] * 5, [0] * 5, label_a="a", label_b="b", metric="m", kind=S.RATE)
    assert five.verdict == "no difference" and "fewer than 6" in five.sentence()
    six = S.compare([1] * 6, [0] * 6, label_a="a", label_b="b", metric="m", kind=S.RATE)
    assert six.verdict == "higher" and six.p == pytest.approx(2 ** (1 - 6))


def test_holm_within_a_family_decides_the_verdicts():
    from statsmodels.stats.multitest import multipletests

    strong = S.compare([1] * 8 + [0] * 10, [0] * 18, label_a="a", label_b="b", metric="m",
                       kind=S.RATE)  # p = 0.0078  # fmt: skip
    modest = S.compare([1] * 6 + [0] * 12, [0] * 18, label_a="a", label_b="b", metric="m",
                       kind=S.RATE)  # p = 0.031  # fmt: skip
    found = S.Findings()
    found.add("alone", "f1", modest)
    for i in range(3):
        found.add(f"s{i}", "f2", strong)
    found.add("m", "f2", modest)
    found.add("m1", "f3", modest)
    found.add("m2", "f3", modest)
    out = {c["id"]: c for c in found.decide()}
    assert out["alone"]["verdict"] == "higher" and out["alone"]["m"] == 1  # family of one
    expected = multipletests([strong.p] * 3 + [modest.p], method="holm")[1]
    assert [out[k]["p_adjusted"] for k in ("s0", "s1", "s2", "m")] == pytest.approx(
        expected, rel=1e-3
    )
    assert out["m"]["verdict"] == out["s0"]["verdict"] == "higher"  # 4 x 0.0078 < 0.05
    # Two modest comparisons in one family: 2 x 0.031 > 0.05, neither states a direction.
    assert out["m1"]["verdict"] == out["m2"]["verdict"] == "no difference"
    assert out["m1"]["p_adjusted"] == pytest.approx(2 * modest.p, rel=1e-3)
    assert out["m"]["family"] == "f2" and out["m"]["m"] == 4 and out["m"]["test"] == S.SIGN_TEST
    assert "Holm-adjusted p = 0.031 in a family of 4" in out["s0"]["sentence"]


def test_power_of_the_exact_test():
    # At alpha = 0.05 alone: 6 images all one way (p = 1/32); after Holm in a family of 40 the
    # first p faces 0.05 / 40, so 11 images (2^-10 < 1/800 < 2^-9).
    assert S.detectable_net_share(18) == pytest.approx(6 / 18)
    assert S.detectable_net_share(18, 40) == pytest.approx(11 / 18)
    assert S.detectable_net_share(5) == float("inf")


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
    assert c.sentence().startswith("MSE is lower for A than for B (difference -0.000123 [-0.0001")
    assert "], n = 18 images; Wilcoxon signed-rank test, p = " in c.sentence()
    pct = S.compare([0.01] * 9 + [0.0] * 9, [0.0] * 18, label_a="A", label_b="B", metric="m")
    assert pct.sentence(pct=True).startswith(
        "m is higher for A than for B (difference +0.50 points [+0.28, +0.72], n = 18 images; "
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
    from runtime_backdoor import docs_text

    found = {
        "reports/x.json": [
            {"id": "a", "verdict": "higher", "sentence": "hit rate is higher for A than for B"},
            {"id": "b", "verdict": "no difference", "sentence": "no detectable difference"},
        ]
    }
    block = docs_text.conclusions_block(found)
    assert "- hit rate is higher for A than for B (`reports/x.json`: `a`)." in block
    assert "1 further comparisons show no detectable difference" in block
    assert "too few" not in block
    few = {"reports/x.json": [*found["reports/x.json"], {"id": "c", "verdict": "no difference",
                                                           "n": 2, "sentence": "no direction"}]}  # fmt: skip
    assert "1 more had fewer than 6 images, too few to show a direction at all." in (
        docs_text.conclusions_block(few)
    )
    page = tmp_path / "results.md"
    begin, end = docs_text.markers("conclusions")
    page.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
    new = docs_text.replace_block(page.read_text(), "conclusions", block)
    assert new == f"intro\n{block}\noutro\n"
    assert docs_text.replace_block(new, "conclusions", block) == new
    with pytest.raises(ValueError, match="headline"):
        docs_text.replace_block(new, "headline", "x")


def test_headline_states_rates_with_intervals_and_counts():
    from runtime_backdoor import docs_text

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
    block = docs_text.headline_block(metrics, sweep, found, 0.025)
    assert "clean 0% [0, 18] → protected 50% [30, 70] over 18 images" in block
    assert "3 δ₀ seeds: 39% [20, 57]" in block
    assert "PSNR 32.8 [32.7, 32.8] dB" in block and "at most 6/255" in block
    assert (
        "**1 directional conclusions** that hold on every stability run (exact tests, Holm within "
        "each family), 1 comparisons with no detectable difference" in block
    )
    # With a stability report, a conclusion broken by a run is fragile, not counted as stated.
    stability = {"seconds": {"blas": 1.0}, "conclusions": [
        {"file": "a.json", "id": "x", "committed": "lower", "blas": "no difference"}]}  # fmt: skip
    fragile = docs_text.headline_block(metrics, sweep, found, 0.025, stability=stability)
    assert "**0 directional conclusions**" in fragile and "1 fragile (not stated)" in fragile
    listed = docs_text.conclusions_block(found, stability=stability)
    assert "- `x` (`a.json`): lower here, broken by `blas`." in listed and "- s (" not in listed
    assert block.startswith(docs_text.HEADLINE_BEGIN) and block.endswith(docs_text.HEADLINE_END)


def test_docs_state_exactly_the_committed_reports():
    """The README's headline and docs/results.md's generated blocks are generated
    (`python -m runtime_backdoor.reporting`), not typed.

    Against the reports as committed in git, not as a local pipeline run rewrote them
    (another CPU changes their last digits); tests/test_reporting.py checks both ways.
    """
    from runtime_backdoor import docs_text

    root = Path(__file__).resolve().parents[1]
    assert docs_text.docs_match_committed(root) == []


def test_families_block_counts_sizes_power_and_chance():
    from runtime_backdoor import docs_text

    def entry(cid, family, verdict, test=S.SIGN_TEST):
        return {"id": cid, "family": family, "verdict": verdict, "n": 18, "test": test}

    found = {"a.json": [entry("x", "f/one", "higher"), entry("y", "f/one", "no difference"),
                        entry("z", "f/two", "lower", S.SIGNED_RANK)]}  # fmt: skip
    block = docs_text.families_block(found)
    # f/one: 2 comparisons, Holm's first threshold 0.025 -> 7 images of 18 (2^-6 < 0.025)
    assert "| `f/one` | `a.json` | 2 | exact sign test | 18 | 1 | 1 | 39% |" in block
    assert "| `f/two` | `a.json` | 1 | Wilcoxon signed-rank test | 18 | 1 | 1 | – |" in block
    assert "3 comparisons in 2 families" in block and "about 0.2 directions" in block
    # a stability run that broke x: directional but not stated
    stability = {"seconds": {"seed": 1.0}, "conclusions": [
        {"file": "a.json", "id": "x", "committed": "higher", "seed": "no difference"},
        {"file": "a.json", "id": "z", "committed": "lower", "seed": "lower"}]}  # fmt: skip
    assert "| `f/one` | `a.json` | 2 | exact sign test | 18 | 1 | 0 | 39% |" in (
        docs_text.families_block(found, stability)
    )
