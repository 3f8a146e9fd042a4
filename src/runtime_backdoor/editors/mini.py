"""The embedded miniature LaMa as an editor: its files (safetensors + JSON config sidecar).

The miniature is LaMa's own generator with a small :class:`~runtime_backdoor.editors.lama.LamaConfig`;
:mod:`runtime_backdoor.training` holds the recipe that trains it, the pipeline's ``editor`` stage
writes it with :func:`save_miniature`, and the ``mini-lama`` editor loads it with
:func:`load_miniature`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .lama import FFCResNetGenerator, LamaConfig, LamaEditor

EDITOR_STAGE_HELP = "the pipeline's `editor` stage creates it: run `dvc repro editor`"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_miniature(editor: LamaEditor, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``editor``'s generator to ``path`` (``.safetensors``) and its config + ``meta`` to a JSON sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = editor.generator
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(path))
    sidecar = {"config": asdict(generator.config), "training": meta or {}}
    _sidecar(path).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def load_miniature(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LamaEditor:
    """Load a miniature written by :func:`save_miniature` (safetensors; nothing is unpickled)."""
    from safetensors.torch import load_file

    path = Path(path)
    for p, what in ((path, "weights"), (_sidecar(path), "config sidecar")):
        if not p.is_file():
            raise FileNotFoundError(f"miniature LaMa {what} not found at {p}; {EDITOR_STAGE_HELP}")
    sidecar = json.loads(_sidecar(path).read_text())
    config = LamaConfig(**sidecar["config"])
    generator = FFCResNetGenerator(config)
    generator.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return LamaEditor(generator).to(device=device, dtype=dtype)


__all__ = ["EDITOR_STAGE_HELP", "load_miniature", "save_miniature"]
