"""The ``beyond`` stage's report: flat tables, ``results.md`` and ``metrics.json``.

Every function reads the stage's ``per_edit`` table (one row per source editor, editor,
method, image, transformation and scenario, as :func:`runtime_backdoor.pipeline.beyond.measure` returns
it) and, where costs enter, its ``protection`` table. A rate or mean is over the rows of its
group: images, and scenarios where a table pools them (``n_images`` counts the images).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .stats import MIN_N, RATE, VALUE, Estimate, Findings, compare, group_estimates, paired_frames

#: Per-image columns of ``per_edit`` and the names of their means in the tables.
MEANS = {
    "hit_clean": "hit_rate_clean",
    "hit_protected": "hit_rate_protected",
    "hit_fraction_protected": "hit_fraction_protected",
    "ssim_vs_clean_edit": "ssim_vs_clean_edit",
    "ssim_region_vs_clean_edit": "ssim_region_vs_clean_edit",
}
#: LPIPS-alex columns, in ``per_edit`` where the stage had a backbone (evaluate.lpips_backbone).
LPIPS_MEANS = {
    "lpips_vs_clean_edit": "lpips_vs_clean_edit",
    "lpips_region_vs_clean_edit": "lpips_region_vs_clean_edit",
}


def _mean_table(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Means over images (seeds averaged within an image first) with 95 % intervals:
    each column ``c`` comes with ``c_low`` and ``c_high`` (:mod:`runtime_backdoor.stats`)."""
    means = MEANS | {k: v for k, v in LPIPS_MEANS.items() if k in df}
    d = df.assign(**{k: df[k].astype(float) for k in means})
    t = group_estimates(d, by, list(means))
    renames = {}
    for source, name in means.items():
        for suffix in ("", "_low", "_high"):
            renames[source + suffix] = name + suffix
    return t.rename(columns=renames)


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


def scenario_conclusions(per_edit: pd.DataFrame) -> list[dict]:
    """The evaluate stage's comparisons: per scenario, the protected images' hit rate (family
    ``scenarios/hit``, exact sign test) and fill-to-target MSE (``scenarios/target_mse``,
    signed-rank test) against the clean images', paired over images, Holm within each family."""
    found = Findings()
    for scenario, g in per_edit.groupby("scenario", sort=False):
        for column, metric, kind in (
            ("hit", f"the hit rate ({scenario})", RATE),
            ("target_mse", f"the fill-to-target MSE ({scenario})", VALUE),
        ):
            c = compare(
                g[f"{column}_protected"].astype(float).to_numpy(),
                g[f"{column}_clean"].astype(float).to_numpy(),
                label_a="protected images", label_b="clean images", metric=metric, kind=kind,
            )  # fmt: skip
            found.add(f"scenario/{scenario}/{column}", f"scenarios/{column}", c, pct=kind == RATE)
    return found.decide()


def _beyond_family(cid: str) -> str:
    """The question a beyond comparison answers, from its id (``SOURCE/question/...``):
    ``beyond/fires``, ``beyond/fair``, ``beyond/robust``, ``beyond/method/KIND``,
    ``beyond/transfer``."""
    parts = cid.split("/")
    if parts[1] == "method":
        return f"beyond/method/{parts[-1]}"
    return f"beyond/{parts[1]}"


def conclusions(per_edit: pd.DataFrame) -> list[dict]:
    """The comparisons the stage's text may state, each an exact sign test over images (each
    image's hit outcome averaged over its δ₀ seeds), Holm within its family
    (:func:`_beyond_family`).

    Per source editor: does the backdoor fire (protected vs clean, official mask); does each
    fair mask trigger it as often as the official one; does each transformation keep its
    hits; does each other method hit more or less often (malicious and benign, official
    scenarios); and does it transfer to each other editor. Returns the entries of
    :meth:`runtime_backdoor.stats.Findings.decide`; ``id`` is stable across runs.
    """
    found = Findings()

    def add(cid: str, d: pd.DataFrame, column: str, condition: str, a, b, label_a, label_b, metric):
        if not len(d) or a not in set(d[condition]) or b not in set(d[condition]):
            return
        va, vb = paired_frames(
            d.assign(**{column: d[column].astype(float)}), column, condition, a, b
        )
        c = compare(va, vb, label_a=label_a, label_b=label_b, metric=metric, kind=RATE)
        # no_hits: nothing to compare on either side
        found.add(
            cid, _beyond_family(cid), c, pct=True, no_hits=bool(not va.any() and not vb.any())
        )

    if not len(per_edit):
        return []
    plain = per_edit[per_edit["transform"] == "none"]
    for source in dict.fromkeys(per_edit["source"]):
        own = _own(plain)
        own = own[own["source"] == source]
        bd = own[own["method"] == "backdoor"]
        mask = bd[bd["scenario"] == "mask"]
        if len(mask):
            both = pd.concat([
                mask.assign(image="protected", hit=mask["hit_protected"]),
                mask.assign(image="clean", hit=mask["hit_clean"]),
            ])  # fmt: skip
            add(f"{source}/fires", both, "hit", "image", "protected", "clean",
                f"protected images ({source})", "clean images", "the malicious hit rate (mask)")  # fmt: skip
        fair = bd[(bd["family"] == "fair") & (bd["kind"] == "malicious")]
        for scenario in dict.fromkeys(fair["scenario"]):
            add(f"{source}/fair/{scenario}", bd, "hit_protected", "scenario", scenario, "mask",
                f"the fair mask {scenario}", "the official mask", f"the backdoor's hit rate ({source})")  # fmt: skip
        rob = _own(per_edit)
        rob = rob[
            (rob["source"] == source) & (rob["method"] == "backdoor") & (rob["kind"] == "malicious")
        ]
        robust = set(rob.loc[rob["transform"] != "none", "scenario"])
        rob = rob[rob["scenario"].isin(robust)]
        for t in dict.fromkeys(rob.loc[rob["transform"] != "none", "transform"]):
            add(f"{source}/robust/{t}", rob, "hit_protected", "transform", t, "none",
                f"{t} before editing", "no transformation",
                f"the malicious hit rate ({source}; beyond's robustness scenarios "
                f"{', '.join(sorted(robust))}, pooled)")  # fmt: skip
        official = own[own["family"] == "official"]
        for method in dict.fromkeys(official.loc[official["method"] != "backdoor", "method"]):
            names = set(official.loc[official["method"] == method, "name"])
            d = official[official["name"].isin(names)]
            for kind in ("malicious", "benign"):
                add(f"{source}/method/{method}/{kind}", d[d["kind"] == kind], "hit_protected",
                    "method", method, "backdoor", method, "the backdoor",
                    f"the {kind} hit rate ({source}, official scenarios)")  # fmt: skip
        transfer = plain[(plain["source"] == source) & (plain["method"] == "backdoor")]
        transfer = transfer[(transfer["kind"] == "malicious") & (transfer["family"] == "official")]
        for editor in dict.fromkeys(transfer.loc[transfer["editor"] != source, "editor"]):
            names = set(transfer.loc[transfer["editor"] == editor, "name"])
            d = transfer[transfer["name"].isin(names)]
            add(f"{source}/transfer/{editor}", d, "hit_protected", "editor", editor, source,
                f"editing with {editor}", f"editing with {source}",
                f"the malicious hit rate of images protected against {source}")  # fmt: skip
    return found.decide()


def metric_key(*parts) -> str:
    """A flat ``metrics.json`` key from ``parts``: joined by "_", "-" made "_", ":" dropped
    (``jpeg:75`` -> ``jpeg75``), "%" made "pct" (``crop:10%`` -> ``crop10pct``), anything else
    outside ``[A-Za-z0-9_.]`` made "_"."""
    joined = "_".join(str(p).replace("-", "_").replace(":", "").replace("%", "pct") for p in parts)
    return re.sub(r"[^A-Za-z0-9_.]", "_", joined)


def summarize(per_edit: pd.DataFrame, protection: pd.DataFrame) -> dict:
    """The flat ``reports/beyond/metrics.json``.

    Rows are read by column (``r["transform"]``), never as attributes: ``r.transform`` is
    the method ``Series.transform``, not the column, and any column name may clash so.
    """
    out: dict = {"n_edits": int(len(per_edit))}
    if not len(per_edit):
        return out
    key = metric_key

    def put(name: str, row, col: str) -> None:
        for suffix in ("", "_low", "_high"):
            out[name + suffix] = float(row[col + suffix])

    for _, r in fair_mask_table(per_edit).iterrows():
        put(key(r["source"], "backdoor", r["scenario"], "hit_rate"), r, "hit_rate_protected")
        put(
            key(r["source"], "backdoor", r["scenario"], "ssim_region"),
            r,
            "ssim_region_vs_clean_edit",
        )
        if "lpips_region_vs_clean_edit" in r:
            put(
                key(r["source"], "backdoor", r["scenario"], "lpips_region"),
                r,
                "lpips_region_vs_clean_edit",
            )
    for _, r in robustness_table(per_edit, methods=list(per_edit["method"].unique())).iterrows():
        put(
            key(r["source"], r["method"], r["kind"], r["transform"], "hit_rate"),
            r,
            "hit_rate_protected",
        )
    for _, r in baseline_table(per_edit, protection).iterrows():
        if r["status"] == "ok":
            where = (r["source"], r["method"], r["kind"], r["family"])
            put(key(*where, "hit_rate"), r, "hit_rate_protected")
            put(key(*where, "ssim_region"), r, "ssim_region_vs_clean_edit")
            if "lpips_region_vs_clean_edit" in r:
                put(key(*where, "lpips_region"), r, "lpips_region_vs_clean_edit")
    for _, r in transfer_table(per_edit).iterrows():
        if r["source"] != r["editor"]:
            put(
                key("transfer", r["method"], r["source"], "to", r["editor"], r["kind"], "hit_rate"),
                r,
                "hit_rate_protected",
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


def _ci(d: pd.DataFrame | pd.Series, col: str, pct: bool = False) -> str:
    """``col`` of the first row of ``d`` (or of the row ``d``) with its 95 % interval."""
    row = d if isinstance(d, pd.Series) else (d.iloc[0] if len(d) else None)
    if row is None or pd.isna(row.get(col)):
        return "–"
    e = Estimate(
        float(row[col]), float(row[f"{col}_low"]), float(row[f"{col}_high"]), int(row["n_images"])
    )
    return e.format(pct)


def _cells(g: pd.DataFrame, kind: str, col: str, pct: bool, by: str, values, sep: str) -> str:
    """``col`` (with its interval) of the ``kind`` rows of ``g`` for each of ``values`` of ``by``."""
    return sep.join(_ci(g[(g["kind"] == kind) & (g[by] == v)], col, pct) for v in values)


def _section(title: str, header: list[str]) -> list[str]:
    """A heading and the head of its table."""
    return ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]


def _intro(lp: bool, lpips_unavailable: str | None) -> list[str]:
    """The title and what the numbers mean, down to the conclusions' heading."""
    lines = ["# Beyond the paper: fair masks, robustness, EOT, baselines, transfer", ""]
    lines += [
        "Hit = at least the set share of the edited region within the tolerance of the target",
        "colour; SSIM (region) = SSIM of the protected image's edit against the same edit of the",
        "clean image, over the edited region (1 = no change). Malicious edits: want a high hit",
        "rate / low SSIM; benign edits: want a 0% hit rate / SSIM near 1. Brackets: 95 %",
        "intervals over images (seeds averaged within an image first; `stats`).",
        "",
        "LPIPS (region) = LPIPS-alex (v0.1, the `lpips` package) of the protected image's edit"
        " against the clean image's edit, over the edited region (0 = no change)."
        if lp
        else f"LPIPS: not computed ({lpips_unavailable or 'no backbone'}).",
        "",
        "## What the numbers support",
        "",
        "Generated from the per-image values (`reporting.conclusions`): each image's hit outcome",
        "averaged over its δ₀ seeds, an exact sign test over images, Holm's adjustment within",
        f"each family of comparisons; never a direction on fewer than {MIN_N} images (`stats`).",
        "",
    ]
    return lines


def _conclusion_lines(per_edit: pd.DataFrame) -> list[str]:
    """One line per conclusion with hits; one for the comparisons without any."""
    found = conclusions(per_edit)
    lines = [f"- {c['sentence']}." for c in found if not c["no_hits"]]
    empty = [c["id"] for c in found if c["no_hits"]]
    if empty:
        lines.append(
            f"- No hits on either side, so nothing to compare, in {len(empty)} further comparisons: "
            + ", ".join(f"`{i}`" for i in empty)
            + "."
        )
    return lines


def _fair_mask_lines(per_edit: pd.DataFrame, lp: bool) -> list[str]:
    """The fair-mask table: the backdoor under every scenario, untransformed."""
    lines = _section(
        "Fair masks (backdoor, no transformation)",
        ["source", "kind", "family", "scenario", "images", "hit clean → protected", "SSIM region"]
        + (["LPIPS region"] if lp else []),
    )
    for _, r in fair_mask_table(per_edit).iterrows():
        lpips = f" {_ci(r, 'lpips_region_vs_clean_edit')} |" if lp else ""
        lines.append(
            f"| {r['source']} | {r['kind']} | {r['family']} | {r['scenario']} | {r['n_images']} | "
            f"{_ci(r, 'hit_rate_clean', True)} → {_ci(r, 'hit_rate_protected', True)} | {_ci(r, 'ssim_region_vs_clean_edit')} |{lpips}"
        )
    return lines


def _robustness_lines(per_edit: pd.DataFrame, lp: bool) -> list[str]:
    """The robustness table: the backdoor under every transformation."""
    lines = _section(
        "Robustness (backdoor; transformation applied to the image before editing)",
        ["source", "transform", "images", "malicious hit", "survival", "malicious SSIM region"]
        + ["benign hit", "benign SSIM region"]
        + (["benign LPIPS region"] if lp else []),
    )
    rob = robustness_table(per_edit)
    for (source, transform), g in rob.groupby(["source", "transform"], sort=False):
        mal, ben = g[g["kind"] == "malicious"], g[g["kind"] == "benign"]
        lpips = f" {_ci(ben, 'lpips_region_vs_clean_edit')} |" if lp else ""
        lines.append(
            f"| {source} | {transform} | {_first(g, 'n_images')} | {_ci(mal, 'hit_rate_protected', True)} | "
            f"{_fmt(_first(mal, 'survival'), True)} | {_ci(mal, 'ssim_region_vs_clean_edit')} | "
            f"{_ci(ben, 'hit_rate_protected', True)} | {_ci(ben, 'ssim_region_vs_clean_edit')} |{lpips}"
        )
    return lines


def _eot_lines(per_edit: pd.DataFrame, protection: pd.DataFrame) -> list[str]:
    """The EOT table (backdoor against backdoor with EOT) and their cost."""
    lines = _section(
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
        + "; ".join(f"{r.source} {r.method} {r.seconds_per_image:.2f}" for r in cost.itertuples())
        + "."
    )
    return lines


def _baseline_lines(per_edit: pd.DataFrame, protection: pd.DataFrame, lp: bool) -> list[str]:
    """The methods side by side, official and fair scenarios."""
    lines = _section(
        "Methods side by side (same images, editor and budget; no transformation)",
        ["source", "method", "malicious hit (official / fair)"]
        + ["malicious SSIM region (official / fair)", "benign hit (official / fair)"]
        + ["benign SSIM region (official / fair)"]
        + (["benign LPIPS region (official / fair)"] if lp else []),
    )
    base = baseline_table(per_edit, protection)
    families = ("official", "fair")
    for (source, method), g in base.groupby(["source", "method"], sort=False):
        if (g["status"] != "ok").all():
            lines.append(f"| {source} | {method} | not applicable | | | |" + (" |" if lp else ""))
            continue
        cells = [
            _cells(g, kind, col, col == "hit_rate_protected", "family", families, " / ")
            for kind in ("malicious", "benign")
            for col in ("hit_rate_protected", "ssim_region_vs_clean_edit")
        ]
        if lp:
            cells.append(
                _cells(g, "benign", "lpips_region_vs_clean_edit", False, "family", families, " / ")
            )
        lines.append(f"| {source} | {method} | " + " | ".join(cells) + " |")
    return lines


def _transfer_lines(per_edit: pd.DataFrame, lp: bool) -> list[str]:
    """The transfer table, where any protection was edited by another editor."""
    lines = []
    tr = transfer_table(per_edit)
    if len(tr):
        editors = list(dict.fromkeys(tr["editor"]))
        lines += _section(
            "Transfer (official scenarios, no transformation): malicious hit rate / benign SSIM region"
            + (" / benign LPIPS region" if lp else ""),
            ["method", "protected against ↓ / edited with →", *editors],
        )
        for (method, source), g in tr.groupby(["method", "source"], sort=False):
            cells = []
            for e in editors:
                here = g[g["editor"] == e]
                mal = _ci(here[here["kind"] == "malicious"], "hit_rate_protected", True)
                ben = _ci(here[here["kind"] == "benign"], "ssim_region_vs_clean_edit")
                if lp:
                    ben += " / " + _ci(here[here["kind"] == "benign"], "lpips_region_vs_clean_edit")
                cells.append(f"{mal} / {ben}")
            lines.append(f"| {method} | {source} | " + " | ".join(cells) + " |")
    return lines


def markdown(
    per_edit: pd.DataFrame, protection: pd.DataFrame, lpips_unavailable: str | None = None
) -> str:
    """``reports/beyond/results.md``: the five tables, compact. LPIPS columns where
    ``per_edit`` has them; else a line saying why not (``lpips_unavailable``)."""
    lp = "lpips_region_vs_clean_edit" in per_edit
    lines = _intro(lp, lpips_unavailable)
    lines += _conclusion_lines(per_edit)
    lines += _fair_mask_lines(per_edit, lp)
    lines += _robustness_lines(per_edit, lp)
    if (per_edit["method"] == "backdoor_eot").any():
        lines += _eot_lines(per_edit, protection)
    lines += _baseline_lines(per_edit, protection, lp)
    lines += _transfer_lines(per_edit, lp)
    return "\n".join(lines) + "\n"


__all__ = [
    "baseline_table",
    "conclusions",
    "eot_table",
    "fair_mask_table",
    "markdown",
    "metric_key",
    "robustness_table",
    "scenario_conclusions",
    "summarize",
    "transfer_table",
]
