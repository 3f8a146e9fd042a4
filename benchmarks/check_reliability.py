"""``check``, measured: how often its prediction agrees with the verified outcome.

``runtime-backdoor check`` predicts from a first-order estimate (the editor's gain against the
gain needed to reach the target within ε) whether protection will work. This benchmark
protects every embedded image (``data/raw``, prepared at 128 px in a scratch folder with
:func:`runtime_backdoor.pipeline.prepare.prepare`) against each editor at each budget, exactly
as ``runtime-backdoor protect`` does (20 steps, seed 0, the expansion kernel scaled with the
size), writes the 8-bit PNG, and verifies it as ``protect`` does
(:func:`runtime_backdoor.owner.verify_protection`). *Worked* = the verdict is ``protected``
or ``protected, with a side effect on benign edits`` (the malicious edit of the protected
image hits the target and the original's does not); check's prediction is *likely* when
gain >= needed.

Editors: the toy control at several gains (``global-mix``, reach 8; gain 800 is
``toy-control``), ``blur-fill`` and the trained miniature (``mini-lama``, when
``models/editor/mini-lama.safetensors`` is there: ``.venv/bin/dvc pull editor``). Budgets:
4, 6.4 (the paper's) and 16 in 8-bit units.

Rates are over images, the sampled unit (:mod:`runtime_backdoor.stats`): each image's cases
are averaged first, then a 95 % interval over the images (percentile bootstrap, Wilson for a
constant 0/1 rate); the counts of the confusion table pool every case.

    .venv/bin/python benchmarks/check_reliability.py            # about 6-8 min on 2 cores
    .venv/bin/python benchmarks/check_reliability.py --images 2 --out /tmp/x   # a smoke run

writes ``reports/check_reliability.json`` and ``reports/check_reliability.md``. The numbers
``check`` prints with every prediction are :data:`runtime_backdoor.owner.CHECK_RELIABILITY`,
generated from that JSON (``--constant`` prints the block to paste;
``tests/test_owner.py`` checks that the two agree).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
BUDGETS_8BIT = (4.0, 6.4, 16.0)
TOY_GAINS = (100.0, 200.0, 400.0, 800.0)
MINIATURE = ROOT / "models" / "editor" / "mini-lama.safetensors"
STEPS, SEED = 20, 0


def editors(miniature: Path | None = MINIATURE) -> list[tuple[str, str, Path | None, dict]]:
    """(label, registry name, weights, options) of every editor measured."""
    out = [
        (
            "toy-control" if gain == 800 else f"toy gain {gain:g}",
            "global-mix",
            None,
            {"gain": gain, "reach": 8},
        )
        for gain in TOY_GAINS
    ]
    out.append(("blur-fill", "blur-fill", None, {}))
    if miniature is not None and Path(miniature).is_file():
        out.append(("mini-lama", "mini-lama", Path(miniature), {}))
    return out


def prepared(raw: Path, scratch: Path, limit: int = 0) -> list[tuple[str, str, Path, Path]]:
    """(name, content, image, mask) of the embedded images at 128 px in ``scratch``."""
    from runtime_backdoor.pipeline.prepare import prepare

    if not (raw / "manifest.csv").is_file():
        sys.exit(f"{raw} holds no images: run `.venv/bin/dvc pull data.dvc` first")
    manifest = prepare(raw, scratch, size=128, limit=limit)
    return [
        (r.name, r.content, scratch / f"{r.name}.png", scratch / f"{r.name}_mask.png")
        for r in manifest.itertuples()
    ]


def measure(images, chosen, budgets, out_dir: Path, progress: bool = True):
    """One row per (editor, budget, image): check's prediction and the verified outcome."""
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from runtime_backdoor import owner
    from runtime_backdoor.editors import build_editor

    device = torch.device("cpu")
    rows = []
    cases = [(e, b, i) for e in chosen for b in budgets for i in images]
    built = {}
    for (label, name, weights, options), budget, (image, content, path, mask) in tqdm(
        cases, desc="check vs protect", disable=not progress
    ):
        if label not in built:
            built[label] = build_editor(name, weights=weights, **options)
        editor = built[label]
        x, m, target = owner.read_inputs(path, mask)
        eps = budget / 255
        start = time.perf_counter()
        check = owner.check_image(editor, x, m, target, device, eps=eps)
        report, protected = owner.protect_image(
            editor, x, m, target, device, eps=eps, steps=STEPS, expand=None, seed=SEED
        )
        written = out_dir / f"{label.replace(' ', '_')}_{budget:g}_{image}.png"
        owner.write_output(written, protected, overwrite=True)
        verdict = owner.verify_protection(
            editor, x, m, target, device, written, expand=report["expand"]
        )
        rows.append(
            {
                "editor": label,
                "eps_8bit": budget,
                "name": image,
                "content": content,
                "gain": check["gain"],
                "needed": check["needed"],
                "predicted": check["gain"] >= check["needed"],
                "verdict": verdict["verdict"],
                "worked": verdict["verdict"] in (owner.PROTECTED, owner.SIDE_EFFECT),
                "hit_fraction": verdict["hit_fraction"],
                "hit_fraction_original": verdict["hit_fraction_original"],
                "ring_psnr_vs_original_edit": verdict["ring_psnr_vs_original_edit"],
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    return pd.DataFrame(rows)


def _estimate(df, column: str, where=None) -> dict:
    """Rate of ``column`` over images (each image's cases averaged first), with its interval."""
    from runtime_backdoor import stats

    part = df if where is None else df[where]
    per_image = part.groupby("name")[column].mean()
    e = stats.estimate(per_image.to_numpy(dtype=float))
    return {
        "rate": round(e.mean, 4),
        "low": round(e.low, 4),
        "high": round(e.high, 4),
        "images": e.n,
        "cases": int(len(part)),
        "text": e.format(pct=True),
    }


def summarise(df, seconds: float) -> dict:
    """The confusion table, agreement, PPV and NPV overall and per editor and budget."""
    df = df.assign(correct=df["predicted"] == df["worked"])
    likely, worked = df["predicted"], df["worked"]
    confusion = {
        "likely_worked": int((likely & worked).sum()),
        "likely_not": int((likely & ~worked).sum()),
        "unlikely_worked": int((~likely & worked).sum()),
        "unlikely_not": int((~likely & ~worked).sum()),
    }
    per_config = []
    for (editor, budget), g in df.groupby(["editor", "eps_8bit"], sort=False):
        per_config.append(
            {
                "editor": editor,
                "eps_8bit": budget,
                "images": int(len(g)),
                "predicted_likely": int(g["predicted"].sum()),
                "worked": int(g["worked"].sum()),
                "agree": int(g["correct"].sum()),
                "agreement": _estimate(g, "correct")["text"],
                "median_gain": round(float(g["gain"].median()), 2),
                "median_needed": round(float(g["needed"].median()), 2),
            }
        )
    return {
        "what": "check's prediction (gain >= needed: likely) against the verified outcome of "
        "protect (worked: protected, or protected with a side effect on benign edits)",
        "images": int(df["name"].nunique()),
        "image_size": 128,
        "editors": list(dict.fromkeys(df["editor"])),
        "budgets_8bit": sorted(set(df["eps_8bit"])),
        "steps": STEPS,
        "seed": SEED,
        "cases": int(len(df)),
        "confusion": confusion,
        "agreement": _estimate(df, "correct"),
        "ppv": _estimate(df, "worked", likely),  # worked, when check said likely
        "npv": _estimate(df.assign(failed=~worked), "failed", ~likely),  # did not, when unlikely
        "per_config": per_config,
        "method": "rates over images: each image's cases averaged, then a 95% interval over "
        "the images (runtime_backdoor.stats.estimate: percentile bootstrap, Wilson for a "
        "constant 0/1 rate); the confusion table counts every case",
        "seconds": round(seconds, 1),
    }


def markdown(s: dict) -> str:
    c = s["confusion"]
    lines = [
        "# check, measured: its prediction against the verified outcome",
        "",
        f"{s['cases']} cases: {s['images']} embedded images at {s['image_size']} px × "
        f"{len(s['editors'])} editors ({', '.join(s['editors'])}) × budgets "
        f"{', '.join(f'{b:g}' for b in s['budgets_8bit'])}/255; protect with {s['steps']} "
        f"steps, seed {s['seed']}, then the verdict on the written PNG. Generated by "
        f"`benchmarks/check_reliability.py` in {s['seconds']:.0f} s.",
        "",
        "| check said | worked | did not work |",
        "|---|---|---|",
        f"| likely | {c['likely_worked']} | {c['likely_not']} |",
        f"| unlikely | {c['unlikely_worked']} | {c['unlikely_not']} |",
        "",
        f"- agreement: {s['agreement']['text']} ({s['agreement']['cases']} cases)",
        f"- when check said *likely*, protection worked: {s['ppv']['text']} "
        f"({s['ppv']['cases']} cases, {s['ppv']['images']} images)",
        f"- when check said *unlikely*, protection did not work: {s['npv']['text']} "
        f"({s['npv']['cases']} cases, {s['npv']['images']} images)",
        "",
        f"Intervals: 95 %, {s['method']}.",
        "",
        "| editor | budget /255 | images | check: likely | worked | agree | agreement | "
        "median gain | median needed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["per_config"]:
        lines.append(
            f"| {r['editor']} | {r['eps_8bit']:g} | {r['images']} | {r['predicted_likely']} | "
            f"{r['worked']} | {r['agree']} | {r['agreement']} | {r['median_gain']:g} | "
            f"{r['median_needed']:g} |"
        )
    lines += [
        "",
        "These editors are a toy control and two insensitive ones: the table says how far "
        "check's first-order estimate can be trusted on them, not on real editors (LaMa, MAT, "
        "SD), which were not measured here.",
        "",
    ]
    return "\n".join(lines)


def constant(s: dict) -> str:
    """The block of ``runtime_backdoor/owner.py`` that ``check`` prints from."""
    keep = {
        "source": "reports/check_reliability.json (benchmarks/check_reliability.py)",
        "cases": s["cases"],
        "images": s["images"],
        "editors": s["editors"],
        "budgets_8bit": s["budgets_8bit"],
        "agreement": s["agreement"]["text"],
        "ppv": s["ppv"]["text"],
        "ppv_cases": s["ppv"]["cases"],
        "npv": s["npv"]["text"],
        "npv_cases": s["npv"]["cases"],
    }
    return "CHECK_RELIABILITY = " + json.dumps(keep, indent=4, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, default=ROOT / "data" / "raw")
    parser.add_argument("--out", type=Path, default=ROOT / "reports", help="folder of the reports")
    parser.add_argument("--images", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS_8BIT))
    parser.add_argument("--no-miniature", action="store_true", help="skip mini-lama")
    parser.add_argument("--constant", action="store_true", help="print owner.py's block")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    chosen = editors(None if args.no_miniature else MINIATURE)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="check-reliability-") as tmp:
        scratch = Path(tmp)
        images = prepared(args.raw, scratch / "prepared", args.images)
        (scratch / "protected").mkdir()
        df = measure(images, chosen, budgets, scratch / "protected", progress=not args.quiet)
    summary = summarise(df, time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    summary["rows"] = df.to_dict("records")
    (args.out / "check_reliability.json").write_text(
        json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
    )
    (args.out / "check_reliability.md").write_text(markdown(summary))
    print(markdown(summary))
    if args.constant:
        print(constant(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
