"""The toy control's hit rates, each named by its definition: the one list that the tutorial
(:func:`runtime_backdoor.tutorial.control_hit_rates`) and the generated docs
(:mod:`runtime_backdoor.docs_text`, docs/results.md) both show.

The control is hit at different rates depending on what is edited and how many δ₀ seeds are
averaged; each rate gets a name that says which it is (:data:`RATE_NAMES`). A small module of
its own, pandas only: the tutorial imports it without importing the docs generator, and no stage
imports it.
"""

from __future__ import annotations

import math

import pandas as pd

#: one name per definition of "how often the control is hit"
RATE_NAMES = {
    "sweep": "ε-sweep hit rate",
    "mask": "beyond: hit rate, edit m",
    "official": "beyond: official malicious hit rate",
    "fair": "beyond: fair-mask malicious hit rate",
    "notebook": "this notebook: one image, one δ₀",
}

#: where each rate is read from (relative to the reports folder)
RATE_FILES = {
    "sweep": "eps_sweep.json",
    "mask": "beyond/fair_masks.csv",
    "official": "beyond/baselines.csv",
    "fair": "beyond/baselines.csv",
}

NAN = math.nan


def control_label(control: str) -> str:
    """The control's label from its label or its spec (``label:name(key:value,...)``)."""
    head = control.split("(", 1)[0]
    return head.split(":", 1)[0] if ":" in head else head


def control_rates(
    sweep: dict | None,
    fair_masks: pd.DataFrame | None,
    baselines: pd.DataFrame | None,
    control: str = "control",
) -> list[dict]:
    """The committed rates, one dict per definition present (keys of :data:`RATE_NAMES` but
    ``notebook``), in that order: ``key``, ``name``, ``file``, ``n_images``, ``protected``,
    ``protected_low``, ``protected_high``, ``clean``, ``clean_low``, ``clean_high`` (NaN where
    the stage does not measure it). ``sweep``: reports/eps_sweep.json (the rate at the budget
    nearest the paper's); ``fair_masks``/``baselines``: the beyond stage's tables. A missing
    source (None) gives no row for its rates."""
    control = control_label(control)
    rows = []
    if sweep is not None:
        key = f"{control}_hit_rate_at_paper_eps"
        rows.append({
            "key": "sweep", "n_images": int(sweep["n_images"]),
            "protected": sweep[key], "protected_low": sweep[f"{key}_low"],
            "protected_high": sweep[f"{key}_high"], "clean": NAN, "clean_low": NAN, "clean_high": NAN,
        })  # fmt: skip

    def from_table(key: str, table: pd.DataFrame | None, select) -> None:
        if table is None:
            return
        found = table[select(table)]
        if found.empty:
            return
        r = found.iloc[0]
        rows.append({"key": key, "n_images": int(r["n_images"])} | {
            f"{side}{suffix}": float(r[f"hit_rate_{side}{suffix}"])
            for side in ("protected", "clean") for suffix in ("", "_low", "_high")
        })  # fmt: skip

    from_table("mask", fair_masks, lambda t: (
        (t["source"] == control) & (t["kind"] == "malicious") & (t["family"] == "official")
        & (t["scenario"] == "mask")
    ))  # fmt: skip
    for family in ("official", "fair"):
        from_table(family, baselines, lambda t, f=family: (
            (t["source"] == control) & (t["method"] == "backdoor") & (t["kind"] == "malicious")
            & (t["family"] == f)
        ))  # fmt: skip
    for row in rows:
        row["name"], row["file"] = RATE_NAMES[row["key"]], RATE_FILES[row["key"]]
    return rows


__all__ = ["RATE_FILES", "RATE_NAMES", "control_label", "control_rates"]
