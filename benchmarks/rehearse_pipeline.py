"""Rehearsal of the paper's path: every pipeline stage on the real architectures, random weights.

The GPU image has no papermill or DVC, so this runs the stage functions the notebooks call
(``runtime_backdoor.pipeline.<stage>``), in pipeline order, on a few images:

- ``lama``: prepare -> editor -> implant -> edit -> evaluate -> figures with the Big-LaMa
  architecture loaded through the editor stage's record (``lama``, ``preset: big-lama``);
- ``sd-inpainting``: implant -> edit -> evaluate -> figures with the SD-1.5 inpainting
  architecture (diffusers UNet + VAE with SD-1.5's configs, built in memory: there is no
  folder to load), bf16 autocast and gradient checkpointing, one image per call.

The two are named as in the editor registry (``runtime_backdoor.editors.EDITORS``).

Cost does not depend on weight values, so the seconds and the peak GPU memory of each stage
are those of the real models; the hit rates are meaningless. The JSON is rewritten after
every stage, so a run cut off by its deadline or by the device tool still returns what it did::

    python benchmarks/rehearse_pipeline.py --device cuda --out $OUT/rehearsal.json
    python benchmarks/rehearse_pipeline.py --dry-run --out /tmp/rehearsal.json   # CPU, tiny

``--dry-run`` is the same code at 64 px with the miniature LaMa preset, the tiny SD stack and
2 optimiser steps (tests/test_benchmarks.py runs it with papermill, DVC and open_clip hidden).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_protection: one SD-1.5 config
SCHEMA = 1
STAGES = ("prepare", "editor", "implant", "edit", "evaluate", "figures")
EDITORS = ("lama", "sd-inpainting")  #: registry names


@dataclass(frozen=True)
class Settings:
    size: int = 512  #: the paper's resolution
    images: int = 3  #: one per content type (watermark, logo, face)
    steps: int = 20  #: Adam iterations (the paper's)
    lama_preset: str = "big-lama"
    lama_batch: int = 3  #: images per implant call (the pipeline's default is 6)
    sd_stack: str = "sd-inpainting"  #: benchmark_protection.SD_STACKS (SD-1.5's)
    sd_images: int = 2
    sd_sampler_steps: int = 4
    sd_bf16: bool = True  #: autocast; fp32 SD-1.5 at 512 px needs about 67 GiB per image
    sd_checkpointing: bool = True

    @property
    def kernel(self) -> int:
        from runtime_backdoor.masks import scaled_kernel

        return scaled_kernel(self.size)  # 17 at 512 px, the paper's


DRY_RUN = Settings(
    size=64, images=2, steps=2, lama_preset="mini", lama_batch=2, sd_stack="tiny-sd",
    sd_images=1, sd_sampler_steps=2, sd_bf16=True, sd_checkpointing=True,
)  # fmt: skip


class Recorder:
    """Times stages, records their peak GPU memory and rewrites the JSON after each one."""

    def __init__(self, out: Path | None, device: torch.device, settings: Settings, deadline):
        self.out, self.device, self.deadline = out, device, deadline
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.report = {
            "schema": SCHEMA,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "settings": {**settings.__dict__, "kernel": settings.kernel, "deadline": deadline},
            "stages": self.rows,
            "complete": False,
        }

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.elapsed()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def stage(self, editor: str, stage: str, fn: Callable[[], dict | None], echo=print) -> bool:
        """Run ``fn`` unless out of time; a failure is recorded and stops this editor's run."""
        row = {"editor": editor, "stage": stage, "seconds": None, "peak_gpu_gib": None}
        if self.left() <= 0:
            row["status"] = "skipped: out of time"
        else:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            try:
                row.update(fn() or {})
                row["status"] = "ok"
            except Exception as err:  # the JSON says what failed; later stages need this one
                row["status"] = f"failed: {type(err).__name__}: {err}"[:300]
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            row["seconds"] = time.perf_counter() - t0
        self.rows.append(row)
        self.write()
        gib = "" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:7.2f} GiB"
        secs = "" if row["seconds"] is None else f"{row['seconds']:8.2f} s"
        echo(f"{editor:13s} {stage:9s} {secs:>10s} {gib:>11s}  {row['status']}")
        return row["status"] == "ok"

    def write(self, complete: bool = False) -> None:
        self.report["complete"] = complete
        self.report["elapsed_seconds"] = self.elapsed()
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
            tmp.replace(self.out)


# --------------------------------------------------------------------------- the stages


def clip_fid(prepared: Path, edited: Path, device) -> dict:
    """The evaluate stage's CLIP-FID, recorded as unavailable where open_clip is not installed."""
    from runtime_backdoor.pipeline.evaluate import clip_fid_by_scenario

    if importlib.util.find_spec("open_clip") is None:
        return {"available": False, "reason": "open_clip is not installed"}
    return clip_fid_by_scenario(prepared, edited, None, device=device)


def run_stages(rec: Recorder, label: str, editor_fn, work: Path, s: Settings, *, prepared: Path,
               batch_size: int, echo=print, **implant_kwargs) -> None:  # fmt: skip
    """implant -> edit -> evaluate -> figures against the editor ``editor_fn()`` returns."""
    from runtime_backdoor.budget import Budget
    from runtime_backdoor.data import load_prepared, read_folder, write_csv, write_json
    from runtime_backdoor.pipeline import edit as edit_stage
    from runtime_backdoor.pipeline import evaluate as evaluate_stage
    from runtime_backdoor.pipeline import figures
    from runtime_backdoor.pipeline import implant as implant_stage
    from runtime_backdoor.plots import save_figure

    dev = rec.device
    root = work / label
    protected, edited, reports = root / "protected", root / "edited", root / "reports"
    state: dict = {}

    def editor():
        from runtime_backdoor.implant import sensitivity

        state["editor"] = editor_fn()
        # what the editor stage records next to the editor: its sensitivity (one image)
        _, x, m = load_prepared(prepared, read_folder(prepared)["name"][:1])
        dtype = implant_kwargs.get("autocast_dtype")
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            gain = sensitivity(state["editor"], x.to(dev), m.to(dev)).gain
        return {
            "parameters": sum(p.numel() for p in state["editor"].parameters()),
            "gain": float(gain.mean()),
        }

    def implant():
        manifest = implant_stage.implant_folder(
            state["editor"], prepared, protected, batch_size=batch_size, device=dev,
            budget=Budget(steps=s.steps, expand_kernel=s.kernel), progress=False, **implant_kwargs,
        )  # fmt: skip
        losses = pd.read_csv(protected / "losses.csv")
        save_figure(implant_stage.loss_plot(losses), reports / "figures" / "loss_curves.png")
        return {
            "images": len(manifest),
            "seconds_per_image": float(manifest["seconds"].mean()),
            "linf_8bit_max": float(manifest["linf_8bit"].max()),
        }

    def edit():
        edits = edit_stage.edit_folder(
            state["editor"], prepared, protected, edited, kernel=s.kernel,
            batch_size=batch_size, device=dev, progress=False,
        )  # fmt: skip
        return {"edits": len(edits)}

    def evaluate():
        per_edit, imperceptibility = evaluate_stage.evaluate_folder(prepared, protected, edited)
        clip = clip_fid(prepared, edited, dev)
        summary = evaluate_stage.summarize(per_edit, imperceptibility, clip)
        write_csv(reports / "per_edit.csv", per_edit)
        write_json(reports / "clip_fid.json", clip)
        write_json(reports / "metrics.json", summary)
        return {"protection_psnr": summary["protection_psnr"], "clip_fid": clip.get("reason", "ok")}

    def make_figures():
        per_edit = pd.read_csv(reports / "per_edit.csv")
        summary = json.loads((reports / "metrics.json").read_text())
        names = read_folder(prepared)["name"].tolist()
        grid = figures.example_grid(names, prepared, protected, edited)
        written = [
            save_figure(grid, reports / "figures" / "grid.png", dpi=60),
            save_figure(figures.scenario_plot(per_edit), reports / "figures" / "scenarios.png"),
        ]  # fmt: skip
        (reports / "results.md").write_text(figures.results_table(summary))
        return {"figures": len(written)}

    for stage, fn in (("editor", editor), ("implant", implant), ("edit", edit),
                      ("evaluate", evaluate), ("figures", make_figures)):  # fmt: skip
        if not rec.stage(label, stage, fn, echo):
            break
    state.clear()  # free the editor before the next one is built
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def lama_editor(rec: Recorder, work: Path, s: Settings):
    """The editor stage as the pipeline runs it: a record, then ``load_recorded_editor``."""
    from runtime_backdoor.data import write_json
    from runtime_backdoor.editors import editor_record, load_recorded_editor

    record = editor_record("lama", None, preset=s.lama_preset, seed=0)
    path = write_json(work / "lama" / "editor" / "editor.json", record)
    return load_recorded_editor(path, device=rec.device)


def sd_editor(rec: Recorder, s: Settings):
    import benchmark_protection as bench

    case = bench.Case(
        f"{s.sd_stack}-{s.size}", s.sd_stack, s.size, s.sd_sampler_steps,
        checkpointing=s.sd_checkpointing,
    )  # fmt: skip
    return bench.build_editor(case, rec.device).eval().requires_grad_(False)


def run(
    out: str | Path | None,
    *,
    device: str = "auto",
    settings: Settings = Settings(),
    editors=EDITORS,
    deadline: float | None = None,
    work: str | Path | None = None,
    keep: str | Path | None = None,
    echo=print,
) -> dict:
    """Rehearse the pipeline for each of ``editors``; returns the report (also written to ``out``).

    ``work``: folder for the stage outputs (a temporary one by default, removed after);
    ``keep``: copy each editor's reports (metrics, results table, figures) there.
    """
    from runtime_backdoor.data import read_folder
    from runtime_backdoor.pipeline.prepare import prepare as prepare_stage
    from runtime_backdoor.project import resolve_device
    from runtime_backdoor.samples import make_sample

    unknown = set(editors) - set(EDITORS)
    if unknown:
        raise ValueError(f"--editors: unknown {sorted(unknown)}; choose from {EDITORS}")
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    rec = Recorder(Path(out) if out else None, dev, settings, deadline)
    tmp = None if work else tempfile.TemporaryDirectory(prefix="rehearsal-")
    work = Path(work or tmp.name)
    s = settings
    raw, prepared = work / "raw", work / "prepared"
    try:

        def prepare():
            # the embedded sample drawn at the rehearsal's size, then the prepare stage
            make_sample(raw, n_per_type=math.ceil(s.images / 3), size=max(s.size, 64))
            manifest = prepare_stage(raw, prepared, size=s.size, limit=s.images)
            return {"images": len(manifest)}

        if rec.stage("data", "prepare", prepare, echo):
            if "lama" in editors:
                run_stages(
                    rec, "lama", lambda: lama_editor(rec, work, s), work, s,
                    prepared=prepared, batch_size=s.lama_batch, echo=echo,
                )  # fmt: skip
            if "sd-inpainting" in editors:
                sd_prepared = work / "prepared-sd"
                names = read_folder(prepared)["name"].tolist()[: s.sd_images]
                rec.stage("sd-inpainting", "prepare", lambda: _subset(prepared, sd_prepared, names), echo)  # fmt: skip
                run_stages(
                    rec, "sd-inpainting", lambda: sd_editor(rec, s), work, s, prepared=sd_prepared,
                    batch_size=1, echo=echo,
                    autocast_dtype=torch.bfloat16 if s.sd_bf16 else None,
                )  # fmt: skip
        if keep:
            for label in editors:
                if (work / label / "reports").is_dir():
                    shutil.copytree(
                        work / label / "reports", Path(keep) / label, dirs_exist_ok=True
                    )
        rec.write(complete=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rec.report


def _subset(prepared: Path, out: Path, names: list[str]) -> dict:
    """A prepared folder with the first images only (the SD rows protect fewer)."""
    from runtime_backdoor.data import read_folder, write_csv

    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        for suffix in (".png", "_mask.png"):
            shutil.copy2(prepared / f"{n}{suffix}", out / f"{n}{suffix}")
    manifest = read_folder(prepared)
    write_csv(out / "manifest.csv", manifest[manifest["name"].isin(names)])
    return {"images": len(names)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", default="reports/benchmarks/rehearsal.json", help="JSON path")
    parser.add_argument("--editors", nargs="+", default=list(EDITORS), choices=EDITORS)
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no new stage starts")  # fmt: skip
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 512)")
    parser.add_argument("--images", type=int, default=None, help="images for lama (default 3)")
    parser.add_argument("--keep", default=None, help="copy each editor's reports and figures here")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU plumbing check: 64 px, miniature LaMa, tiny SD, 2 steps")  # fmt: skip
    args = parser.parse_args(argv)
    settings = DRY_RUN if args.dry_run else Settings()
    if args.size is not None:
        if args.size < 64:
            raise SystemExit(f"--size must be at least 64 px, got {args.size}")
        settings = replace(settings, size=args.size)
    if args.images is not None:
        if args.images < 1:
            raise SystemExit(f"--images must be at least 1, got {args.images}")
        settings = replace(settings, images=args.images)
    device = "cpu" if args.dry_run and args.device == "auto" else args.device
    report = run(
        args.out, device=device, settings=settings, editors=args.editors,
        deadline=args.deadline, keep=args.keep,
    )  # fmt: skip
    failed = [r for r in report["stages"] if r["status"].startswith("failed")]
    print(
        f"rehearsal: {report['elapsed_seconds']:.0f} s, {len(failed)} failed stage(s) -> {args.out}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
