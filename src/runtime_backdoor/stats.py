"""Uncertainty of the study's numbers, and the conclusions they allow.

Every rate and mean the reports give is over images (the unit that is sampled); where
several δ₀ seeds were run, each image's values are first averaged over its seeds, so the
interval covers both sources of variation without counting an image twice. Intervals are
95 % percentile-bootstrap intervals over images (``scipy.stats.bootstrap``), with one
exception: a rate that is 0 or 1 on every image would collapse to a point under the
bootstrap, so it gets the Wilson score interval of ``k`` of ``n`` images instead
(``scipy.stats.binomtest``), which says how large a rate ``n`` images cannot exclude.

A comparison of two conditions on the same images is a *paired* one: the interval of the
mean per-image difference. :func:`compare` states a direction only when that interval
excludes 0 (or, when every image differs by the same amount, when a sign test over the
images is significant); otherwise it says that no difference is detectable at that ``n``.

Few images. The percentile bootstrap is too narrow at small ``n`` (its interval of a mean is
about ``z·sqrt((n-1)/n) / t(n-1)`` times the Student t interval: 0.82 at 10 images, 0.63
at 5; at 2 images it is the range of the two values, so two negative differences "show" a
decrease). Hence, below :data:`SMALL_N` images:

* :func:`estimate` gives the Wilson score interval for 0/1 values and the Student t
  interval otherwise (exact for normally distributed values; not clipped to a rate's range);
* :func:`compare` takes the Student t interval of the differences, and states a direction
  only when it excludes 0 *and* an exact two-sided sign test over the images' non-zero
  differences is significant: a claim then rests neither on the normality that so few
  images cannot check nor on the sign test alone, which ignores magnitudes;
* below :data:`MIN_N` images :func:`compare` states no direction at all, whatever the
  values: 6 is the fewest images at which an exact two-sided sign test can reach
  p < 0.05 (p = 2^(1-n) when every image agrees), so below it no test free of assumptions
  about the values' distribution can show one. The verdict is then "no difference" (the
  verdicts stay "higher", "lower" or "no difference") and the sentence says why.

From :data:`SMALL_N` images on, the percentile bootstrap is kept as above.

Numbers are written with significant digits (:func:`format_numbers`): a mean and its
bounds share their decimals, as many as the default (3, or whole percentage points) or
more, so that the largest of the three shows 3 significant figures (2 for percentage
points), e.g. ``-0.000123 [-0.000201, -0.000045]`` rather than ``-0.000 [-0.000, -0.000]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Comparison:
    """Condition ``a`` against ``b`` on the same images: the mean difference ``a - b``."""

    a: str
    b: str
    metric: str
    difference: Estimate
    verdict: str  #: "higher", "lower" or "no difference"

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
        if 0 < d.n < MIN_N:
            return (
                f"no direction can be shown in {self.metric} between {self.a} and {self.b} "
                f"at n = {d.n} images (fewer than {MIN_N}; difference {diff})"
            )
        if self.verdict == "no difference":
            return (
                f"no detectable difference in {self.metric} between {self.a} and {self.b} "
                f"at n = {d.n} images (difference {diff})"
            )
        return f"{self.metric} is {self.verdict} for {self.a} than for {self.b} ({diff}, n = {d.n} images)"


def _sign_test_significant(diff: np.ndarray) -> bool:
    """Exact two-sided sign test over the non-zero differences, at 1 - CONFIDENCE."""
    nonzero = diff[diff != 0]
    if not len(nonzero):
        return False
    return bool(stats.binomtest(int((nonzero > 0).sum()), len(nonzero)).pvalue < 1 - CONFIDENCE)


def compare(a, b, *, label_a: str, label_b: str, metric: str, seed: int = SEED) -> Comparison:
    """Paired comparison of per-image values ``a`` and ``b`` (same images, same order).

    The interval of the mean difference ``a - b`` decides: the percentile bootstrap from
    :data:`SMALL_N` images on; below, the Student t interval, and a direction needs the
    exact sign test too; below :data:`MIN_N` images, never a direction (verdict "no
    difference"; :meth:`Comparison.sentence` says that ``n`` is too small). Every image
    differing by the same amount: the sign test alone decides (no spread to resample).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must align: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    n = len(diff)
    if n == 0:
        return Comparison(label_a, label_b, metric, estimate(diff), "no difference")
    if np.all(diff == diff[0]):
        # The bootstrap cannot resample a spread that is not there: a sign test decides.
        d = Estimate(float(diff[0]), float(diff[0]), float(diff[0]), n)
        significant = _sign_test_significant(diff)
    elif n < SMALL_N:
        d = Estimate(float(diff.mean()), *_t_interval(diff), n)
        significant = (d.low > 0 or d.high < 0) and _sign_test_significant(diff)
    else:
        d = estimate(diff, seed=seed)
        significant = d.low > 0 or d.high < 0
    significant = significant and n >= MIN_N
    verdict = "no difference" if not significant else ("higher" if d.mean > 0 else "lower")
    return Comparison(label_a, label_b, metric, d, verdict)


def paired_frames(
    df: pd.DataFrame, column: str, condition: str, a: str, b: str, unit: str = "name"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image means of ``column`` under ``condition == a`` and ``== b``, on shared images."""
    means = df.groupby([condition, unit], sort=False)[column].mean()
    left, right = means.loc[a], means.loc[b]
    shared = [u for u in left.index if u in right.index]
    return left.loc[shared].to_numpy(dtype=float), right.loc[shared].to_numpy(dtype=float)


__all__ = [
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
]
