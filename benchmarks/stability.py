"""Do the study's numbers and conclusions survive another CPU path and another δ₀ seed?

Re-runs the whole DVC pipeline (embedded default) in scratch copies of the project, once
per variant, and compares each variant's reports with the committed ones:

- ``blas``: ``MKL_CBWR=COMPATIBLE`` (MKL's vendor-neutral kernels; how a different CPU is
  imitated on one machine), every parameter unchanged;
- ``seed``: ``implant.seed`` + 1 (a different δ₀ for every protection), default kernels.

For every headline number it gives the committed value with its 95 % interval, each
variant's value and whether that value lies inside the committed interval; for every
comparison of every stage's ``conclusions.json`` (:data:`runtime_backdoor.docs_text.CONCLUSION_FILES`)
the verdict each variant reaches. A directional conclusion is stated in the README and docs
only when every variant reaches the committed verdict; the others are listed there as fragile
with the runs that broke them (:mod:`runtime_backdoor.docs_text`).
Writes ``reports/stability.md`` and ``reports/stability.json``.

``--parallel`` runs the variants at the same time, one thread each (on 2 cores about the time
of one run at two threads).

    python benchmarks/stability.py            # both variants (two pipeline runs)
    python benchmarks/stability.py --variants blas --keep /tmp/stab
    python benchmarks/stability.py --parallel
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from runtime_backdoor.docs_text import CONCLUSION_FILES
from runtime_backdoor.runs import copy_project

ROOT = Path(__file__).resolve().parents[1]
COPY = (
    "dvc.yaml",
    "dvc.lock",
    "params.yaml",
    "data.dvc",
    ".dvc/config",
    ".dvcignore",
    "notebooks",
    "src",
    "dvc-store",
)
VARIANTS = {
    "blas": ({"MKL_CBWR": "COMPATIBLE"}, {}),
    "seed": ({}, {"implant.seed": +1}),
}
#: The flat metric files whose headline numbers are compared (path -> keys).
HEADLINES = {
    "reports/metrics.json": [
        "malicious_mask_hit_rate_protected", "malicious_mask_target_mse_protected",
        "malicious_mask_psnr_region_vs_clean_edit", "benign_ring_psnr_region_vs_clean_edit",
        "benign_elsewhere_psnr_region_vs_clean_edit", "protection_psnr", "protection_ssim",
    ],
    "reports/eps_sweep.json": [
        "control_hit_rate_at_paper_eps", "mini-lama_hit_rate_at_paper_eps",
        "blur-fill_hit_rate_at_paper_eps",
    ],
    "reports/beyond/metrics.json": [
        "pipeline_backdoor_mask_hit_rate", "control_backdoor_mask_hit_rate",
        "control_backdoor_fair_box_hit_rate", "control_backdoor_malicious_jpeg95_hit_rate",
        "control_backdoor_malicious_blur1_hit_rate", "control_markpainting_malicious_official_hit_rate",
        "control_markpainting_benign_official_hit_rate", "control_backdoor_benign_official_hit_rate",
    ],
    "reports/purification/metrics.json": [
        "control_none_mask_hit_rate", "control_worstclassical_mask_hit_rate",
        "control_random_none_mask_hit_rate", "control_backdoor_adaptive_worstclassical_mask_hit_rate",
    ],
    "reports/ensemble/metrics.json": [
        "c0_alone_hit_rate", "c0_without_hit_rate", "c0_all_hit_rate", "c2_all_ring_psnr",
    ],
}  # fmt: skip
CONCLUSIONS = CONCLUSION_FILES


def scratch_copy(dest: Path) -> None:
    copy_project(ROOT, dest, COPY)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def run_variant(dest: Path, env_extra: dict, shifts: dict, threads: int = 0) -> float:
    scratch_copy(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for key, delta in shifts.items():
        section, name = key.split(".")
        params[section][name] = params[section][name] + delta
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    dvc = str(bin_dir / "dvc")
    start = time.perf_counter()
    subprocess.run([dvc, "pull", "-q", "data.dvc"], cwd=dest, env=env, check=True)
    # The trained miniature from the remote when its parameters match (as `make reproduce`).
    subprocess.run([dvc, "pull", "-q", "editor"], cwd=dest, env=env, check=False)
    subprocess.run([dvc, "repro", "-q"], cwd=dest, env=env, check=True)
    return time.perf_counter() - start


def load(root: Path, rel: str):
    path = root / rel
    return json.loads(path.read_text()) if path.exists() else None


def compare_runs(variants: dict[str, Path]) -> dict:
    numbers, verdicts = [], []
    for rel, keys in HEADLINES.items():
        base = load(ROOT, rel) or {}
        others = {v: load(p, rel) or {} for v, p in variants.items()}
        for key in keys:
            if key not in base:
                continue
            row = {
                "file": rel, "key": key, "committed": base[key],
                "low": base.get(f"{key}_low"), "high": base.get(f"{key}_high"),
            }  # fmt: skip
            for v, other in others.items():
                value = other.get(key)
                row[v] = value
                inside = None
                if value is not None and row["low"] is not None:
                    inside = row["low"] - 1e-9 <= value <= row["high"] + 1e-9
                row[f"{v}_inside"] = inside
            numbers.append(row)
    for rel in CONCLUSIONS:
        base = load(ROOT, rel) or []
        others = {v: {c["id"]: c for c in load(p, rel) or []} for v, p in variants.items()}
        for c in base:
            row = {
                "file": rel,
                "id": c["id"],
                "committed": c["verdict"],
                "stated": c["verdict"] != "no difference",
            }
            for v, other in others.items():
                row[v] = other.get(c["id"], {}).get("verdict")
            verdicts.append(row)
    return {"numbers": numbers, "conclusions": verdicts}


def markdown(result: dict, seconds: dict) -> str:
    names = list(seconds)
    lines = [
        "# Stability: another BLAS path and another δ₀ seed",
        "",
        "Produced by `make stability` (`benchmarks/stability.py`): the whole pipeline re-run in",
        "scratch copies, " + "; ".join(f"`{v}` {seconds[v]:.0f} s" for v in names) + ".",
        "`blas` = `MKL_CBWR=COMPATIBLE`, every parameter unchanged; `seed` = `implant.seed` + 1.",
        "",
        "## Headline numbers (committed value with its 95 % interval)",
        "",
        "| file | number | committed [95 % interval] | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in result["numbers"]:
        ci = f" [{r['low']:.3f}, {r['high']:.3f}]" if r["low"] is not None else ""
        cells = []
        for v in names:
            value = r.get(v)
            mark = {True: "", False: " (outside)", None: ""}[r.get(f"{v}_inside")]
            cells.append("–" if value is None else f"{value:.3f}{mark}")
        lines.append(
            f"| {r['file']} | {r['key']} | {r['committed']:.3f}{ci} | " + " | ".join(cells) + " |"
        )
    stated = [c for c in result["conclusions"] if c["stated"]]
    lines += ["", "## Conclusions", ""]
    held = {v: sum(c[v] == c["committed"] for c in stated) for v in names}
    fragile = [c for c in stated if any(c[v] != c["committed"] for v in names)]
    lines.append(
        f"{len(stated)} directional conclusions are stated (the others say no detectable difference). "
        + "; ".join(f"{v}: {held[v]} of {len(stated)} hold" for v in names)
        + "."
    )
    lines.append(
        f"Stated in the README and docs (held in every run): {len(stated) - len(fragile)}; "
        f"fragile (listed there as such, with the runs that broke them): {len(fragile)}. "
        f"{len(result['conclusions'])} comparisons in all, every one in the table below or "
        "counted after it."
    )
    lines += [
        "",
        "| file | conclusion | committed | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for c in result["conclusions"]:
        changed = any(c[v] != c["committed"] for v in names)
        if c["stated"] or changed:
            lines.append(
                f"| {c['file']} | `{c['id']}` | {c['committed']} | "
                + " | ".join(str(c[v]) for v in names)
                + " |"
            )
    unchanged = sum(
        1
        for c in result["conclusions"]
        if not c["stated"] and all(c[v] == c["committed"] for v in names)
    )
    lines += ["", f"{unchanged} further comparisons say no detectable difference in every run."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--keep", type=Path, help="run the variants under this folder and keep them"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument(
        "--parallel", action="store_true", help="run the variants at once, one thread each"
    )
    parser.add_argument(
        "--compare-only", action="store_true",
        help="compare the runs kept under --keep with the reports again, without running",
    )  # fmt: skip
    args = parser.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="stability-"))
    base.mkdir(parents=True, exist_ok=True)
    dirs, seconds = {}, {}
    if args.compare_only and args.keep is None:
        parser.error("--compare-only needs --keep DIR (the folder of an earlier run)")
    try:
        def one(v: str) -> None:
            if dirs[v].exists():
                shutil.rmtree(dirs[v])
            print(f"stability: running the pipeline, variant {v} ...", flush=True)
            seconds[v] = run_variant(dirs[v], *VARIANTS[v], threads=1 if args.parallel else 0)
            (dirs[v] / "seconds.json").write_text(json.dumps({"seconds": seconds[v]}))

        for v in args.variants:
            dirs[v] = base / v
            if args.compare_only:
                seconds[v] = json.loads((base / v / "seconds.json").read_text())["seconds"]
        if not args.compare_only:
            with ThreadPoolExecutor(len(args.variants) if args.parallel else 1) as pool:
                list(pool.map(one, args.variants))
        seconds = {v: seconds[v] for v in args.variants}
        result = compare_runs(dirs)
        result["seconds"] = seconds
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stability.json").write_text(json.dumps(result, indent=1) + "\n")
        text = markdown(result, seconds)
        (args.out / "stability.md").write_text(text)
        print(text)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
