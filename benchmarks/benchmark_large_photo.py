"""Time and peak memory of ``runtime-backdoor protect`` on a 12-megapixel photo.

Makes a synthetic 4032 × 3024 photo (scikit-image's ``astronaut``, upscaled; offline) with an
800 × 600 mask, runs ``protect`` with each editor in a subprocess under ``/usr/bin/time -v``
(wall time and peak resident memory of the whole process) and prints a table; the JSON goes
to ``reports/benchmarks/large_photo.json``. Budgets (issue 31): at most 2 minutes and 2 GB each.
``--with-48mp`` adds a 8000 × 6000 row (refused from its header at the default pixel limit).

    python benchmarks/benchmark_large_photo.py
    python benchmarks/benchmark_large_photo.py --editors toy-control --steps 2 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"mini-lama": ROOT / "models" / "editor" / "mini-lama.safetensors"}
BUDGET_SECONDS, BUDGET_GB = 120.0, 2.0


def make_photo(folder: Path, width: int, height: int, box=(800, 600)) -> tuple[Path, Path]:
    """A synthetic photo (upscaled ``astronaut``) and a centred ``box`` mask, as PNGs."""
    import numpy as np
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((width, height), Image.BICUBIC)
    photo = folder / f"photo_{width}x{height}.png"
    image.save(photo, compress_level=1)
    mask = np.zeros((height, width), np.uint8)
    bw, bh = box
    top, left = (height - bh) // 2, (width - bw) // 2
    mask[top : top + bh, left : left + bw] = 255
    mask_path = folder / f"mask_{width}x{height}.png"
    Image.fromarray(mask).save(mask_path)
    return photo, mask_path


def run_protect(photo: Path, mask: Path, editor: str, steps: int, out: Path) -> dict:
    """One ``protect`` run under ``/usr/bin/time -v``: seconds, peak RSS, exit status, verdict."""
    exe = Path(sys.executable).with_name("runtime-backdoor")
    cmd = [str(exe), "protect", str(photo), "--mask", str(mask), "--editor", editor]
    if editor in WEIGHTS:
        cmd += ["--weights", str(WEIGHTS[editor])]
    cmd += ["--steps", str(steps), "--out", str(out), "--overwrite", "--quiet"]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    row = {
        "editor": editor,
        "steps": steps,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(int(peak.group(1)) / 1024**2, 3) if peak else None,
        "exit_status": done.returncode,
    }
    if done.returncode == 0:
        report = json.loads(done.stdout)
        row |= {
            "view": report.get("view"),
            "view_size": report.get("view_size"),
            "optimisation_seconds": report.get("seconds"),
            "max_change_8bit": report.get("max_change_8bit"),
            "verdict": report.get("verdict"),
            "held_under": report.get("held_under"),
        }
    else:
        errors = [line for line in done.stderr.splitlines() if "runtime-backdoor:" in line]
        row["error"] = errors[-1] if errors else done.stderr.strip()[-300:]
    row["within_budget"] = (
        done.returncode == 0
        and row["seconds"] <= BUDGET_SECONDS
        and (row["peak_rss_gb"] or 0) <= BUDGET_GB
    )
    return row


def table(rows: list[dict]) -> str:
    head = f"{'photo':>11} {'editor':>12} {'steps':>5} {'view':>6} {'seconds':>8} {'peak GB':>8}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        result = r.get("verdict") or r.get("error", "")
        lines.append(
            f"{r['photo']:>11} {r['editor']:>12} {r['steps']:>5} {r.get('view') or '-':>6} "
            f"{r['seconds']:>8.1f} {r['peak_rss_gb'] or float('nan'):>8.2f}  {result}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--editors", default="toy-control,mini-lama")
    p.add_argument(
        "--steps", type=int, default=20, help="optimisation steps (default 20, the paper's)"
    )
    p.add_argument("--with-48mp", action="store_true", help="add an 8000 × 6000 row")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "large_photo.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="large-photo-") as tmp:
        sizes = [(4032, 3024)] + ([(8000, 6000)] if args.with_48mp else [])
        for width, height in sizes:
            photo, mask = make_photo(Path(tmp), width, height)
            for editor in args.editors.split(","):
                if editor in WEIGHTS and not WEIGHTS[editor].is_file():
                    print(f"skipping {editor}: {WEIGHTS[editor]} is missing", file=sys.stderr)
                    continue
                row = run_protect(photo, mask, editor, args.steps, Path(tmp) / f"out_{editor}.png")
                rows.append({"photo": f"{width}x{height}", "mask": "800x600", **row})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    record = {
        "what": "runtime-backdoor protect on a synthetic photo with an 800x600 mask "
        "(benchmarks/benchmark_large_photo.py); seconds: wall time of the whole command "
        "(reading, optimising on the view, writing, verifying); peak_rss_gb: /usr/bin/time -v",
        "budget": {"seconds": BUDGET_SECONDS, "peak_rss_gb": BUDGET_GB},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
