"""What DVC shows a reviewer, taken from what the stages already compute.

- **Headline metrics** (``dvc metrics show``, ``dvc exp show``): each stage's full flat record
  stays in its ``metrics.json`` (thousands of keys, every interval bound, read by the docs and the
  tests); the stage also writes ``headline.json`` with the few keys a reader compares first, and
  only those files are DVC metrics — under 100 keys for the whole pipeline (a test counts them).
- **Plot data** (``dvc plots show`` / ``dvc plots diff``): small CSV files under ``reports/plots/``
  that DVC's own templates draw, so that two experiments overlay on one chart: the ε sweep's hit
  rate per editor, the implantation's loss curves and the purifiers' worst case.
"""

from __future__ import annotations

import os
import re

import pandas as pd

from .data import write_json

#: stage -> regular expressions (full match) of the keys of its metrics.json shown as headline
HEADLINES = {
    "evaluate": (
        r"n_images",
        r"protection_(psnr|ssim|linf_8bit_max)",
        r"(malicious_(mask|expanded|incomplete)|benign_(ring|half_ring|elsewhere))_hit_rate_(protected|clean)",
        r"benign_(ring|elsewhere)_psnr_vs_clean_edit",
    ),
    "beyond": (
        r"n_edits",
        r"(pipeline|control)_(backdoor|backdoor_eot|untargeted|markpainting|random)_malicious_official_hit_rate",
        r"(pipeline|control)_backdoor_malicious_(fair|jpeg75)_hit_rate",
    ),
    "purify": (
        r"n_images",
        r"[a-z_]+_(none|worstclassical)_mask_hit_rate",
    ),
    "ensemble": (
        r"n_images",
        r"c\d+_(alone|without|all)_hit_rate",
    ),
}


def headline(recorded: dict, stage: str) -> dict:
    """The keys of ``recorded`` (a stage's flat metrics) that :data:`HEADLINES` names for ``stage``."""
    patterns = [re.compile(p) for p in HEADLINES[stage]]
    return {k: v for k, v in recorded.items() if any(p.fullmatch(k) for p in patterns)}


def write_headline(path: str | os.PathLike, recorded: dict, stage: str) -> dict:
    """Write :func:`headline` of ``recorded`` as JSON to ``path`` (atomically); returns it."""
    shown = headline(recorded, stage)
    write_json(path, shown)
    return shown


# ----------------------------------------------------------------------------- plot data


def eps_sweep_curves(per_image: pd.DataFrame) -> pd.DataFrame:
    """Hit rate per budget (rows, ``eps_8bit``) and editor (one column each): the mean over
    images and δ₀ seeds of the ε sweep's per-image table."""
    rates = per_image.groupby(["eps_8bit", "editor"], sort=True)["hit"].mean().unstack("editor")
    return rates.reset_index().rename_axis(columns=None)


def loss_curves(losses: pd.DataFrame) -> pd.DataFrame:
    """Median over images of each loss term per Adam step (the implant stage's losses.csv)."""
    terms = [c for c in losses.columns if c not in ("name", "step")]
    return losses.groupby("step", sort=True)[terms].median().reset_index()


def purification_worst_case(table: pd.DataFrame, scenario: str = "mask") -> pd.DataFrame:
    """Hit rate of each protection (``editor · method``) with no purifier and under the
    per-image worst case over the classical suite, on the ``scenario`` edit."""
    rows = table[
        (table["scenario"] == scenario) & table["purifier"].isin(["none", "worst:classical"])
    ]
    out = pd.DataFrame(
        {
            "protection": rows["editor"] + " · " + rows["method"] + " · " + rows["purifier"],
            "hit_rate": rows["hit_protected"].astype(float),
        }
    )
    return out.reset_index(drop=True)
