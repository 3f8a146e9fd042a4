"""Running a stage over many images: resumable, in one process or many.

A stage that writes one output per image records what it finished in a :class:`Ledger`, tagged
with a :func:`settings_hash` of everything that shapes the output (settings, editor weights,
code), so an interrupted run resumes and a run with other settings redoes the work.
:func:`run_stage` runs such a stage here or under ``accelerate launch`` (one process per GPU):
each process takes its share of the batches (:class:`Ranks`) and the outputs are those of a
single process.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .data import read_folder, write_csv
from .editors import load_recorded_editor
from .project import resolve_device


def settings_hash(settings: dict) -> str:
    """A short hash of a settings dict: outputs made with other settings are not reused."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def editor_fingerprint(editor: torch.nn.Module) -> str:
    """Class and a hash of the weights: protections made against other weights are not reused."""
    h = hashlib.sha256(type(editor).__qualname__.encode())
    for name, t in sorted(editor.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def code_hash(editor: torch.nn.Module) -> str:
    """A hash of the optimiser's and the editor's source: changed code invalidates earlier outputs."""
    from . import implant
    from .editors import base

    h = hashlib.sha256()
    for module in (implant, base, sys.modules[type(editor).__module__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a run split across processes (``accelerate launch``)."""

    index: int = 0
    count: int = 1
    device: torch.device = torch.device("cpu")
    barrier: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def main(self) -> bool:
        return self.index == 0

    def share(self, items: list) -> list:
        """Every ``count``-th item from ``index``: the same split on every process."""
        return items[self.index :: self.count]


def launched_ranks(device: str | torch.device = "auto") -> Ranks:
    """The ranks ``accelerate launch`` started, or a single process.

    Process ``k`` on a node works on GPU ``k mod (GPUs on the node)``: one process per GPU,
    or several sharing one when a small editor leaves a GPU idle. The processes only wait
    for each other (no tensors are exchanged), over gloo, which needs no GPU per rank.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks(device=resolve_device(str(device)))
    from accelerate import PartialState

    state = PartialState(cpu=True)  # gloo: a barrier is all the ranks share
    if str(device) == "cpu" or not torch.cuda.is_available():
        own = torch.device("cpu")
    else:
        own = torch.device("cuda", state.local_process_index % torch.cuda.device_count())
    return Ranks(state.process_index, state.num_processes, own, state.wait_for_everyone)


class Ledger:
    """The rows a stage has finished in ``out_dir``, kept safe across interruptions and ranks.

    ``TABLE.csv`` (``manifest.csv``, ...) holds the rows of finished runs. During a run each
    process appends its rows to its own ``.parts/TABLE.rankN.csv`` (one writer per file, every
    write atomic); at the end the main process merges them. A run that was killed leaves its
    parts behind and the next run folds them in before it starts, so what was finished is
    neither lost nor done again, whatever the number of processes.
    """

    def __init__(self, out_dir, ranks: Ranks | None = None, tables=("manifest",)) -> None:
        self.out_dir, self.ranks, self.tables = Path(out_dir), ranks or Ranks(), tuple(tables)
        self.parts = self.out_dir / ".parts"
        self._rows: dict[str, list[pd.DataFrame]] = {t: [] for t in self.tables}

    def _parts(self, table: str) -> list[Path]:
        return sorted(self.parts.glob(f"{table}.rank*.csv"))

    def _read(self, table: str, parts: bool) -> pd.DataFrame:
        path = self.out_dir / f"{table}.csv"
        frames = [pd.read_csv(path)] if path.is_file() else []
        frames += [pd.read_csv(p) for p in self._parts(table)] if parts else []
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _clear_parts(self) -> None:
        for table in self.tables:
            for p in self._parts(table):
                p.unlink()

    def start(self) -> dict[str, pd.DataFrame]:
        """Fold an interrupted run's parts into the tables; every process then reads the same."""
        if self.ranks.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # a killed run's unfinished atomic writes, of outputs and of its parts
            for stale in [*self.out_dir.glob(".*.tmp"), *self.parts.glob(".*.tmp")]:
                stale.unlink()
            for table in self.tables:
                if self._parts(table):
                    write_csv(self.out_dir / f"{table}.csv", self._read(table, parts=True))
            self._clear_parts()
        self.ranks.barrier()
        return {t: self._read(t, parts=False) for t in self.tables}

    def record(self, **rows: pd.DataFrame) -> None:
        """Add this process's finished rows (after their outputs are written)."""
        for table, df in rows.items():
            self._rows[table].append(df)
            part = self.parts / f"{table}.rank{self.ranks.index}.csv"
            write_csv(part, pd.concat(self._rows[table], ignore_index=True))

    def collect(self) -> dict[str, pd.DataFrame]:
        """Wait for every process; the rows all of them recorded in this run (main process)."""
        self.ranks.barrier()
        if not self.ranks.main:
            return {}
        out = {}
        for table in self.tables:
            frames = [pd.read_csv(p) for p in self._parts(table)]
            out[table] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return out

    def close(self) -> None:
        """After the main process wrote the merged tables: drop the parts, release the others."""
        if self.ranks.main:
            self._clear_parts()
        self.ranks.barrier()


def latest_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Per name, only the last curve (rows from its last ``step == 0`` on)."""
    block = (curves["step"] == 0).cumsum()
    last = block.groupby(curves["name"]).transform("max")
    return curves[block == last].reset_index(drop=True)


def finished_rows(manifest: pd.DataFrame, settings: str, output_of: Callable) -> dict[str, dict]:
    """Rows of ``manifest`` made with ``settings`` whose output file exists, by name (last wins).

    ``output_of(name)`` is the path of the name's output, or ``None`` when it has none.
    """
    done: dict[str, dict] = {}
    if "settings" not in manifest or "name" not in manifest:
        return done
    for row in manifest.to_dict("records"):
        out = output_of(row["name"])
        if row["settings"] == settings and (out is None or Path(out).is_file()):
            done[row["name"]] = row
        else:
            done.pop(row["name"], None)
    return done


def run_stage(
    stage: Callable, launcher: str = "none", *, editor_record, device: str = "auto", **params
) -> pd.DataFrame:
    """Run ``stage(editor, device=..., ranks=..., **params)`` here or under ``accelerate``.

    ``stage`` is a folder function such as :func:`runtime_backdoor.pipeline.implant.implant_folder`.
    ``launcher`` is ``none`` (this process) or an ``accelerate launch ...`` command line without
    the script, e.g. ``accelerate launch --multi_gpu --num_processes 4``: each process builds the
    editor on its own device and takes its share of the batches (:class:`Ranks`); the outputs and
    the manifest are those of one process.
    """
    words = shlex.split(launcher or "none")
    if words == ["none"]:
        dev = resolve_device(device)
        editor = load_recorded_editor(editor_record, device=dev)
        return stage(editor, device=dev, **params)
    if words[:2] != ["accelerate", "launch"]:
        raise ValueError(
            f"launcher must be 'none' or 'accelerate launch [options]', got {launcher!r}"
        )
    job = {
        "stage": f"{stage.__module__}:{stage.__qualname__}",
        "editor_record": str(editor_record),
        "device": device,
        "params": params,
    }
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "job.json"
        spec.write_text(json.dumps(job, default=str))
        # The venv's interpreter, whether or not its bin/ is on PATH.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *words[2:]]
        subprocess.run([*cmd, "-m", "runtime_backdoor.launch", str(spec)], check=True)
    return read_folder(params["out_dir"])


def _launched_worker(spec_path: str) -> None:
    """One process of :func:`run_stage` under ``accelerate launch``."""
    job = json.loads(Path(spec_path).read_text())
    module, name = job["stage"].split(":")
    stage = getattr(importlib.import_module(module), name)
    ranks = launched_ranks(job["device"])
    editor = load_recorded_editor(job["editor_record"], device=ranks.device)
    params = job["params"] | {"progress": ranks.main and job["params"].get("progress", True)}
    stage(editor, device=ranks.device, ranks=ranks, **params)


if __name__ == "__main__":
    _launched_worker(sys.argv[1])
