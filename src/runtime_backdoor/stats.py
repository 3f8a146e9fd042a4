"""Uncertainty of the study's numbers, and the conclusions they allow.

Every rate and mean the reports give is over images (the unit that is sampled); where
several δ₀ seeds were run, each image's values are first averaged over its seeds, so the
interval covers both sources of variation without counting an image twice. Intervals are
95 % percentile-bootstrap intervals over images (``scipy.stats.bootstrap``), with one
exception: a rate that is 0 or 1 on every image would collapse to a point under the
bootstrap, so it gets the Wilson score interval of ``k`` of ``n`` images instead
(``scipy.stats.binomtest``), which says how large a rate ``n`` images cannot exclude.

A comparison of two conditions on the same images is a *paired* one (:func:`compare`):

* **hit outcomes** (:data:`RATE`: 0/1 per image, or the share of its δ₀ seeds that hit) are
  tested with the exact two-sided sign test over the images whose outcome differs (the exact
  McNemar test when each image has one seed); the difference reported is the net share of
  images up, with the exact interval that agrees with the test (:func:`_net_share`). With
  n = 18 and mostly-zero differences, a bootstrap interval of the mean difference excludes 0
  far too easily, which is why it does not decide here;
* **continuous values** (:data:`VALUE`: PSNR, SSIM, MSE) keep the interval of the mean
  difference (percentile bootstrap, Student t below :data:`SMALL_N` images) and are tested with
  Wilcoxon's signed-rank test; a direction needs both;
* below :data:`MIN_N` images no direction is stated at all: 6 is the fewest images at which an
  exact two-sided sign test can reach p < 0.05 (p = 2^(1-n) when every image agrees).

**Multiplicity.** Each comparison belongs to a family, one per question; :class:`Findings`
adjusts the p values within each family with Holm's step-down method (statsmodels), which
keeps the chance of any false direction in the family below 5 % under any dependence between
the comparisons, and decides the verdicts from the adjusted p. :func:`detectable_net_share`
says how large a net share of images the exact test can show at a family's size.

Numbers are written with significant digits (:func:`format_numbers`): a mean and its
bounds share their decimals, as many as the default (3, or whole percentage points) or
more, so that the largest of the three shows 3 significant figures (2 for percentage
points), e.g. ``-0.000123 [-0.000201, -0.000045]`` rather than ``-0.000 [-0.000, -0.000]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 4999
SEED = 0
#: Fewest paired images for which :func:`compare` may state a direction (module docstring).
MIN_N = 6
#: Below this many images, Student t / Wilson intervals replace the percentile bootstrap.
SMALL_N = 10
#: Significant figures of written numbers: plain values, and percentage points.
SIGNIFICANT, SIGNIFICANT_PCT = 3, 2


def format_numbers(
    values, *, decimals: int = 3, significant: int = SIGNIFICANT, sign: bool = False
) -> list[str]:
    """``values`` (say a mean and its bounds) written with shared decimals: at least
    ``decimals``, more where the largest magnitude would otherwise show fewer than
    ``significant`` significant figures. Below 1e-4 in magnitude, scientific notation.

    >>> format_numbers([-0.000123, -0.000201, -0.000045])
    ['-0.000123', '-0.000201', '-0.000045']
    >>> format_numbers([0.912, 0.897, 0.925])
    ['0.912', '0.897', '0.925']
    """
    vals = [float(v) for v in values]
    finite = [abs(v) for v in vals if math.isfinite(v)]
    largest = max(finite, default=0.0)
    plus = "+" if sign else ""
    if 0 < largest < 1e-4:
        return [f"{v:{plus}.{significant - 1}e}" for v in vals]
    if largest > 0:
        decimals = max(decimals, significant - 1 - math.floor(math.log10(largest)))
    return [f"{v:{plus}.{decimals}f}" for v in vals]


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` images and its 95 % interval."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, pct: bool = False, digits: int = 3) -> str:
        """``"17% [4, 41]"`` or ``"0.912 [0.897, 0.925]"``; ``"–"`` when empty.

        At least ``digits`` decimals (whole points for ``pct``), more where the largest of
        the three would show fewer significant figures than :data:`SIGNIFICANT`
        (:data:`SIGNIFICANT_PCT`): ``"0.000123 [0.000045, 0.000201]"``, not ``"0.000 [...]"``.
        """
        if self.n == 0 or not np.isfinite(self.mean):
            return "–"
        if pct:
            m, lo, hi = format_numbers(
                [self.mean * 100, self.low * 100, self.high * 100],
                decimals=0, significant=SIGNIFICANT_PCT,
            )  # fmt: skip
            return f"{m}% [{lo}, {hi}]"
        m, lo, hi = format_numbers([self.mean, self.low, self.high], decimals=digits)
        return f"{m} [{lo}, {hi}]"


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0) | (values == 1)))


def _t_interval(v: np.ndarray) -> tuple[float, float]:
    """Student t interval of the mean of ``v`` (at least 2 values, not all equal)."""
    scale = float(v.std(ddof=1)) / math.sqrt(len(v))
    low, high = stats.t.interval(CONFIDENCE, len(v) - 1, loc=float(v.mean()), scale=scale)
    return float(low), float(high)


def estimate(values, *, seed: int = SEED) -> Estimate:
    """Mean of ``values`` (one per image; NaNs dropped) with its 95 % interval.

    Percentile bootstrap from :data:`SMALL_N` values on; below, the Wilson score interval
    for 0/1 values and the Student t interval otherwise. A constant 0/1 rate gets the
    Wilson interval at any ``n``; other constant values, a point.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if np.all(v == v[0]):
        if _is_binary(v):
            ci = stats.binomtest(int(v.sum()), n).proportion_ci(CONFIDENCE, method="wilson")
            return Estimate(mean, float(ci.low), float(ci.high), n)
        return Estimate(mean, mean, mean, n)
    if n < SMALL_N:
        if _is_binary(v):
            ci = stats.binomtest(int(v.sum()), n).proportion_ci(CONFIDENCE, method="wilson")
            return Estimate(mean, float(ci.low), float(ci.high), n)
        return Estimate(mean, *_t_interval(v), n)
    res = stats.bootstrap(
        (v,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
        method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    ci = res.confidence_interval
    return Estimate(mean, float(ci.low), float(ci.high), n)


def per_image(df: pd.DataFrame, column: str, by: list[str], unit: str = "name") -> pd.DataFrame:
    """``column`` averaged within each image (over seeds, and rows a table pools)."""
    return df.groupby([*by, unit], sort=False)[column].mean().reset_index()


def group_estimates(
    df: pd.DataFrame, by: list[str], columns: list[str], unit: str = "name"
) -> pd.DataFrame:
    """One row per group of ``by``: each column's mean, ``_low`` and ``_high`` over images.

    Values are first averaged within each image (``unit``); ``n_images`` counts images.
    """
    rows = []
    for key, g in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        row["n_images"] = int(g[unit].nunique())
        for col in columns:
            e = estimate(g.groupby(unit, sort=False)[col].mean().to_numpy(dtype=float))
            row[col], row[f"{col}_low"], row[f"{col}_high"] = e.mean, e.low, e.high
        rows.append(row)
    return pd.DataFrame(rows)


def seed_spread(df: pd.DataFrame, by: list[str], column: str, key, *, min_seeds: int = 0) -> dict:
    """How much one δ₀ seed moves a rate: per group of ``by``, the mean of ``column`` over the
    rows of each ``seed`` (under ``key(group, seed)``) and the range of those means over seeds
    (under ``key(group, None)``); ``group`` is the tuple of the ``by`` values. Groups with
    fewer than ``min_seeds`` seeds are left out."""
    out: dict = {}
    for group, g in df.groupby(by, sort=False):
        rates = g.groupby("seed")[column].mean().astype(float)
        if len(rates) < min_seeds:
            continue
        for s, rate in rates.items():
            out[key(group, s)] = float(rate)
        out[key(group, None)] = float(rates.max() - rates.min())
    return out


#: Kinds of per-image outcome a comparison is made on (:func:`compare`).
RATE, VALUE = "rate", "value"
#: The tests, as the conclusions name them.
SIGN_TEST = "exact sign test"
SIGNED_RANK = "Wilcoxon signed-rank test"
#: Multiplicity control within a family of comparisons (:func:`decide`).
ADJUSTMENT = "holm"


@dataclass(frozen=True)
class Comparison:
    """Condition ``a`` against ``b`` on the same images.

    ``kind`` :data:`RATE`: per-image hit outcomes (0/1, or the share of δ₀ seeds that hit);
    ``difference`` is the *net share of images* whose outcome is higher under ``a`` (images up
    minus images down, over ``n``) with the exact interval that agrees with the exact sign test
    (with one seed per image it is the paired difference of hit rates). ``kind``
    :data:`VALUE`: continuous per-image values (PSNR, SSIM, MSE); ``difference`` is the mean
    paired difference with its 95 % interval, the test Wilcoxon's signed-rank test.

    ``p`` is the test's two-sided p value, ``p_adjusted`` the same after Holm's adjustment
    within ``family`` (:func:`decide`; equal to ``p`` until then), ``m`` the family's size.
    ``verdict`` states a direction only where ``p_adjusted`` < 1 - CONFIDENCE (and, for values,
    the interval excludes 0 on the same side), from :data:`MIN_N` images on.
    """

    a: str
    b: str
    metric: str
    difference: Estimate
    verdict: str  #: "higher", "lower" or "no difference"
    kind: str = VALUE
    test: str = SIGNED_RANK
    p: float = 1.0
    p_adjusted: float = 1.0
    family: str = ""
    m: int = 1
    up: int = 0  #: images whose value is higher under ``a``
    down: int = 0  #: images whose value is lower under ``a``
    mean_difference: float = float("nan")

    def adjusted(self, p_adjusted: float, family: str, m: int) -> Comparison:
        """The same comparison decided at ``p_adjusted`` in ``family`` of ``m`` comparisons."""
        verdict = _verdict(self.kind, self.difference, p_adjusted)
        return replace(self, p_adjusted=float(p_adjusted), family=family, m=int(m), verdict=verdict)

    def _tested(self) -> str:
        p = format_p(self.p)
        if self.m > 1:
            return f"{self.test}, p = {p}, Holm-adjusted p = {format_p(self.p_adjusted)} in a family of {self.m}"
        return f"{self.test}, p = {p}"

    def sentence(self, pct: bool = False) -> str:
        """The comparison in words; numbers with significant digits (:func:`format_numbers`)."""
        d = self.difference
        if pct:
            m, lo, hi = format_numbers(
                [d.mean * 100, d.low * 100, d.high * 100],
                decimals=0, significant=SIGNIFICANT_PCT, sign=True,
            )  # fmt: skip
            diff = f"{m} points [{lo}, {hi}]"
        else:
            m, lo, hi = format_numbers([d.mean, d.low, d.high], sign=True)
            diff = f"{m} [{lo}, {hi}]"
        diff = f"difference {diff}"
        if self.kind == RATE:
            diff = f"net share of images up {diff[11:]}: {self.up} up, {self.down} down"
        if 0 < d.n < MIN_N:
            return (
                f"no direction can be shown in {self.metric} between {self.a} and {self.b} "
                f"at n = {d.n} images (fewer than {MIN_N}; {diff})"
            )
        if self.verdict == "no difference":
            return (
                f"no detectable difference in {self.metric} between {self.a} and {self.b} "
                f"at n = {d.n} images ({diff}; {self._tested()})"
            )
        return (
            f"{self.metric} is {self.verdict} for {self.a} than for {self.b} "
            f"({diff}, n = {d.n} images; {self._tested()})"
        )

    def record(self, cid: str, pct: bool = False, **extra) -> dict:
        """The comparison as a ``conclusions.json`` entry."""
        return {
            "id": cid, "family": self.family, "m": self.m, "verdict": self.verdict,
            "n": self.difference.n, "test": self.test, "p": _rounded(self.p),
            "p_adjusted": _rounded(self.p_adjusted), "up": self.up, "down": self.down,
            "sentence": self.sentence(pct=pct), **extra,
        }  # fmt: skip


def format_p(p: float) -> str:
    """A p value with 2 significant figures (``0.031``, ``7.6e-06``, ``1``)."""
    if p >= 0.9995:
        return "1"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _rounded(p: float) -> float:
    """A p value as stored: 4 significant figures (last-bit float noise kept out of the JSON)."""
    return float(f"{p:.4g}")


def _sign_test_p(up: int, down: int) -> float:
    """Exact two-sided sign test of ``up`` against ``down`` images (exact McNemar on the
    discordant pairs when each image has one 0/1 outcome per condition)."""
    return float(stats.binomtest(up, up + down).pvalue) if up + down else 1.0


def _net_share(up: int, down: int, n: int) -> Estimate:
    """Net share of images up, ``(up - down) / n``, with the exact interval that agrees with
    :func:`_sign_test_p`: given the ``d = up + down`` images that moved, ``up`` is binomial in
    ``d`` with probability π, and the net share is ``d/n · (2π - 1)``; the Clopper–Pearson
    interval of π maps to an interval that excludes 0 exactly when the two-sided sign test
    rejects at 1 - CONFIDENCE (the null π = 1/2 is symmetric)."""
    d = up + down
    if d == 0:
        return Estimate(0.0, 0.0, 0.0, n)
    ci = stats.binomtest(up, d).proportion_ci(CONFIDENCE, method="exact")
    scale = d / n
    return Estimate((up - down) / n, scale * (2 * ci.low - 1), scale * (2 * ci.high - 1), n)


def _signed_rank_p(diff: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p over the non-zero differences (1 when none)."""
    nonzero = diff[diff != 0]
    if not len(nonzero):
        return 1.0
    return float(stats.wilcoxon(nonzero, alternative="two-sided").pvalue)


def _verdict(kind: str, d: Estimate, p: float) -> str:
    if d.n < MIN_N or not p < 1 - CONFIDENCE:
        return "no difference"
    if kind == VALUE and not (d.low > 0 or d.high < 0):
        return "no difference"  # the test and the interval must agree
    if d.mean == 0:
        return "no difference"
    return "higher" if d.mean > 0 else "lower"


def compare(
    a, b, *, label_a: str, label_b: str, metric: str, kind: str = VALUE, seed: int = SEED
) -> Comparison:
    """Paired comparison of per-image values ``a`` and ``b`` (same images, same order).

    ``kind`` :data:`RATE` (hit outcomes, 0/1 or shares of seeds): the exact sign test over the
    images whose outcome differs, and the net share of images up with its agreeing exact
    interval. ``kind`` :data:`VALUE`: Wilcoxon's signed-rank test, and the interval of the mean
    difference (percentile bootstrap from :data:`SMALL_N` images on, Student t below). Below
    :data:`MIN_N` images, never a direction. The verdict here is the comparison's alone;
    :func:`decide` re-decides it within its family.
    """
    if kind not in (RATE, VALUE):
        raise ValueError(f"kind: {RATE!r} or {VALUE!r}, got {kind!r}")
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must align: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    n = len(diff)
    up, down = int((diff > 0).sum()), int((diff < 0).sum())
    mean_diff = float(diff.mean()) if n else float("nan")
    if kind == RATE:
        d, p, test = _net_share(up, down, n), _sign_test_p(up, down), SIGN_TEST
    else:
        test = SIGNED_RANK
        if n == 0:
            d = estimate(diff)
        elif np.all(diff == diff[0]):
            d = Estimate(float(diff[0]), float(diff[0]), float(diff[0]), n)
        elif n < SMALL_N:
            d = Estimate(mean_diff, *_t_interval(diff), n)
        else:
            d = estimate(diff, seed=seed)
        p = _signed_rank_p(diff)
    return Comparison(
        label_a, label_b, metric, d, _verdict(kind, d, p), kind=kind, test=test, p=p,
        p_adjusted=p, up=up, down=down, mean_difference=mean_diff,
    )  # fmt: skip


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of ``pvalues`` (statsmodels' ``multipletests``)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    if not len(p):
        return p
    return multipletests(p, alpha=1 - CONFIDENCE, method=ADJUSTMENT)[1]


class Findings:
    """A stage's comparisons, each filed under a family (one question), decided together.

    ``add`` files a :class:`Comparison`; :meth:`decide` adjusts the p values within each family
    (Holm: the chance of any false direction in the family stays below 1 - CONFIDENCE) and
    returns the ``conclusions.json`` entries in the order added.
    """

    def __init__(self) -> None:
        self._items: list[tuple[str, str, Comparison, bool, dict]] = []

    def add(self, cid: str, family: str, comparison: Comparison, pct: bool = False, **extra):
        self._items.append((cid, family, comparison, pct, extra))

    def __len__(self) -> int:
        return len(self._items)

    def decide(self) -> list[dict]:
        by_family: dict[str, list[int]] = {}
        for i, (_, family, *_rest) in enumerate(self._items):
            by_family.setdefault(family, []).append(i)
        decided: dict[int, Comparison] = {}
        for family, idx in by_family.items():
            adjusted = holm([self._items[i][2].p for i in idx])
            for i, p in zip(idx, adjusted, strict=True):
                decided[i] = self._items[i][2].adjusted(min(float(p), 1.0), family, len(idx))
        return [
            decided[i].record(cid, pct=pct, **extra)
            for i, (cid, _, _, pct, extra) in enumerate(self._items)
        ]


def detectable_net_share(n: int, m: int = 1) -> float:
    """The smallest net share of ``n`` images (all moving images in one direction) that the
    exact sign test can show at 1 - CONFIDENCE after Holm in a family of ``m`` (the first,
    smallest p faces α/m): ``k/n`` for the least ``k`` with ``2^(1-k) < α/m``; inf when ``n``
    images cannot."""
    alpha = (1 - CONFIDENCE) / m
    for k in range(1, n + 1):
        if 2.0 ** (1 - k) < alpha:
            return k / n
    return float("inf")


def paired_frames(
    df: pd.DataFrame, column: str, condition: str, a: str, b: str, unit: str = "name"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image means of ``column`` under ``condition == a`` and ``== b``, on shared images."""
    means = df.groupby([condition, unit], sort=False)[column].mean()
    left, right = means.loc[a], means.loc[b]
    shared = [u for u in left.index if u in right.index]
    return left.loc[shared].to_numpy(dtype=float), right.loc[shared].to_numpy(dtype=float)


__all__ = [
    "RATE",
    "VALUE",
    "Findings",
    "detectable_net_share",
    "format_p",
    "holm",
    "MIN_N",
    "SMALL_N",
    "Comparison",
    "Estimate",
    "compare",
    "estimate",
    "format_numbers",
    "group_estimates",
    "paired_frames",
    "per_image",
    "seed_spread",
]
