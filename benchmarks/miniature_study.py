"""Which embedded miniature editor shows the run-time backdoor? A side-by-side study.

For each candidate (miniature LaMa generators trained by :mod:`runtime_backdoor.training` with
different sizes and losses, the classical blur fill as a reference) this script measures:

- fill quality: mean L1 over the hole on held-out photos (crops of the sample's source photos,
  which training never sees, with random masks), next to the blur fill;
- sensitivity: median ``implant.sensitivity`` gain on the embedded sample (about 20 is needed
  for a solid target at eps = 0.025), and how it evolves over training steps;
- protection at the paper's defaults (eps 0.025, 20 Adam steps, expansion kernel scaled to
  128 px): target-hit rate of the malicious edit (at least half of the protected region within
  0.1 of the target per channel), PSNR of benign ring edits of protected vs clean images, PSNR
  of protected vs original images.

Writes ``reports/miniature/study.json`` (``--only`` runs merge into it) and ``fills*.png``
and prints a table::

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/miniature_study.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime_backdoor import data, samples
from runtime_backdoor.editors.lama import FFCResNetGenerator, LamaConfig, LamaEditor
from runtime_backdoor.editors.simple import BlurFillEditor, GlobalMixEditor
from runtime_backdoor.implant import implant, sensitivity
from runtime_backdoor.masks import ring, scaled_kernel
from runtime_backdoor.training import TrainingRecipe, random_mask, train_recipe

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
EPS = 0.025
HIT_TOL = 0.1

#: candidates: name -> recipe; "blur" = the classical blur fill, "mix:G" = the positive
#: control with steepness G, "random" = an untrained
#: 9-block generator (He-normal init, BatchNorm statistics from training crops) as a
#: sensitivity reference: its fills are noise, not inpainting
CANDIDATES: dict[str, TrainingRecipe | str] = {
    "blur-fill": "blur",
    "untrained (9 blocks, random init)": "random",
    # positive controls (editors/simple.py): a fill colour made steep on purpose; they show
    # which gain the implant loop and the hit metric actually need
    "control: global-mix x160": "mix:160",
    "control: global-mix x320": "mix:320",
    "control: global-mix x640": "mix:640",
    "mini-l1 (3 blocks, L1 on hole)": TrainingRecipe(
        steps=300, l1_hole=10.0, perceptual=0.0, adversarial=0.0, feature_matching=0.0
    ),
    "mini-pl (3 blocks, L1 known + perceptual)": TrainingRecipe(
        steps=300, adversarial=0.0, feature_matching=0.0
    ),
    "mini-gan (3 blocks, + adv. + FM)": TrainingRecipe(
        steps=300, adversarial=10.0, feature_matching=100.0
    ),
    "mini-gan-1000 (3 blocks, + adv. + FM, 1000 steps)": TrainingRecipe(
        steps=1000, adversarial=10.0, feature_matching=100.0
    ),
    "deep-pl (9 blocks, L1 known + perceptual)": TrainingRecipe(
        n_downsampling=3, n_blocks=9, steps=300, adversarial=0.0, feature_matching=0.0
    ),
    "deep-gan (9 blocks, + adv. + FM)": TrainingRecipe(
        n_downsampling=3, n_blocks=9, steps=300, adversarial=10.0, feature_matching=100.0
    ),
}


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float()


def load_sample(folder: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    samples.make_sample(folder, n_per_type=6, size=SIZE, seed=0)
    names, xs, ms = [], [], []
    for name, image_path, _ in data.list_pairs(folder):
        x, m = data.read_pair(image_path)
        names.append(name)
        xs.append(x)
        ms.append(m[..., None].astype(np.float32))
    return names, to_tensor(xs), to_tensor(ms)


def held_out_fills(n: int = 12, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of the sample's source photos (never trained on) with random training-style masks."""
    rng = np.random.default_rng(seed)
    xs, ms = [], []
    for k in range(n):
        a = samples.load_source(samples.SAMPLE_SOURCES[k % len(samples.SAMPLE_SOURCES)])
        h, w = a.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(a[y : y + side, x : x + side]))
        xs.append(np.asarray(crop.resize((SIZE, SIZE), Image.BICUBIC), np.float32) / 255)
        ms.append(random_mask(SIZE, rng)[..., None].astype(np.float32))
    return to_tensor(xs), to_tensor(ms)


def random_init_editor(config: LamaConfig, seed: int = 0) -> LamaEditor:
    """An untrained generator: He-normal convolutions, BatchNorm statistics of training crops."""
    torch.manual_seed(seed)
    generator = FFCResNetGenerator(config)
    for mod in generator.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average over the calibration batch
            mod.reset_running_stats()
    rng = np.random.default_rng(seed)
    x = to_tensor(samples.training_images(64, seed, 32))
    m = to_tensor([random_mask(64, rng)[..., None].astype(np.float32) for _ in range(32)])
    generator.train()
    with torch.no_grad():
        generator(torch.cat([x * (1 - m), m], dim=1))
    return LamaEditor(generator)


def hole_l1(editor, x: torch.Tensor, m: torch.Tensor) -> float:
    with torch.no_grad():
        out = editor(x, m)
    return float(((out - x).abs() * m).sum() / (m.sum() * 3))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


def protection(editor, x: torch.Tensor, m: torch.Tensor) -> dict:
    """Implant at the paper's defaults; score malicious hits and benign ring fidelity per image."""
    kernel = scaled_kernel(SIZE)
    res = implant(editor, x, m, eps=EPS, steps=20, expand_kernel=kernel, progress=False)
    band = ring(m, kernel)
    with torch.no_grad():
        mal = editor(res.protected, m)
        close = ((mal - res.target).abs() < HIT_TOL).all(1, keepdim=True).float()
        hit_frac = (close * m).flatten(1).sum(1) / m.flatten(1).sum(1)
        ring_psnr = psnr(editor(res.protected, band), editor(x, band))
        area = m.flatten(1).sum(1) * 3
        moved = ((mal - editor(x, m)).abs() * m).flatten(1).sum(1) / area
        left = ((mal - res.target).abs() * m).flatten(1).sum(1) / area
    return {
        "hit_rate": float((hit_frac >= 0.5).float().mean()),
        "hit_fraction_median": float(hit_frac.median()),
        # mean |fill change| in the hole caused by protection, and mean |fill - target| left
        "fill_moved_median": float(moved.median()),
        "target_error_median": float(left.median()),
        "ring_psnr_median": float(ring_psnr.median()),
        "ring_psnr_min": float(ring_psnr.min()),
        "protection_psnr_median": float(psnr(res.protected, x).median()),
        "implant_seconds": round(res.seconds, 1),
        "malicious": mal,
    }


def fill_grid(path: Path, x: torch.Tensor, m: torch.Tensor, editors: dict, k: int = 3) -> None:
    """Rows: held-out images; columns: masked input (hole magenta), then each editor's fill."""
    cols = [x[:k] * (1 - m[:k]) + m[:k] * torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)]
    with torch.no_grad():
        cols += [ed(x[:k], m[:k]) for ed in editors.values()]
    grid = torch.cat([torch.cat(list(c), dim=1) for c in cols], dim=2)  # (3, k*H, n*W)
    a = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    # a 256-colour palette keeps the file small; fills are still judged at full resolution
    Image.fromarray(a).quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "miniature")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="10 training steps per candidate")
    ap.add_argument("--only", nargs="*", help="names (prefixes) of candidates to run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        names, x, m = load_sample(Path(tmp))
    hx, hm = held_out_fills()
    probe = slice(None, None, 3)  # 6 sample images for the gain-over-steps curve

    def gain_probe(step, editor):
        return {
            "gain_median": float(sensitivity(editor, x[probe], m[probe], eps=EPS).gain.median())
        }

    results, editors = {}, {}
    for name, recipe in CANDIDATES.items():
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        print(f"== {name}", flush=True)
        row: dict = {}
        if recipe == "blur":
            editor = BlurFillEditor()
        elif isinstance(recipe, str) and recipe.startswith("mix:"):
            editor = GlobalMixEditor(gain=float(recipe[4:]), size=SIZE, reach=8)
        elif recipe == "random":
            editor = random_init_editor(LamaConfig(n_downsampling=3, n_blocks=9))
            row["params"] = sum(p.numel() for p in editor.generator.parameters())
        else:
            if args.quick:
                recipe = TrainingRecipe(**{**recipe.__dict__, "steps": 10})
            every = max(1, recipe.steps // 6)
            editor, hist = train_recipe(
                recipe, progress=False, callback=gain_probe, callback_every=every
            )
            row.update(
                recipe=hist["meta"]["recipe"],
                train_seconds=hist["meta"]["seconds"],
                params=sum(p.numel() for p in editor.generator.parameters()),
                gain_curve=[(e["step"], round(e["gain_median"], 2)) for e in hist["evals"]],
            )
        editors[name] = editor
        sens = sensitivity(editor, x, m, eps=EPS)
        row.update(
            hole_l1=round(hole_l1(editor, hx, hm), 4),
            gain_median=round(float(sens.gain.median()), 2),
            needed_median=round(float(sens.needed.median()), 2),
        )
        prot = protection(editor, x, m)
        prot.pop("malicious")
        row.update({k: round(v, 3) if isinstance(v, float) else v for k, v in prot.items()})
        results[name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "recipe"}), flush=True)

    path = args.out / "study.json"
    if args.only and path.is_file():  # a partial run updates the stored study
        results = {**json.loads(path.read_text())["candidates"], **results}
        results = {k: results[k] for k in CANDIDATES if k in results}
    summary = {
        "sample": {"n_images": len(names), "size": SIZE, "eps": EPS, "hit_tolerance": HIT_TOL},
        "held_out": {"n_images": int(hx.shape[0]), "sources": list(samples.SAMPLE_SOURCES)},
        "threads": args.threads,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "candidates": results,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")
    slug = "" if not args.only else "-" + "-".join(p.split()[0].strip(":") for p in args.only)
    fill_grid(args.out / f"fills{slug}.png", hx, hm, editors)

    header = ("candidate", "hole L1", "gain", "hit rate", "ring PSNR", "prot. PSNR", "train s")
    print("\n" + " | ".join(header))
    for name, r in results.items():
        print(
            f"{name} | {r['hole_l1']:.4f} | {r['gain_median']:.2f} | {r['hit_rate']:.2f} | "
            f"{r['ring_psnr_median']:.1f} | {r['protection_psnr_median']:.1f} | "
            f"{r.get('train_seconds', 0):.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
