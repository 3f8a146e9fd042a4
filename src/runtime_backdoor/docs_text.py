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

from .stats import MIN_N, Estimate


def markers(name: str) -> tuple[str, str]:
    """The comment lines that open and close the generated block ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


CONCLUSIONS_BEGIN, CONCLUSIONS_END = markers("conclusions")
HEADLINE_BEGIN, HEADLINE_END = markers("headline")
CONTROL_BEGIN, CONTROL_END = markers("control-rates")

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
)
#: Every file the generated text is made from.
DATA_FILES = CONCLUSION_FILES + REPORT_FILES
#: block name -> the document that holds it
GENERATED = {
    "headline": "README.md",
    "control-rates": "docs/results.md",
    "conclusions": "docs/results.md",
}
#: The beyond stage's label of the sensitive toy editor (params.yaml ``beyond.editors``).
CONTROL = "control"


def _tally(found: dict[str, list[dict]]) -> tuple[list[tuple[str, dict]], int, int]:
    """The directional conclusions (file, conclusion), how many comparisons showed no
    detectable difference, and how many had too few images (``n`` below
    :data:`stats.MIN_N`) for any direction."""
    directional, quiet, too_few = [], 0, 0
    for source, items in found.items():
        for c in items:
            if c["verdict"] != "no difference":
                directional.append((source, c))
            elif 0 < c.get("n", MIN_N) < MIN_N:
                too_few += 1
            else:
                quiet += 1
    return directional, quiet, too_few


def conclusions_block(found: dict[str, list[dict]], not_run: list[str] = ()) -> str:
    """docs/results.md's list of conclusions, from the stages' ``conclusions.json`` (file ->
    list): every directional one, then how many comparisons showed no detectable
    difference, how many had too few images for any direction, and which files do not exist
    yet (``not_run``)."""
    directional, quiet, too_few = _tally(found)
    lines = [CONCLUSIONS_BEGIN, ""]
    lines += [f"- {c['sentence']} (`{source}`: `{c['id']}`)." for source, c in directional]
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


def _estimate(d: dict, key: str, n: int) -> Estimate:
    return Estimate(d[key], d[f"{key}_low"], d[f"{key}_high"], n)


def headline_block(
    metrics: dict, sweep: dict, found: dict[str, list[dict]], eps: float,
    results: str = "docs/results.md",
) -> str:  # fmt: skip
    """The README's headline: the malicious hit rate (edit of the protected region *m*)
    clean -> protected on the pipeline's editor (``reports/metrics.json``), the toy control's
    ε-sweep hit rate (``reports/eps_sweep.json``), what protection costs, and how many
    conclusions ``results`` lists. 95 % intervals over images in brackets."""
    n = int(metrics["n_images"])
    clean = _estimate(metrics, "malicious_mask_hit_rate_clean", n).format(pct=True)
    protected = _estimate(metrics, "malicious_mask_hit_rate_protected", n).format(pct=True)
    control = _estimate(sweep, "control_hit_rate_at_paper_eps", int(sweep["n_images"]))
    psnr = _estimate(metrics, "protection_psnr", n).format(digits=1)
    linf = round(float(metrics["protection_linf_8bit_max"]))
    directional, quiet, too_few = _tally(found)
    rest = f"{quiet} comparisons with no detectable difference"
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
        f"- **Cost of protecting**: PSNR {psnr} dB against the original, at most {linf}/255 "
        f"per pixel value, at ε = {eps:g} ({eps * 255:.1f}/255).",
        f"- **{len(directional)} directional conclusions** and {rest}: [{results}]({results}).",
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
    n = int(sweep["n_images"])
    rows = [(
        "ε-sweep hit rate",
        f"edit *m*, protected at the budget nearest 6.4/255, {int(sweep['control_seeds'])} δ₀ seeds",
        "`reports/eps_sweep.json`: `control_hit_rate_at_paper_eps`",
        "–",
        _estimate(sweep, "control_hit_rate_at_paper_eps", n).format(pct=True),
    )]  # fmt: skip

    def rate(row, side: str) -> str:
        return Estimate(row[f"hit_rate_{side}"], row[f"hit_rate_{side}_low"],
                        row[f"hit_rate_{side}_high"], int(row["n_images"])).format(pct=True)  # fmt: skip

    fm = fair_masks[(fair_masks["source"] == CONTROL) & (fair_masks["scenario"] == "mask")]
    for _, r in fm.iterrows():
        rows.append((
            "beyond: hit rate, edit *m*",
            f"the same edit, the beyond stage's own protections at `implant.eps`, {seeds} δ₀ seeds",
            "`reports/beyond/fair_masks.csv`: scenario `mask`",
            rate(r, "clean"), rate(r, "protected"),
        ))  # fmt: skip
    bl = baselines[(baselines["source"] == CONTROL) & (baselines["method"] == "backdoor")]
    bl = bl[bl["kind"] == "malicious"]
    for family, name, what in (
        ("official", "beyond: official malicious hit rate",
         "mean over the official malicious edits *m*, *E(m)* and the incomplete mask"),
        ("fair", "beyond: fair-mask malicious hit rate",
         "mean over the masks drawn from the content alone (boxes, brush strokes, hulls, ellipses)"),
    ):  # fmt: skip
        for _, r in bl[bl["family"] == family].iterrows():
            rows.append((name, what, f"`reports/beyond/baselines.csv`: family `{family}`",
                         rate(r, "clean"), rate(r, "protected")))  # fmt: skip
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
    return {
        "headline": headline_block(metrics, sweep, found, float(params["implant"]["eps"])),
        "control-rates": control_rates_block(
            sweep, fair_masks, baselines, int(params["beyond"]["seeds"])
        ),
        "conclusions": conclusions_block(found, not_run),
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
