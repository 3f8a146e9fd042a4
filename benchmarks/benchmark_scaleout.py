"""Images per second of `runtime-backdoor protect FOLDER` with 1, 2, ... processes (`accelerate`).

A folder of ``--images`` sample images (the embedded generator, official layout) is protected
by the CLI in folder mode, once per row of ``--rows``: ``PxT`` = P processes (``accelerate
launch``; P = 1 runs the CLI directly) with T threads each. Each row is timed twice:

- the full run, wall clock from the launch to the merged manifest (what a user waits for);
- a second run on the finished folder, which resumes everything and computes nothing: its
  time is the fixed cost of the processes (interpreter, imports, editor, settings hash).

``images/s`` = images / full run; ``steady images/s`` = images / (full run - fixed cost),
the rate on a folder large enough for the fixed cost not to matter. Outputs of every row
are compared byte for byte with the first row's that has the same threads per process
(thread counts change float results in the last bits). The machine's load average before
and after each row goes into the JSON (a shared machine makes the numbers noisy). Prints a
table last::

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/benchmark_scaleout.py \\
        [--editor mini-lama --weights models/editor/mini-lama.safetensors | --random-big-lama] \\
        [--images 24] [--size 128] [--rows 1x1 2x1 1x2] [--device cpu] \\
        [--out reports/benchmarks/cpu-scaleout.json]

Without the trained miniature (``dvc pull editor`` puts it in models/editor/), a random
miniature LaMa is written and used instead; the JSON says which (``editor_weights``).
``--random-big-lama`` writes random Big-LaMa weights (cost does not depend on weight values).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def miniature() -> Path:
    """Where the pipeline's editor stage leaves the trained miniature (the registry says)."""
    from runtime_backdoor.weights import default_weights

    return default_weights("mini-lama", ROOT / "models")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes: int, threads: int, folder: Path, out: Path, args) -> list[str]:
    cli = ["-m", "runtime_backdoor.cli", "protect", str(folder), "--out", str(out)]
    cli += ["--editor", args.editor, "--steps", str(args.steps), "--expand", str(args.expand)]
    cli += ["--device", args.device, "--quiet"] + (
        ["--weights", args.weights] if args.weights else []
    )
    if processes == 1:
        return [sys.executable, *cli]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", str(processes), "--num_machines", "1"]
    launch += ["--num_cpu_threads_per_process", str(threads), "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return [*launch, *cli]


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds


def editor_files(args, tmp: Path) -> str:
    """Which weights the rows use, writing random ones where asked or needed."""
    if args.random_big_lama:
        from safetensors.torch import save_file

        from runtime_backdoor.editors.lama import load_lama

        state = load_lama(None, preset="big-lama", seed=0).generator.state_dict()
        args.editor, args.weights = "lama", str(tmp / "random-big-lama.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, args.weights)
        return "random Big-LaMa (cost does not depend on weight values)"
    if args.editor == "mini-lama" and not args.weights:
        trained = miniature()
        if trained.is_file():
            args.weights = str(trained)
            return f"trained miniature ({trained.relative_to(ROOT)}, from `dvc pull editor`)"
        from runtime_backdoor.editors.lama import load_lama
        from runtime_backdoor.editors.mini import save_miniature

        editor = load_lama(None, preset="mini", seed=0)
        args.weights = str(save_miniature(editor, tmp / "random-mini.safetensors"))
        return "random miniature LaMa ('mini' preset; no trained miniature here)"
    return args.weights or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--editor", default="mini-lama", help="a registry name (`runtime-backdoor editors`)"
    )
    parser.add_argument("--weights", default=None)
    parser.add_argument("--random-big-lama", action="store_true")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--expand", type=int, default=5, help="E(m) kernel (5 at 128 px)")
    parser.add_argument("--rows", nargs="+", default=["1x1", "2x1", "1x2"], help="PxT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/cpu-scaleout.json")
    args = parser.parse_args(argv)

    from runtime_backdoor.samples import make_sample

    rows, references = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights_note = editor_files(args, tmp)
        result = {
            "schema": 1,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "device": args.device,
            "editor": args.editor,
            "editor_weights": weights_note,
            "size": args.size,
            "steps": args.steps,
            "rows": rows,
            "complete": False,
        }
        if args.device != "cpu":
            import torch

            if torch.cuda.is_available():
                result["machine"]["gpu"] = torch.cuda.get_device_name(0)
                result["machine"]["gpus"] = torch.cuda.device_count()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        per_type = -(-args.images // 3)
        make_sample(tmp / "photos", n_per_type=per_type, size=args.size, seed=0)
        for extra in sorted((tmp / "photos").glob("*_example.png"))[args.images :]:
            extra.unlink()
            extra.with_name(extra.name.replace(".png", "_mask.png")).unlink()
        for spec in args.rows:
            processes, threads = (int(v) for v in spec.split("x"))
            out = tmp / f"out-{spec}"
            cmd = command(processes, threads, tmp / "photos", out, args)
            load_before = os.getloadavg()
            full = timed(cmd, threads)
            fixed = timed(cmd, threads)  # everything resumed: the fixed cost
            load_after = os.getloadavg()
            outputs = {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}
            # Thread counts change float results in the last bits: compare like with like.
            reference = references.setdefault(threads, (spec, outputs))
            same = None if reference[0] == spec else outputs == reference[1]
            rows.append(
                {
                    "row": spec,
                    "processes": processes,
                    "threads_per_process": threads,
                    "images": args.images,
                    "seconds": round(full, 2),
                    "fixed_seconds": round(fixed, 2),
                    "images_per_second": round(args.images / full, 3),
                    "steady_images_per_second": round(args.images / max(full - fixed, 1e-9), 3),
                    "same_bytes_as_row": None if same is None else reference[0],
                    "outputs_identical": same,
                    "load_average_1min_before_after": [
                        round(load_before[0], 2),
                        round(load_after[0], 2),
                    ],
                }
            )
            print(f"{spec}: {full:.1f} s ({fixed:.1f} s fixed)", file=sys.stderr)
            shutil.rmtree(out)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every row
    result["complete"] = True
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    header = f"{'row':>5} {'procs':>5} {'thr':>4} {'s':>7} {'fixed s':>8} {'img/s':>7} {'steady img/s':>13} {'same bytes as':>14} {'load':>11}"
    print(
        f"{args.images} images, {args.size} px, {args.steps} steps, {args.editor}: {weights_note}"
    )
    print(header)
    for r in rows:
        load = "/".join(f"{v:.1f}" for v in r["load_average_1min_before_after"])
        same = (
            "-"
            if r["outputs_identical"] is None
            else f"{r['outputs_identical']} ({r['same_bytes_as_row']})"
        )
        print(
            f"{r['row']:>5} {r['processes']:>5} {r['threads_per_process']:>4} {r['seconds']:>7.1f} "
            f"{r['fixed_seconds']:>8.1f} {r['images_per_second']:>7.2f} "
            f"{r['steady_images_per_second']:>13.2f} {same:>14} {load:>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
