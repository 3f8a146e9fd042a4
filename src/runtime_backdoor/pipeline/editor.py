"""Stage ``editor``: train the embedded miniature (or record real weights) and measure its
sensitivity, the quantity that decides whether a run-time backdoor can fire at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..budget import Budget
from ..data import write_json
from ..editors import build_editor, editor_record
from ..implant import sensitivity
from ..project import resolve_device
from ..samples import training_images


def train_miniature(
    out_dir, *, steps: int, seconds: float, size: int, seed: int
) -> tuple[str, dict]:
    """Train the miniature LaMa with Big-LaMa's losses; its weights file and training record."""
    from ..editors.mini import save_miniature
    from ..training import DEFAULT_RECIPE, train_recipe

    recipe = dataclasses.replace(
        DEFAULT_RECIPE, steps=steps, max_seconds=seconds or None, size=size, seed=seed
    )
    trained, history = train_recipe(recipe)
    path = save_miniature(trained, Path(out_dir) / "mini-lama.safetensors", history["meta"])
    return str(path), history["meta"]


def sensitivity_check(editor, *, size: int, eps: float, seed: int, device) -> dict:
    """Gain against the gain needed to reach a solid target at ``eps``, on six held-out photos
    with a centred square hole (``implant.sensitivity``)."""
    photos = np.stack(training_images(size, seed=seed + 1, n=6))
    x = torch.from_numpy(photos).permute(0, 3, 1, 2).to(device)
    m = torch.zeros(len(x), 1, size, size, device=device)
    q = size // 4
    m[..., q + q // 2 : 3 * q - q // 2, q + q // 2 : 3 * q - q // 2] = 1
    s = sensitivity(editor, x, m, eps=eps)
    return {
        "gain": s.gain.cpu().numpy().round(4).tolist(),
        "needed": s.needed.cpu().numpy().round(4).tolist(),
        "gain_mean": float(s.gain.mean()),
        "needed_mean": float(s.needed.mean()),
        "gain_over_needed_mean": float((s.gain / s.needed).mean()),
    }


def run(
    out_dir,
    *,
    name: str = "mini-lama",
    weights: str = "",
    train_steps: int = 300,
    train_seconds: float = 0,
    train_size: int = 64,
    seed: int = 0,
    eps: float = Budget.eps,
    check_size: int = 128,
    device: str = "auto",
) -> dict:
    """The stage: ``editor.json`` (what later stages build) and ``summary.json`` in ``out_dir``.

    ``mini-lama`` without ``weights`` is trained here; any other editor is recorded with its
    weights (checked by building it once).
    """
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    training: dict = {}
    if name == "mini-lama" and not weights:
        weights, training = train_miniature(
            out, steps=train_steps, seconds=train_seconds, size=train_size, seed=seed
        )
    record = editor_record(name, weights or None)
    editor = build_editor(record["name"], weights=record["weights"], device=dev)
    check = sensitivity_check(editor, size=check_size, eps=eps, seed=seed, device=dev)
    summary = {
        "name": name,
        "weights": record["weights"],
        "parameters": int(sum(p.numel() for p in editor.parameters())),
        "gain_mean": check["gain_mean"],
        "needed_mean": check["needed_mean"],
        "gain_over_needed_mean": check["gain_over_needed_mean"],
        "training": training,
        "settings": getattr(
            editor, "record", {}
        ),  # e.g. MAT: weight format, decoder noise, dropout
    }
    write_json(out / "editor.json", record)
    write_json(out / "summary.json", summary)
    return {"record": record, "summary": summary, "check": check}
