"""Text generated from the committed reports into the README and docs/results.md.

Two documents carry generated blocks, each between HTML comment markers
``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``: the README a short headline (``headline``);
docs/results.md the control's hit rates, each named by its definition (``control-rates``),
the families of comparisons and their multiplicity control (``families``), and every stated
conclusion (``conclusions``). ``python -m runtime_backdoor.docs_text`` rewrites them from the
working-tree reports; :func:`docs_match_committed` checks them against the reports as committed.

No stage imports this module (tests/test_contract.py checks it): editing how the docs are
written re-runs nothing.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from .control_rates import control_rates
from .stats import MIN_N, SIGN_TEST, Estimate, detectable_net_share


def markers(name: str) -> tuple[str, str]:
    """The comment lines that open and close the generated block ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


CONCLUSIONS_BEGIN, CONCLUSIONS_END = markers("conclusions")
HEADLINE_BEGIN, HEADLINE_END = markers("headline")
CONTROL_BEGIN, CONTROL_END = markers("control-rates")
FAMILIES_BEGIN, FAMILIES_END = markers("families")
PERFORMANCE_BEGIN, PERFORMANCE_END = markers("performance")

#: The stages' conclusions, in the order docs/results.md lists them. A file that neither the
#: commit nor the working tree has (its stage has not run yet) is named as such in the list.
CONCLUSION_FILES = (
    "reports/conclusions.json",
    "reports/beyond/conclusions.json",
    "reports/purification/conclusions.json",
    "reports/ensemble/conclusions.json",
)
#: What the other blocks read: the evaluate stage's metrics, the ε sweep's, the beyond stage's
#: tables of the control, and the parameters (``implant.eps``, ``beyond.seeds``).
REPORT_FILES = (
    "reports/metrics.json",
    "reports/eps_sweep.json",
    "reports/beyond/fair_masks.csv",
    "reports/beyond/baselines.csv",
    "params.yaml",
    "reports/stability.json",
    "reports/benchmarks/cpu.json",
    "reports/purification/table.csv",
    "reports/ensemble/table.csv",
)
#: Every file the generated text is made from.
DATA_FILES = CONCLUSION_FILES + REPORT_FILES
#: block name -> the document that holds it
GENERATED = {
    "headline": "README.md",
    "control-rates": "docs/results.md",
    "families": "docs/results.md",
    "performance": "docs/performance.md",
    "beyond-findings": "docs/beyond.md",
    "purify-findings": "docs/beyond.md",
    "ensemble-findings": "docs/beyond.md",
    "conclusions": "docs/results.md",
}
#: The beyond stage's label of the sensitive toy editor (params.yaml ``beyond.editors``).
CONTROL = "control"


def fragile_runs(stability: dict | None) -> dict[tuple[str, str], list[str]]:
    """(file, id) -> the stability runs (``reports/stability.json``) whose verdict differs from
    the verdict committed when they ran; an empty list where every run agreed."""
    out: dict[tuple[str, str], list[str]] = {}
    if not stability:
        return out
    runs = list(stability.get("seconds", {}))
    for row in stability.get("conclusions", []):
        out[(row["file"], row["id"])] = [v for v in runs if row.get(v) != row["committed"]]
    return out


def _tally(
    found: dict[str, list[dict]], stability: dict | None = None
) -> tuple[list[tuple[str, dict]], list[tuple[str, dict, str]], int, int]:
    """The stated conclusions (file, conclusion): directional in the committed run and in every
    run of ``stability``; the fragile ones (file, conclusion, why not stated): directional
    here but broken by a stability run, or not covered by it; how many comparisons showed no
    detectable difference; and how many had too few images (``n`` below :data:`stats.MIN_N`)
    for any direction. Without ``stability`` every directional conclusion is stated."""
    broken = fragile_runs(stability)
    stated, fragile, quiet, too_few = [], [], 0, 0
    for source, items in found.items():
        for c in items:
            if c["verdict"] != "no difference":
                runs = broken.get((source, c["id"]))
                if stability is None or runs == []:
                    stated.append((source, c))
                elif runs is None:
                    fragile.append((source, c, "not covered by the stability runs"))
                else:
                    fragile.append((source, c, "broken by " + ", ".join(f"`{r}`" for r in runs)))
            elif 0 < c.get("n", MIN_N) < MIN_N:
                too_few += 1
            else:
                quiet += 1
    return stated, fragile, quiet, too_few


def conclusions_block(
    found: dict[str, list[dict]], not_run: list[str] = (), stability: dict | None = None
) -> str:
    """docs/results.md's list of conclusions, from the stages' ``conclusions.json`` (file ->
    list): every stated one (directional here and in every stability run), then the fragile
    ones with the runs that broke them, how many comparisons showed no detectable difference,
    how many had too few images for any direction, and which files do not exist yet
    (``not_run``)."""
    stated, fragile, quiet, too_few = _tally(found, stability)
    lines = [CONCLUSIONS_BEGIN, ""]
    lines += [f"- {c['sentence']} (`{source}`: `{c['id']}`)." for source, c in stated]
    if fragile:
        lines += [
            "",
            f"**Fragile** ({len(fragile)}: directional in the committed run, not in every "
            "stability run; not stated as findings):",
            "",
        ]
        lines += [
            f"- `{c['id']}` (`{source}`): {c['verdict']} here, {why}." for source, c, why in fragile
        ]
    lines += [
        "",
        f"{quiet} further comparisons show no detectable difference (listed in the same files).",
    ]
    if too_few:
        lines.append(
            f"{too_few} more had fewer than {MIN_N} images, too few to show a direction at all."
        )
    if not_run:
        names = ", ".join(f"`{f}`" for f in not_run)
        lines.append(f"Not written yet (its stage has not run): {names}.")
    lines += ["", CONCLUSIONS_END]
    return "\n".join(lines)


def families_block(found: dict[str, list[dict]], stability: dict | None = None) -> str:
    """docs/results.md's table of the families of comparisons: each family's size, tests,
    directional and stated conclusions, and, for hit-rate families, the smallest net share of
    images the exact sign test can show after Holm at that size; then how many directions
    chance alone would give without and with the control."""
    stated_ids = {(s, c["id"]) for s, c in _tally(found, stability)[0]}
    fams: dict[str, dict] = {}
    for source, items in found.items():
        for c in items:
            f = fams.setdefault(c.get("family") or c["id"], {
                "file": source, "m": 0, "directional": 0, "stated": 0, "tests": set(), "n": 0,
            })  # fmt: skip
            f["m"] += 1
            f["n"] = max(f["n"], int(c.get("n", 0)))
            f["tests"].add(c.get("test", "?"))
            f["directional"] += c["verdict"] != "no difference"
            f["stated"] += (source, c["id"]) in stated_ids
    total = sum(f["m"] for f in fams.values())
    lines = [
        FAMILIES_BEGIN,
        "",
        "| family | file | comparisons | test | images | directional | stated | smallest detectable net share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in fams.items():
        tests = ", ".join(sorted(f["tests"]))
        power = "–"
        if tests == SIGN_TEST and f["n"]:
            share = detectable_net_share(f["n"], f["m"])
            power = "none at this n" if share == float("inf") else f"{share * 100:.0f}%"
        lines.append(
            f"| `{name}` | `{f['file']}` | {f['m']} | {tests} | {f['n']} | {f['directional']} "
            f"| {f['stated']} | {power} |"
        )
    lines += [
        "",
        f"{total} comparisons in {len(fams)} families. Had each been tested alone at 5 %, "
        f"about {total * 0.05:.1f} directions would be expected by chance alone if no effect "
        f"were real; with Holm's adjustment within each family, the chance of any false "
        f"direction is at most 5 % per family, so at most {len(fams) * 0.05:.1f} of the "
        f"{len(fams)} families would be expected to carry one.",
        "",
        FAMILIES_END,
    ]
    return "\n".join(lines)


def _estimate(d: dict, key: str, n: int) -> Estimate:
    return Estimate(d[key], d[f"{key}_low"], d[f"{key}_high"], n)


def headline_block(
    metrics: dict, sweep: dict, found: dict[str, list[dict]], eps: float,
    results: str = "docs/results.md", stability: dict | None = None,
) -> str:  # fmt: skip
    """The README's headline: the malicious hit rate (edit of the protected region *m*)
    clean -> protected on the pipeline's editor (``reports/metrics.json``), the toy control's
    ε-sweep hit rate (``reports/eps_sweep.json``), what protection against the pipeline's
    editor costs (``reports/metrics.json``: the implant stage's images against the originals),
    and how many conclusions ``results`` lists. 95 % intervals over images in brackets."""
    n = int(metrics["n_images"])
    clean = _estimate(metrics, "malicious_mask_hit_rate_clean", n).format(pct=True)
    protected = _estimate(metrics, "malicious_mask_hit_rate_protected", n).format(pct=True)
    control = _estimate(sweep, "control_hit_rate_at_paper_eps", int(sweep["n_images"]))
    psnr = _estimate(metrics, "protection_psnr", n).format(digits=1)
    linf = round(float(metrics["protection_linf_8bit_max"]))
    directional, fragile, quiet, too_few = _tally(found, stability)
    rest = f"{quiet} comparisons with no detectable difference"
    if fragile:
        rest = f"{len(fragile)} fragile (not stated), " + rest
    if too_few:
        rest += f" and {too_few} with too few images for any direction"
    lines = [
        HEADLINE_BEGIN,
        "",
        f"- **Miniature LaMa** (the pipeline's editor, trained here on a CPU): malicious hit rate "
        f"(edit of the protected region *m*) clean {clean} → protected {protected} over {n} "
        f"images (`reports/metrics.json`).",
        f"- **Toy control** (a deliberately sensitive stand-in, not an inpainter): ε-sweep hit "
        f"rate at {eps * 255:.1f}/255 over {int(sweep['control_seeds'])} δ₀ seeds: "
        f"{control.format(pct=True)} (`reports/eps_sweep.json`).",
        # reports/metrics.json's protection_* are the evaluate stage's measure of data/protected,
        # which the implant stage optimised against the pipeline's editor (the miniature LaMa)
        f"- **Cost of protecting** against the pipeline's editor, the miniature LaMa "
        f"(`reports/metrics.json`): PSNR {psnr} dB against the original, at most {linf}/255 "
        f"per pixel value, at ε = {eps:g} ({eps * 255:.1f}/255).",
        f"- **{len(directional)} directional conclusions** that hold on every stability run "
        f"(exact tests, Holm within each family), {rest}: [{results}]({results}).",
        "",
        HEADLINE_END,
    ]
    return "\n".join(lines)


def control_rates_block(sweep: dict, fair_masks: pd.DataFrame, baselines: pd.DataFrame,
                        seeds: int) -> str:  # fmt: skip
    """docs/results.md's table of the toy control's malicious hit rates: each a different
    measurement, named as the tutorial names them, with its definition and source. A rate is
    the mean over images of the share of δ₀ seeds whose edit is a hit (95 % interval over
    images); ``clean`` is the same rate on unprotected images where the stage measures it."""
    what = {
        "sweep": f"edit *m*, protected at the budget nearest 6.4/255, {int(sweep['control_seeds'])} δ₀ seeds",
        "mask": f"the same edit, the beyond stage's own protections at `implant.eps`, {seeds} δ₀ seeds",
        "official": "mean over the official malicious edits *m*, *E(m)* and the incomplete mask",
        "fair": "mean over the masks drawn from the content alone (boxes, brush strokes, hulls, ellipses)",
    }  # fmt: skip
    source = {
        "sweep": "`reports/eps_sweep.json`: `control_hit_rate_at_paper_eps`",
        "mask": "`reports/beyond/fair_masks.csv`: scenario `mask`",
        "official": "`reports/beyond/baselines.csv`: family `official`",
        "fair": "`reports/beyond/baselines.csv`: family `fair`",
    }

    def rate(r: dict, side: str) -> str:
        if r[side] != r[side]:  # NaN: the stage does not measure it
            return "–"
        return Estimate(r[side], r[f"{side}_low"], r[f"{side}_high"], r["n_images"]).format(pct=True)  # fmt: skip

    # the rates and their names: control_rates.control_rates, as the tutorial shows them
    rows = [
        (r["name"].replace("edit m", "edit *m*"), what[r["key"]], source[r["key"]],
         rate(r, "clean"), rate(r, "protected"))
        for r in control_rates(sweep, fair_masks, baselines, CONTROL)
    ]  # fmt: skip
    lines = [
        CONTROL_BEGIN,
        "",
        "| name | what is measured | source | clean | protected |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
        CONTROL_END,
    ]
    return "\n".join(lines)


#: The CPU benchmark's before/after comparisons docs/performance.md states (case -> words).
SPEED_UPS = {
    "mini-128-separate": ("The three loss passes as one batched call",
                          "than one pass at a time, 128 px"),
    "mini-256-separate": (None, "at 256 px"),
    "mini-128-unfolded": ("BatchNorm folded into the convolutions, channels-last on the CPU "
                          "(the LaMa editor's default, `editors.lama.fold_batchnorm`, the same "
                          "outputs to 1e-7, tested)", "than unfolded, 128 px"),
    "mini-256-unfolded": (None, "at 256 px"),
    "mini-128-x6": ("Six images per call", "per image than one image per call, because a batch "
                    "of one leaves the two cores idle between many small operations"),
}  # fmt: skip


def performance_block(cpu: dict) -> str:
    """docs/performance.md's list of what made the miniature fast on a CPU: each comparison of
    :data:`SPEED_UPS` from ``reports/benchmarks/cpu.json`` (time of the slower variant over the
    faster one, and the working memory), in the benchmark's own words."""
    found = {c["case"]: c for c in cpu.get("comparisons", [])}
    lines, item = [PERFORMANCE_BEGIN], None
    for case, (title, what) in SPEED_UPS.items():
        c = found.get(case)
        if c is None:
            continue
        # comparisons are case / reference; the adopted variant is the faster one
        adopted_is_reference = c["time_ratio"] >= 1
        ratio = c["time_ratio"] if adopted_is_reference else 1 / c["time_ratio"]
        memory = (
            1 / c["working_memory_ratio"] if adopted_is_reference else c["working_memory_ratio"]
        )
        part = f"{ratio:.2f}× less time {what}"
        if title is not None:
            if item:
                lines.append(item + ".")
            item = f"- **{title}**: {part}, at {memory:.2f}× the working memory"
        else:
            item += f"; {part}"
    if item:
        lines.append(item + ".")
    lines += [
        "",
        "(`reports/benchmarks/cpu.json`, `comparisons`: each measured before and after in one run.)",
        PERFORMANCE_END,
    ]
    return "\n".join(lines)


def _rate(row, col: str) -> str:
    return Estimate(row[col], row[f"{col}_low"], row[f"{col}_high"], int(row["n_images"])).format(
        pct=True
    )


def findings_block(
    name: str, file: str, found: dict[str, list[dict]], stability: dict | None,
    rates: list[str] = (),
) -> str:  # fmt: skip
    """A stage's findings for its page: ``rates`` (lines from its tables), then its stated
    conclusions (directional here and in every stability run) and, by id, its fragile ones."""
    stated, fragile, quiet, _ = _tally({file: found.get(file, [])}, stability)
    begin, end = markers(name)
    lines = [begin, "", *rates]
    if rates:
        lines.append("")
    lines.append(f"Stated (`{file}`; exact tests, Holm within each family, every stability run):")
    lines.append("")
    lines += [f"- {c['sentence']} (`{c['id']}`)." for _, c in stated] or ["- none."]
    if fragile:
        lines += ["", "Fragile, not stated: " + ", ".join(
            f"`{c['id']}` ({c['verdict']} here, {why})" for _, c, why in fragile) + "."]  # fmt: skip
    lines += ["", f"{quiet} further comparisons show no detectable difference.", "", end]
    return "\n".join(lines)


def purify_rates(table: pd.DataFrame) -> list[str]:
    """Each editor and method's malicious hit rate with no purification and in the per-image
    worst case (BlurGuard's rule), against the clean images' rate."""
    d = table[(table["scenario"] == "mask") & (table["status"] == "ok")]
    lines = ["| editor | method | clean | protected | worst classical purifier (per image) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (editor, method), g in d.groupby(["editor", "method"], sort=False):
        g = g.set_index("purifier")
        if "none" not in g.index:
            continue
        none = g.loc["none"]
        worst = (
            _rate(g.loc["worst:classical"], "hit_protected")
            if "worst:classical" in g.index
            else "–"
        )
        lines.append(
            f"| {editor} | {method} | {_rate(none, 'hit_clean')} | {_rate(none, 'hit_protected')} "
            f"| {worst} |"
        )
    return lines + ["", "(malicious hit rate, edit of *m*; `reports/purification/table.csv`)"]


def ensemble_rates(table: pd.DataFrame) -> list[str]:
    """Each edited editor's hit rate under each protection, and its clean rate."""
    lines = ["| edited with | clean | alone | left out | all |", "|---|---|---|---|---|"]
    for editor, g in table.groupby("editor", sort=False):
        g = g.set_index("protection")
        cells = [
            _rate(g.loc[p], "hit") if p in g.index else "–" for p in ("alone", "without", "all")
        ]
        clean = _rate(g.iloc[0], "hit_clean") if "hit_clean" in g else "–"
        lines.append(f"| {editor} | {clean} | " + " | ".join(cells) + " |")
    return lines + ["", "(hit rate of the edit of *m*; `reports/ensemble/table.csv`)"]


def committed_text(root: str | Path, relative: str) -> str | None:
    """``relative`` (a path under ``root``) as committed: ``git show HEAD:./relative`` when
    ``root`` is in a git checkout whose HEAD has the file; otherwise the working-tree file;
    None when neither exists."""
    root = Path(root)
    try:
        got = subprocess.run(
            ["git", "-C", str(root), "show", f"HEAD:./{relative}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    except OSError:  # no git
        got = None
    if got is not None and got.returncode == 0:
        return got.stdout
    path = root / relative
    return path.read_text() if path.exists() else None


def generated_blocks(texts: dict[str, str | None]) -> tuple[dict[str, str], list[str]]:
    """Every generated block (name -> text, :data:`GENERATED`) from the data files' texts
    (path -> text, None when missing), and the problems (missing files of
    :data:`REPORT_FILES`) that kept any block from being made. A missing conclusions file is
    no problem: the list says it has not been written yet."""
    missing = [f"{f}: missing" for f in REPORT_FILES if texts.get(f) is None]
    if missing:
        return {}, missing
    found = {f: json.loads(texts[f]) for f in CONCLUSION_FILES if texts.get(f) is not None}
    not_run = [f for f in CONCLUSION_FILES if texts.get(f) is None]
    params = yaml.safe_load(texts["params.yaml"])
    metrics = json.loads(texts["reports/metrics.json"])
    sweep = json.loads(texts["reports/eps_sweep.json"])
    fair_masks = pd.read_csv(io.StringIO(texts["reports/beyond/fair_masks.csv"]))
    baselines = pd.read_csv(io.StringIO(texts["reports/beyond/baselines.csv"]))
    stability = json.loads(texts["reports/stability.json"])
    eps = float(params["implant"]["eps"])
    return {
        "headline": headline_block(metrics, sweep, found, eps, stability=stability),
        "control-rates": control_rates_block(
            sweep, fair_masks, baselines, int(params["beyond"]["seeds"])
        ),
        "families": families_block(found, stability),
        "performance": performance_block(json.loads(texts["reports/benchmarks/cpu.json"])),
        "beyond-findings": findings_block(
            "beyond-findings", "reports/beyond/conclusions.json", found, stability
        ),
        "purify-findings": findings_block(
            "purify-findings",
            "reports/purification/conclusions.json",
            found,
            stability,
            purify_rates(pd.read_csv(io.StringIO(texts["reports/purification/table.csv"]))),
        ),
        "ensemble-findings": findings_block(
            "ensemble-findings",
            "reports/ensemble/conclusions.json",
            found,
            stability,
            ensemble_rates(pd.read_csv(io.StringIO(texts["reports/ensemble/table.csv"]))),
        ),
        "conclusions": conclusions_block(found, not_run, stability),
    }, []


def replace_block(text: str, name: str, block: str) -> str:
    """``text`` with its generated block ``name`` (markers included) replaced by ``block``;
    ValueError when a marker is missing."""
    begin, end = markers(name)
    if begin not in text or end not in text:
        raise ValueError(f"no {begin} ... {end} block")
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + block + text[stop:]


def update_docs(root: str | Path = ".") -> list[str]:
    """Rewrite the generated blocks (:data:`GENERATED`) from the working-tree reports under
    ``root``; returns the documents whose text changed. Run it when about to commit new
    reports, and commit the documents with them."""
    root = Path(root)
    texts = {f: (root / f).read_text() if (root / f).exists() else None for f in DATA_FILES}
    blocks, problems = generated_blocks(texts)
    if problems:
        raise FileNotFoundError("; ".join(problems))
    changed = []
    for doc in dict.fromkeys(GENERATED.values()):
        path = root / doc
        text = path.read_text()
        new = text
        for name, holder in GENERATED.items():
            if holder == doc:
                new = replace_block(new, name, blocks[name])
        if new != text:
            path.write_text(new)
            changed.append(doc)
    return changed


def docs_match_committed(root: str | Path = ".") -> list[str]:
    """Problems (none: ``[]``) with the generated blocks of the README and docs/results.md.

    Each document, as it is in the working tree, must hold the blocks that the reports *as
    committed* give (:func:`committed_text`: ``git show HEAD:...`` in a git checkout, else
    the files). A pipeline run rewrites the working-tree reports (on another CPU, in their
    last digits) but not the documents, so the check still passes after ``make reproduce``
    anywhere; a block refreshed from reports that are not committed yet
    (``python -m runtime_backdoor.reporting``) fails until both are committed together, and
    so does a block edited by hand.
    """
    root = Path(root)
    blocks, problems = generated_blocks({f: committed_text(root, f) for f in DATA_FILES})
    for name, doc in GENERATED.items():
        path = root / doc
        if not path.exists():
            problems.append(f"{doc}: missing")
            continue
        text = path.read_text()
        begin, end = markers(name)
        if begin not in text or end not in text:
            problems.append(f"{doc}: no {begin} ... {end} block")
            continue
        if name not in blocks:
            continue
        start, stop = text.index(begin), text.index(end) + len(end)
        stated, expected = text[start:stop].splitlines(), blocks[name].splitlines()
        for i, (a, b) in enumerate(zip(stated, expected, strict=False)):
            if a != b:
                problems.append(
                    f"{doc} {name} block line {i + 1} states {a!r}; the committed reports "
                    f"give {b!r}"
                )
                break
        else:
            if len(stated) != len(expected):
                problems.append(
                    f"{doc} {name} block has {len(stated)} lines; the committed reports give "
                    f"{len(expected)}"
                )
    if any(p.startswith(tuple(GENERATED.values())) for p in problems):
        problems.append(
            "refresh them with `python -m runtime_backdoor.reporting` and commit them together "
            "with the reports they are made from"
        )
    return problems


__all__ = [
    "CONCLUSION_FILES",
    "DATA_FILES",
    "GENERATED",
    "REPORT_FILES",
    "committed_text",
    "conclusions_block",
    "control_rates_block",
    "docs_match_committed",
    "families_block",
    "findings_block",
    "performance_block",
    "fragile_runs",
    "generated_blocks",
    "headline_block",
    "markers",
    "replace_block",
    "update_docs",
]


if __name__ == "__main__":  # python -m runtime_backdoor.docs_text [ROOT]: refresh the docs
    import sys

    # From the working-tree reports: run it when about to commit new reports, and commit the
    # README and docs/results.md with them (the tests compare them with the committed reports).
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")
    changed = update_docs(root)
    for doc in dict.fromkeys(GENERATED.values()):
        print(f"{doc} {'updated' if doc in changed else 'unchanged'}")
