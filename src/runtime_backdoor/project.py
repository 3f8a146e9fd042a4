"""Where the study runs: the project folder and the device.

Every stage, notebook and command reads and writes paths relative to the project folder,
the folder holding ``dvc.yaml`` and ``params.yaml``. JupyterLab starts a notebook's kernel
in ``notebooks/``, papermill and DVC in the project folder: :func:`enter_project_root`
makes all three see the same files.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKERS = ("dvc.yaml", "params.yaml")


def project_root(start: str | os.PathLike | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) that holds
    ``dvc.yaml`` and ``params.yaml``; ``None`` outside a project."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).is_file() for marker in MARKERS):
            return folder
    return None


def enter_project_root(start: str | os.PathLike | None = None) -> Path:
    """Change the working directory to the project folder and return it.

    Outside a project (a scratch folder with its own ``data/``, as the tests use) the working
    directory stays where it is, so relative paths keep their meaning there.
    """
    root = project_root(start)
    if root is None:
        return Path.cwd()
    os.chdir(root)
    return root


def resolve_device(name: str = "auto"):
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` of a device that
    exists here; anything else is a ``ValueError`` naming the setting."""
    import torch

    text = str(name).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device: unknown device {text!r} (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ValueError(f"device: {text!r} does not exist (use cpu)")
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device: {text!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {text!r}: no CUDA device is available here (use cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device: {text!r} does not exist ({torch.cuda.device_count()} CUDA devices here)"
        )
    return device
