"""The ``purify`` stage's conclusions, ``results.md``, ``metrics.json`` and figure.

Every function reads the stage's tables (:mod:`runtime_backdoor.pipeline.purify`): ``rows``,
its per-image rows with the worst cases appended (one row per editor, method, δ₀ seed, image,
purifier and scenario), ``table``, their means over images with 95 % intervals, and
``status``, each diffusion purifier's availability.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .plots import interval_bars, plt, sns
from .reporting import metric_key
from .stats import RATE, Estimate, Findings, compare, seed_spread

__all__ = [
    "conclusions",
    "markdown",
    "purification_plot",
    "summarize",
    "unpurified_seed_spread",
]


# ------------------------------------------------------------------------------- conclusions


def _paired(d: pd.DataFrame, column: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``column`` under purifiers ``a`` and ``b``, on the images both have."""
    wide = d.pivot_table(index="name", columns="purifier", values=column, aggfunc="mean")
    if a not in wide or b not in wide:
        return np.array([]), np.array([])
    both = wide[[a, b]].dropna()
    return both[a].to_numpy(dtype=float), both[b].to_numpy(dtype=float)


def _image_means(d: pd.DataFrame, purifier: str) -> pd.DataFrame:
    """The hit columns under ``purifier`` per image, averaged over δ₀ seeds (sorted by name)."""
    cols = ["hit_protected", "hit_clean", "hit_purified_clean"]
    return d[d["purifier"] == purifier].groupby("name")[cols].mean().sort_index()


def _said(purifier: str, before: bool = True) -> str:
    """A purifier as the conclusions name it."""
    if purifier == "worst:classical":
        return "the worst classical purifier (per image)"
    if purifier == "worst:all":
        return "the worst purifier (per image)"
    return f"{purifier} before editing" if before else purifier


def conclusions(rows: pd.DataFrame) -> list[dict]:
    """The comparisons the stage may state, each an exact sign test over images
    (:func:`runtime_backdoor.stats.compare`), decided within its family by Holm's adjustment.

    Per editor and method, on the malicious edit (``mask``): does the backdoor fire without
    purification (protected vs clean images); for every purifier and worst case, is the hit rate
    lower than without purification, and does it still fire (protected vs clean images, both
    purified). The worst case is an oracle attacker's, who picks per image: its hit rate is at
    most the lowest purifier's. With the adaptive defence: its worst-case hit rate against the
    plain backdoor's. The random baseline (uniform noise within ±ε): does it fire, and does the
    backdoor hit more often than it. Each image's outcome is the share of its δ₀ seeds that hit;
    exact sign tests, Holm within each family (``purify/fires``, ``purify/lowers``,
    ``purify/still_fires``, ``purify/vs_random``, ``purify/adaptive``).
    Distances and fidelities are in the table, not stated as conclusions:
    a per-image extreme over purifiers differs from no purification by selection alone.
    Returns ``id``, ``verdict``, ``n``, ``sentence`` and ``no_hits`` per comparison.
    """
    found = Findings()

    def add(cid, family, a, b, label_a, label_b, metric):
        if not len(a):
            return
        c = compare(a, b, label_a=label_a, label_b=label_b, metric=metric, kind=RATE)
        found.add(cid, family, c, pct=True, no_hits=bool(not np.any(a) and not np.any(b)))

    mal = rows[rows["scenario"] == "mask"].assign(
        hit_protected=lambda d: d["hit_protected"].astype(float),
        hit_clean=lambda d: d["hit_clean"].astype(float),
        hit_purified_clean=lambda d: d["hit_purified_clean"].astype(float),
    )
    for (editor, method), d in mal.groupby(["editor", "method"], sort=False):
        who = editor if method == "backdoor" else f"{editor}, {method}"
        metric = f"the malicious hit rate ({who}; purify stage, edit of m)"
        none = _image_means(d, "none")
        if len(none):
            add(f"{editor}/{method}/fires", "purify/fires", none["hit_protected"].to_numpy(),
                none["hit_clean"].to_numpy(), "protected images", "clean images", metric)  # fmt: skip
        if method == "random":
            continue  # the baseline: whether it fires at all, and against the backdoor (below)
        for purifier in dict.fromkeys(d.loc[d["purifier"] != "none", "purifier"]):
            worst = purifier.startswith("worst")
            a, b = _paired(d, "hit_protected", purifier, "none")
            add(f"{editor}/{method}/{purifier}/vs_none", "purify/lowers", a, b, _said(purifier),
                "no purification", metric)  # fmt: skip
            p = _image_means(d, purifier)
            add(f"{editor}/{method}/{purifier}/fires", "purify/still_fires",
                p["hit_protected"].to_numpy(),
                p["hit_clean" if worst else "hit_purified_clean"].to_numpy(),
                f"protected images after {_said(purifier, False)}",
                "clean images" if worst else f"clean images after {purifier}", metric)  # fmt: skip
    plain = mal[mal["purifier"] == "none"]
    for editor in dict.fromkeys(plain.loc[plain["method"] == "random", "editor"]):
        d = plain[plain["editor"] == editor]
        wide = d.pivot_table(index="name", columns="method", values="hit_protected")
        if {"backdoor", "random"} <= set(wide):
            both = wide[["backdoor", "random"]].dropna()
            add(f"{editor}/backdoor/vs_random", "purify/vs_random", both["backdoor"].to_numpy(),
                both["random"].to_numpy(), "the backdoor", "random noise at the same budget",
                f"the malicious hit rate ({editor}, no purification)")  # fmt: skip
    if "backdoor_adaptive" in set(mal["method"]):
        for editor in dict.fromkeys(mal.loc[mal["method"] == "backdoor_adaptive", "editor"]):
            d = mal[(mal["editor"] == editor) & (mal["purifier"] == "worst:classical")]
            wide = d.pivot_table(index="name", columns="method", values="hit_protected")
            if {"backdoor", "backdoor_adaptive"} <= set(wide):
                both = wide[["backdoor_adaptive", "backdoor"]].dropna()
                add(f"{editor}/adaptive/worst:classical", "purify/adaptive",
                    both["backdoor_adaptive"].to_numpy(), both["backdoor"].to_numpy(), "the adaptive backdoor", "the plain backdoor",
                    f"the worst-case malicious hit rate ({editor})")  # fmt: skip
    return found.decide()


# ------------------------------------------------------------------------------- reports


def _ci(r: pd.Series, col: str, pct: bool = False) -> str:
    if r.get("status", "ok") != "ok":
        return "–"
    e = Estimate(float(r[col]), float(r[f"{col}_low"]), float(r[f"{col}_high"]), int(r["n_images"]))
    return e.format(pct=pct)


def markdown(table: pd.DataFrame, found: list[dict], settings: dict) -> str:
    """``results.md``: settings, the table per editor, the conclusions."""
    lines = [
        "# Purification before editing",
        "",
        "The attacker purifies the protected image, then edits it. Malicious edit: the protected "
        "region (`mask`); benign edit: the ring around it (`ring`). Hit: at least "
        f"{settings['hit_min_fraction']:.0%} of the region within {settings['hit_tol']} of the "
        "target in every channel. Means over images with 95 % intervals. **Worst case** "
        "(BlurGuard's convention): per image, the attacker's best purifier for each metric "
        "(lowest hit, highest PSNR/SSIM against the clean image's edit), then the mean over "
        "images; `none` is the reference and not part of it.",
        "",
        f"Images: {settings['n_images']}; budget ε = {settings['eps'] * 255:.1f}/255, "
        f"{settings['steps']} steps, δ₀ seed {settings['seed']}; editors: "
        f"{', '.join(settings['editors'])}; purifiers: {', '.join(settings['purifiers'])}.",
        "",
    ]
    header = (
        "| purifier | malicious hit rate | hit rate on p(clean) | fill-to-target MSE | "
        "malicious PSNR vs clean edit (dB) | benign ring PSNR vs clean edit (dB) | "
        "purified PSNR vs protected (dB) |"
    )
    for (editor, method), g in table.groupby(["editor", "method"], sort=False):
        lines += [f"## {editor}" + ("" if method == "backdoor" else f" ({method})"), ""]
        lines += [header, "|" + "---|" * 7]
        for purifier in dict.fromkeys(g["purifier"]):
            mal = g[(g["purifier"] == purifier) & (g["scenario"] == "mask")].iloc[0]
            ben = g[(g["purifier"] == purifier) & (g["scenario"] == "ring")].iloc[0]
            if mal["status"] != "ok":
                lines.append(f"| {purifier} | {mal['status']} | | | | | |")
                continue
            worst = purifier.startswith("worst")
            lines.append(
                f"| {'**' + purifier + '**' if worst else purifier} "
                f"| {_ci(mal, 'hit_protected', True)} "
                f"| {'–' if worst else _ci(mal, 'hit_purified_clean', True)} "
                f"| {_ci(mal, 'target_mse_protected')} | {_ci(mal, 'psnr_vs_clean_edit')} "
                f"| {_ci(ben, 'psnr_vs_clean_edit')} "
                f"| {'–' if worst or purifier == 'none' else _ci(mal, 'purified_psnr')} |"
            )
        lines.append("")
    directional = [c for c in found if c["verdict"] != "no difference"]
    lines += ["## Conclusions", ""]
    lines += [f"- {c['sentence']}" for c in directional] or ["- none with a direction"]
    rest = len(found) - len(directional)
    lines += [
        "",
        f"{rest} further comparisons showed no detectable difference (all in `conclusions.json`).",
        "",
    ]
    return "\n".join(lines)


def summarize(table: pd.DataFrame, status: pd.DataFrame, n_images: int) -> dict:
    """The flat ``metrics.json``: per editor, method, purifier and scenario the hit rate and
    the PSNR against the clean edit with their intervals; each diffusion purifier's availability."""
    out: dict = {"n_images": int(n_images)}
    for _, r in table[table["status"] == "ok"].iterrows():
        where = [r["editor"]] + ([] if r["method"] == "backdoor" else [r["method"]])
        where += [r["purifier"], r["scenario"]]
        for col, name in (
            ("hit_protected", "hit_rate"),
            ("psnr_vs_clean_edit", "psnr_vs_clean_edit"),
        ):
            for suffix in ("", "_low", "_high"):
                out[metric_key(*where, name) + suffix] = float(r[col + suffix])
    for _, r in status.iterrows():
        out[metric_key(r["purifier"], "available")] = r["status"] == "ok"
    return out


def _seed_key(group: tuple, seed) -> str:
    """The ``metrics.json`` key of an (editor, method)'s malicious hit rate without
    purification under δ₀ ``seed``, or of its range over seeds (``seed=None``)."""
    editor, method = group
    if seed is None:
        return metric_key(editor, method, "mask_hit_rate_seed_range")
    return metric_key(editor, method, f"seed{seed}", "mask_hit_rate")


def unpurified_seed_spread(per_edit: pd.DataFrame) -> dict:
    """Per editor and method run over several δ₀ seeds, the malicious hit rate without
    purification of each seed, and their range (``..._seed_range``): how much one seed moves it
    (:func:`runtime_backdoor.stats.seed_spread`)."""
    d = per_edit[(per_edit["purifier"] == "none") & (per_edit["scenario"] == "mask")]
    return seed_spread(d, ["editor", "method"], "hit_protected", _seed_key, min_seeds=2)


def purification_plot(table: pd.DataFrame):
    """Malicious hit rate (top) and benign ring PSNR against the clean edit (bottom) per
    purifier and editor, the worst cases last (right of the dashed line), with 95 % intervals."""
    t = table[(table["status"] == "ok")].copy()
    t["label"] = [
        e if m == "backdoor" else f"{e} ({m})"
        for e, m in zip(t["editor"], t["method"], strict=True)
    ]
    order = list(dict.fromkeys(t["purifier"]))
    order = [p for p in order if not p.startswith("worst")] + [
        p for p in order if p.startswith("worst")
    ]
    hue_order = list(dict.fromkeys(t["label"]))
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(order) + 2), 7.5))
    plain = sum(not p.startswith("worst") for p in order)
    for ax, (scenario, col, label, ylim) in zip(
        axes,
        (("mask", "hit_protected", "malicious (mask): share of images hit", (0, 1.02)),
         ("ring", "psnr_vs_clean_edit", "benign (ring): PSNR vs clean edit (dB)", None)),
        strict=True,
    ):  # fmt: skip
        d = t[t["scenario"] == scenario]
        sns.barplot(data=d, x="purifier", y=col, hue="label", order=order, hue_order=hue_order,
                    ax=ax, errorbar=None)  # fmt: skip
        interval_bars(ax, d, "purifier", col, hue_order, hue="label")
        if ylim:
            ax.set_ylim(*ylim)
        if plain < len(order):  # the worst cases, right of the line
            ax.axvline(plain - 0.5, color="grey", ls="--", lw=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=35, labelsize=8)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(labels),
               fontsize=8, frameon=False)  # fmt: skip
    return fig
