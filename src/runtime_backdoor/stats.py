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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 4999
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` images and its 95 % interval."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, pct: bool = False, digits: int = 3) -> str:
        """``"17 % [4, 41]"`` or ``"0.912 [0.897, 0.925]"``; ``"–"`` when empty."""
        if self.n == 0 or not np.isfinite(self.mean):
            return "–"
        if pct:
            return f"{self.mean:.0%} [{self.low * 100:.0f}, {self.high * 100:.0f}]"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0) | (values == 1)))


def estimate(values, *, seed: int = SEED) -> Estimate:
    """Mean of ``values`` (one per image; NaNs dropped) with its 95 % interval."""
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
        d = self.difference
        if pct:
            diff = f"{d.mean * 100:+.0f} points [{d.low * 100:+.0f}, {d.high * 100:+.0f}]"
        else:
            diff = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        if self.verdict == "no difference":
            return (
                f"no detectable difference in {self.metric} between {self.a} and {self.b} "
                f"at n = {d.n} images (difference {diff})"
            )
        return f"{self.metric} is {self.verdict} for {self.a} than for {self.b} ({diff}, n = {d.n} images)"


def compare(a, b, *, label_a: str, label_b: str, metric: str, seed: int = SEED) -> Comparison:
    """Paired comparison of per-image values ``a`` and ``b`` (same images, same order)."""
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
        significant = diff[0] != 0 and stats.binomtest(n, n).pvalue < 1 - CONFIDENCE
    else:
        d = estimate(diff, seed=seed)
        significant = d.low > 0 or d.high < 0
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
    "Comparison",
    "Estimate",
    "compare",
    "estimate",
    "group_estimates",
    "paired_frames",
    "per_image",
]
