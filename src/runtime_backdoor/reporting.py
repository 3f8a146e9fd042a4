"""The ``beyond`` stage's report: flat tables, ``results.md`` and ``metrics.json``.

Every function reads the stage's ``per_edit`` table (one row per source editor, editor,
method, image, transformation and scenario, as :func:`runtime_backdoor.beyond.run` returns
it) and, where costs enter, its ``protection`` table. A rate or mean is over the rows of its
group: images, and scenarios where a table pools them (``n_images`` counts the images).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _mean_table(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    cols = {
        "n_images": ("name", "nunique"),
        "hit_rate_clean": ("hit_clean", "mean"),
        "hit_rate_protected": ("hit_protected", "mean"),
        "hit_fraction_protected": ("hit_fraction_protected", "mean"),
        "ssim_vs_clean_edit": ("ssim_vs_clean_edit", "mean"),
        "ssim_region_vs_clean_edit": ("ssim_region_vs_clean_edit", "mean"),
    }
    return df.groupby(by, sort=False).agg(**cols).reset_index()


def _own(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Rows edited by the editor the protection was optimised against."""
    return per_edit[per_edit["source"] == per_edit["editor"]]


def fair_mask_table(per_edit: pd.DataFrame) -> pd.DataFrame:
    """The backdoor under every scenario, official and fair, without transformation."""
    d = _own(per_edit)
    d = d[(d["method"] == "backdoor") & (d["transform"] == "none")]
    return _mean_table(d, ["source", "kind", "family", "scenario"])


def robustness_table(per_edit: pd.DataFrame, methods=("backdoor",)) -> pd.DataFrame:
    """Per transformation: malicious hit rate, its survival (share of the untransformed rate)
    and the benign side effects, over the scenarios run under every transformation."""
    d = _own(per_edit)
    d = d[d["method"].isin(methods)]
    robust = set(d.loc[d["transform"] != "none", "scenario"])
    d = d[d["scenario"].isin(robust)] if robust else d
    keys = ["source", "method", "kind"]
    t = _mean_table(d, [*keys, "transform"])
    base = t.loc[t["transform"] == "none", [*keys, "hit_rate_protected"]]
    t = t.merge(base.rename(columns={"hit_rate_protected": "_base"}), on=keys, how="left")
    t["survival"] = (t["hit_rate_protected"] / t["_base"]).where(t["_base"] > 0)
    return t.drop(columns="_base")


def eot_table(per_edit: pd.DataFrame, protection: pd.DataFrame) -> pd.DataFrame:
    """Backdoor with and without EOT on the same images: robustness gained, cost paid."""
    eot = per_edit[(per_edit["method"] == "backdoor_eot")]
    names = set(eot["name"])
    d = per_edit[per_edit["name"].isin(names)]
    t = robustness_table(d, methods=("backdoor", "backdoor_eot"))
    ok = protection[(protection["status"] == "ok") & protection["name"].isin(names)]
    cost = ok.groupby(["source", "method"])["seconds"].mean().rename("seconds_per_image")
    return t.merge(cost.reset_index(), on=["source", "method"], how="left")


def baseline_table(per_edit: pd.DataFrame, protection: pd.DataFrame) -> pd.DataFrame:
    """Every method on the same images and editor, no transformation, by scenario group.

    Methods that do not apply to an editor get a row with ``status`` "n/a".
    """
    d = _own(per_edit)
    d = d[d["transform"] == "none"]
    names = set(d.loc[d["method"] != "backdoor", "name"]) or set(d["name"])
    d = d[d["name"].isin(names)]
    t = _mean_table(d, ["source", "method", "kind", "family"])
    t["status"] = "ok"
    na = protection[protection["status"].str.startswith("n/a")][["source", "method", "status"]]
    na = na.drop_duplicates(["source", "method"])
    return pd.concat([t, na], ignore_index=True)


def transfer_table(per_edit: pd.DataFrame) -> pd.DataFrame:
    """Protect against ``source``, edit with ``editor``: hit rate and SSIM by kind."""
    d = per_edit[per_edit["transform"] == "none"]
    names = set(d.loc[d["source"] != d["editor"], "name"])
    d = d[d["name"].isin(names) & (d["family"] == "official")]
    return _mean_table(d, ["method", "source", "editor", "kind"])


def summarize(per_edit: pd.DataFrame, protection: pd.DataFrame) -> dict:
    """The flat ``reports/beyond/metrics.json``."""
    out: dict = {"n_edits": int(len(per_edit))}
    if not len(per_edit):
        return out
    key = lambda *parts: "_".join(str(p).replace("-", "_").replace(":", "") for p in parts)  # noqa: E731
    for r in fair_mask_table(per_edit).itertuples():
        out[key(r.source, "backdoor", r.scenario, "hit_rate")] = float(r.hit_rate_protected)
        out[key(r.source, "backdoor", r.scenario, "ssim_region")] = float(
            r.ssim_region_vs_clean_edit
        )
    for r in robustness_table(per_edit, methods=list(per_edit["method"].unique())).itertuples():
        out[key(r.source, r.method, r.kind, r.transform, "hit_rate")] = float(r.hit_rate_protected)
    for r in baseline_table(per_edit, protection).itertuples():
        if r.status == "ok":
            out[key(r.source, r.method, r.kind, r.family, "ssim_region")] = float(
                r.ssim_region_vs_clean_edit
            )
    for r in transfer_table(per_edit).itertuples():
        if r.source != r.editor:
            out[key("transfer", r.method, r.source, "to", r.editor, r.kind, "hit_rate")] = float(
                r.hit_rate_protected
            )
    ok = protection[protection["status"] == "ok"]
    for (source, method), g in ok.groupby(["source", "method"]):
        out[key(source, method, "seconds_per_image")] = float(g["seconds"].mean())
        out[key(source, method, "linf_8bit_max")] = float(g["linf_8bit"].max())
    return out


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:.0%}" if pct else f"{v:.3f}"


def _first(d: pd.DataFrame, col: str):
    """``col`` of the first row of ``d``; None when ``d`` is empty (a cell the run did not fill)."""
    return d[col].iloc[0] if len(d) else None


def _cells(g: pd.DataFrame, kind: str, col: str, pct: bool, by: str, values, sep: str) -> str:
    """``col`` of the ``kind`` rows of ``g`` for each of ``values`` of column ``by``, joined."""
    return sep.join(_fmt(_first(g[(g["kind"] == kind) & (g[by] == v)], col), pct) for v in values)


def _section(title: str, header: list[str]) -> list[str]:
    """A heading and the head of its table."""
    return ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def markdown(per_edit: pd.DataFrame, protection: pd.DataFrame) -> str:
    """``reports/beyond/results.md``: the five tables, compact."""
    lines = ["# Beyond the paper: fair masks, robustness, EOT, baselines, transfer", ""]
    lines += [
        "Hit = at least the set share of the edited region within the tolerance of the target",
        "colour; SSIM (region) = SSIM of the protected image's edit against the same edit of the",
        "clean image, over the edited region (1 = no change). Malicious edits: want a high hit",
        "rate / low SSIM; benign edits: want a 0% hit rate / SSIM near 1.",
    ]
    lines += _section(
        "Fair masks (backdoor, no transformation)",
        ["source", "kind", "family", "scenario", "images", "hit clean → protected", "SSIM region"],
    )
    for r in fair_mask_table(per_edit).itertuples():
        lines.append(
            f"| {r.source} | {r.kind} | {r.family} | {r.scenario} | {r.n_images} | "
            f"{_fmt(r.hit_rate_clean, True)} → {_fmt(r.hit_rate_protected, True)} | {_fmt(r.ssim_region_vs_clean_edit)} |"
        )
    lines += _section(
        "Robustness (backdoor; transformation applied to the image before editing)",
        ["source", "transform", "images", "malicious hit", "survival", "malicious SSIM region"]
        + ["benign hit", "benign SSIM region"],
    )
    rob = robustness_table(per_edit)
    for (source, transform), g in rob.groupby(["source", "transform"], sort=False):
        mal, ben = g[g["kind"] == "malicious"], g[g["kind"] == "benign"]
        lines.append(
            f"| {source} | {transform} | {_first(g, 'n_images')} | {_fmt(_first(mal, 'hit_rate_protected'), True)} | "
            f"{_fmt(_first(mal, 'survival'), True)} | {_fmt(_first(mal, 'ssim_region_vs_clean_edit'))} | "
            f"{_fmt(_first(ben, 'hit_rate_protected'), True)} | {_fmt(_first(ben, 'ssim_region_vs_clean_edit'))} |"
        )
    if (per_edit["method"] == "backdoor_eot").any():
        lines += _section(
            "EOT: what it buys and costs (same images)",
            ["source", "transform", "malicious hit: backdoor → EOT"]
            + ["benign SSIM region: backdoor → EOT"],
        )
        t = eot_table(per_edit, protection)
        methods = ("backdoor", "backdoor_eot")
        for (source, transform), g in t.groupby(["source", "transform"], sort=False):
            lines.append(
                f"| {source} | {transform} | "
                f"{_cells(g, 'malicious', 'hit_rate_protected', True, 'method', methods, ' → ')} | "
                f"{_cells(g, 'benign', 'ssim_region_vs_clean_edit', False, 'method', methods, ' → ')} |"
            )
        cost = t.drop_duplicates(["source", "method"])[["source", "method", "seconds_per_image"]]
        lines.append("")
        lines.append(
            "Cost (s per image): "
            + "; ".join(
                f"{r.source} {r.method} {r.seconds_per_image:.2f}" for r in cost.itertuples()
            )
            + "."
        )
    lines += _section(
        "Methods side by side (same images, editor and budget; no transformation)",
        ["source", "method", "malicious hit (official / fair)"]
        + ["malicious SSIM region (official / fair)", "benign hit (official / fair)"]
        + ["benign SSIM region (official / fair)"],
    )
    base = baseline_table(per_edit, protection)
    families = ("official", "fair")
    for (source, method), g in base.groupby(["source", "method"], sort=False):
        if (g["status"] != "ok").all():
            lines.append(f"| {source} | {method} | not applicable | | | |")
            continue
        cells = [
            _cells(g, kind, col, col == "hit_rate_protected", "family", families, " / ")
            for kind in ("malicious", "benign")
            for col in ("hit_rate_protected", "ssim_region_vs_clean_edit")
        ]
        lines.append(f"| {source} | {method} | " + " | ".join(cells) + " |")
    tr = transfer_table(per_edit)
    if len(tr):
        editors = list(dict.fromkeys(tr["editor"]))
        lines += _section(
            "Transfer (official scenarios, no transformation): malicious hit rate / benign SSIM region",
            ["method", "protected against ↓ / edited with →", *editors],
        )
        for (method, source), g in tr.groupby(["method", "source"], sort=False):
            cells = []
            for e in editors:
                here = g[g["editor"] == e]
                mal = _first(here[here["kind"] == "malicious"], "hit_rate_protected")
                ben = _first(here[here["kind"] == "benign"], "ssim_region_vs_clean_edit")
                cells.append(f"{_fmt(mal, True)} / {_fmt(ben)}")
            lines.append(f"| {method} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "baseline_table",
    "eot_table",
    "fair_mask_table",
    "markdown",
    "robustness_table",
    "summarize",
    "transfer_table",
]
