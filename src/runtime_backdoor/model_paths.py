"""Where model weights lie: the path convention, and nothing else.

Stages may import this module; the weight registry (:mod:`runtime_backdoor.weights`: URLs,
sizes, checksums) and the downloader (:mod:`runtime_backdoor.downloads`) only the front ends
do, so that editing a download URL or a weight-set entry re-runs no stage
(tests/test_contract.py checks it). A weight set ``NAME`` of the registry lies under
``models_dir()`` at its ``dest``; the purifiers' diffusers folders lie at ``models/NAME``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: moves the ``models/`` folder
MODELS_ENV = "RUNTIME_BACKDOOR_MODELS"


def models_dir() -> Path:
    """The models folder: ``$RUNTIME_BACKDOOR_MODELS`` or ``models``."""
    return Path(os.environ.get(MODELS_ENV) or "models")


def fetch_command(name: str) -> str:
    """The command that fetches the weight set ``name`` (a static hint, no registry)."""
    return f"runtime-backdoor weights fetch {name}"


__all__ = ["MODELS_ENV", "fetch_command", "models_dir"]
