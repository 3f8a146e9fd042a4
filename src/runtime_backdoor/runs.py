"""Real-model runs of the DVC pipeline, kept apart from the embedded default's results.

    python -m runtime_backdoor.runs real --n 6          # make reproduce-real
    python -m runtime_backdoor.runs paper --editor mat  # make reproduce-paper EDITOR=mat
    python -m runtime_backdoor.runs rehearsal-weights models/rehearsal/big-lama.pt

A run is the project's own pipeline (``dvc.yaml``, the notebooks) in ``runs/<preset>/``: a
git-ignored DVC project of its own whose ``params.yaml`` is the project's with the preset
``params/<preset>.yaml`` and the command-line choices laid over it. Its outputs
(``runs/<preset>/reports``, ``data``, ``models/editor``) never touch the committed
``reports/`` of the embedded default. Weights are checked before anything runs. The editors
are the registry's (:data:`runtime_backdoor.editors.EDITORS`) that read weights
``runtime-backdoor weights fetch`` can download; their default file is the registry's too.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .editors import EDITORS
from .weights import weight_paths

COPIED = ("dvc.yaml", "notebooks", "src", "data/raw")  # what the stages read from the project
STAGE = "figures"  # prepare -> editor -> implant -> edit -> evaluate -> figures

#: the editors a run can use: those whose weights `runtime-backdoor weights fetch` downloads
RUN_EDITORS = tuple(name for name, entry in EDITORS.items() if entry.weights)


class RunError(Exception):
    """Said in one line, before any stage runs."""


def merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, section by section; unknown keys are refused."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in out:
            raise RunError(f"unknown parameter {key!r} (not in params.yaml)")
        if isinstance(value, dict):
            if not isinstance(out[key], dict):
                raise RunError(f"parameter {key!r} is a value, not a section")
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise RunError(f"{path} not found") from None
    except yaml.YAMLError as err:
        raise RunError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None


def run_params(
    preset: str,
    *,
    root: Path,
    n: int | None = None,
    editor: str = "lama",
    weights: str | None = None,
    clip: str | None = None,
) -> dict:
    """The run's full ``params.yaml``: project params + preset + these choices.

    ``weights``/``clip`` default to where ``runtime-backdoor weights fetch`` puts them;
    ``clip="none"`` runs without CLIP-FID. Missing files raise :class:`RunError` naming
    ``make weights``.
    """
    if editor not in RUN_EDITORS:
        raise RunError(f"EDITOR={editor}: unknown editor; choose one of {', '.join(RUN_EDITORS)}")
    entry, default = weight_paths(editor, root / "models")[0]
    params = merge(read_yaml(root / "params.yaml"), read_yaml(root / "params" / f"{preset}.yaml"))
    if n is not None:
        if n < 1:
            raise RunError(f"N={n}: the number of images must be at least 1")
        params["prepare"]["limit"] = n
    weights_path = _absolute(weights or default, root)
    _require(weights_path, f"{editor} weights ({entry})", entry, "WEIGHTS")
    params["editor"]["name"] = editor
    params["editor"]["weights"] = str(weights_path)
    # DVC sees parameters, not files outside the run: the fingerprints make a stage rerun
    # when the file behind the same path changes (random rehearsal weights -> real ones)
    params["editor"]["weights_id"] = fingerprint(weights_path)
    if clip == "none":
        params["evaluate"]["clip_weights"] = ""
    else:
        clip_path = _absolute(clip or params["evaluate"]["clip_weights"], root)
        _require(clip_path, "CLIP ViT-B/32 weights (CLIP-FID)", "clip-vit-b-32", "CLIP", "none")
        params["evaluate"]["clip_weights"] = str(clip_path)
        params["evaluate"]["clip_weights_id"] = fingerprint(clip_path)
    # LPIPS is optional (its columns say "not computed" without it): the project's backbone,
    # absolute so that the run's folder finds it, and fingerprinted like the others.
    lpips = params["evaluate"].get("lpips_backbone") or ""
    if lpips and _absolute(lpips, root).is_file():
        params["evaluate"]["lpips_backbone"] = str(_absolute(lpips, root))
        params["evaluate"]["lpips_backbone_id"] = fingerprint(_absolute(lpips, root))
    return params


def fingerprint(path: Path) -> str:
    """SHA-256 of a file; of a folder (a diffusers model), of its files' names, sizes, times."""
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return f"sha256:{digest.hexdigest()}"
    for file in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"listing:{digest.hexdigest()}"


def _absolute(path, root: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


def _require(path: Path, what: str, entry: str, variable: str, skip: str = "") -> None:
    if path.exists():
        return
    alternative = f"{variable}=PATH for another file" + (
        f", {variable}={skip} to skip" if skip else ""
    )
    raise RunError(
        f"{what} missing at {path}: run `make weights` (or `runtime-backdoor weights fetch "
        f"{entry}`; {alternative})"
    )


def require_gpu(force: bool) -> None:
    import torch

    if not torch.cuda.is_available() and not force:
        raise RunError(
            "needs a CUDA GPU (512 px Big-LaMa: tens of seconds per image step "
            "on a CPU); none found here. FORCE=1 runs it on the CPU anyway"
        )


def copy_project(root: Path, dest: Path, items) -> None:
    """Copy the project's ``items`` (files or folders, relative paths) from ``root`` into
    ``dest``, leaving out caches; what is already there is updated."""
    for name in items:
        src, dst = Path(root) / name, Path(dest) / name
        if src.is_dir():
            shutil.copytree(
                src,
                dst,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", ".ipynb_checkpoints"),
            )
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def setup(preset: str, params: dict, *, root: Path) -> Path:
    """Create or refresh ``runs/<preset>/``: the project's stages with the run's params."""
    if not (root / "data" / "raw").is_dir():
        subprocess.run(
            [_dvc(), "pull", "--quiet", "data.dvc"], cwd=root, check=True
        )  # the embedded images, from the DVC remote inside the repository
    run_dir = root / "runs" / preset
    run_dir.mkdir(parents=True, exist_ok=True)
    copy_project(root, run_dir, COPIED)
    (run_dir / "params.yaml").write_text(
        f"# {preset} run: params.yaml + params/{preset}.yaml + command-line choices (generated)\n"
        + yaml.safe_dump(params, sort_keys=False)
    )
    if not (run_dir / ".dvc").is_dir():
        subprocess.run([_dvc(), "init", "--no-scm", "--quiet"], cwd=run_dir, check=True)
    return run_dir


def _dvc() -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def repro(run_dir: Path) -> float:
    """Run the pipeline up to the figures in ``run_dir``; return the seconds it took."""
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    start = time.perf_counter()
    subprocess.run([_dvc(), "repro", STAGE], cwd=run_dir, env=env, check=True)
    return time.perf_counter() - start


def write_rehearsal_weights(path: str | Path, seed: int = 0) -> Path:
    """A random-weight Big-LaMa in the format of ``big-lama.pt`` (a TorchScript trace).

    Same module tree as the official export (``model.generator.*``), so the editor reads it
    exactly as it reads the real file: for rehearsing the real-model runs offline.
    """
    import warnings

    import torch

    from .editors.lama import load_lama

    generator = load_lama(None, seed=seed).generator.eval()

    class Export(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.generator = generator

        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            pred = self.model.generator(torch.cat([image * (1 - mask), mask], dim=1))
            return mask * pred + (1 - mask) * image

    image, mask = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; the format is what counts
        traced = torch.jit.trace(Export(), (image, mask), check_trace=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    traced.save(str(tmp))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime_backdoor.runs", description=__doc__)
    sub = parser.add_subparsers(dest="preset", required=True)
    for preset, help_text in (
        ("real", "Big-LaMa at 256 px on N embedded images; GPU if there is one, else CPU"),
        ("paper", "the paper's settings: 512 px, expansion kernel 17, on a GPU"),
    ):
        p = sub.add_parser(preset, help=help_text)
        p.add_argument("--n", type=int, default=None, help="first N embedded images")
        p.add_argument("--editor", default="lama", help=f"one of {', '.join(RUN_EDITORS)}")
        p.add_argument("--weights", default=None, help="editor weights (default: models/...)")
        p.add_argument("--clip", default=None, help="CLIP ViT-B/32 file, or 'none'")
        p.add_argument("--force", action="store_true", help="paper: run without a GPU")
        p.add_argument("--setup-only", action="store_true", help="prepare runs/NAME, run nothing")
    rehearsal = sub.add_parser("rehearsal-weights", help="write a random-weight big-lama.pt")
    rehearsal.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.preset == "rehearsal-weights":
            print(write_rehearsal_weights(args.path))
            return 0
        root = Path.cwd()  # the project folder (the Makefile runs from there)
        if not (root / "dvc.yaml").is_file():
            raise RunError(f"no dvc.yaml in {root}: run from the project folder")
        if args.preset == "paper":
            require_gpu(args.force)
        params = run_params(
            args.preset, root=root, n=args.n, editor=args.editor, weights=args.weights,
            clip=args.clip,
        )  # fmt: skip
        run_dir = setup(args.preset, params, root=root)
    except RunError as err:
        print(f"reproduce-{getattr(args, 'preset', '')}: error: {err}", file=sys.stderr)
        return 2
    if args.setup_only:
        print(run_dir)
        return 0
    seconds = repro(run_dir)
    print(f"{args.preset} run finished in {seconds:.0f} s; results in {run_dir / 'reports'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
