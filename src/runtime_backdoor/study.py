"""The study's stages as functions: the notebooks call these and display what they return.

Each stage reads the folder the previous one wrote and writes its own:

    data/raw  --prepare-->  data/prepared  --implant-->  data/protected  --edit-->  data/edited
    models/editor.json (editor stage)                                  --evaluate--> reports/

Images in a folder are ``NAME.png`` (+ ``NAME_mask.png``) with a ``manifest.csv``;
every PNG is written atomically, and the long stages skip images that a previous,
interrupted run with the same settings already finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import masks as M
from .data import list_pairs, read_image, read_mask, read_pair, temp_file_for, write_png
from .editors import EDITORS, build_editor
from .implant import implant
from .robustness import fair_masks

MALICIOUS = ("mask", "expanded", "incomplete")
BENIGN = ("ring", "half_ring", "elsewhere")
SCENARIOS = MALICIOUS + BENIGN


# ------------------------------------------------------------------------------- small helpers


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(path)
    with os.fdopen(fd, "w", newline="") as f:
        df.to_csv(f, index=False)
    os.replace(tmp, path)
    return path


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


def _code_hash(editor: torch.nn.Module) -> str:
    """A hash of the optimiser's and the editor's source: changed code invalidates earlier outputs."""
    import sys

    from . import implant
    from .editors import base

    h = hashlib.sha256()
    for module in (implant, base, sys.modules[type(editor).__module__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 float array -> (1, 3, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()


def to_mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """H x W bool array -> (1, 1, H, W) float tensor."""
    return torch.from_numpy(mask.astype(np.float32))[None, None]


def to_array(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) tensor -> H x W x 3 float array."""
    return t.detach().float().cpu().reshape(3, *t.shape[-2:]).permute(1, 2, 0).numpy()


def read_folder(folder: str | os.PathLike) -> pd.DataFrame:
    """The manifest of a stage folder (``manifest.csv``)."""
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes {folder} first")
    return pd.read_csv(path)


# ------------------------------------------------------------------------------- 1. prepare


def _fit(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize the short side to ``size`` and centre-crop to a square (mask: nearest)."""
    h, w = mask.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = Image.fromarray(np.round(image * 255).astype(np.uint8)).resize((nw, nh), Image.BICUBIC)
    msk = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)
    top, left = (nh - size) // 2, (nw - size) // 2
    box = (left, top, left + size, top + size)
    return np.asarray(img.crop(box)) / 255.0, np.asarray(msk.crop(box)) > 127


def prepare(raw_dir, out_dir, size: int = 128, limit: int = 0) -> pd.DataFrame:
    """Validate every image/mask pair of ``raw_dir`` (official layout) and write them square.

    ``size``: side in pixels after resizing (0 keeps the originals, which must then
    share one size); ``limit``: keep the first N images (0 = all). Images whose mask is
    empty after resizing are reported and dropped. Returns the manifest written.
    """
    if size < 0 or limit < 0:
        raise ValueError(f"size and limit must be >= 0, got size={size}, limit={limit}")
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    pairs = list_pairs(raw_dir)
    info = pd.read_csv(raw_dir / "manifest.csv") if (raw_dir / "manifest.csv").is_file() else None
    content = dict(zip(info["name"], info["content"], strict=True)) if info is not None else {}
    if limit:
        pairs = pairs[:limit]
    rows = []
    for name, image_path, mask_path in pairs:
        image, mask = read_pair(image_path, mask_path)
        if size:
            image, mask = _fit(image, mask, size)
        if not mask.any() or mask.all():
            raise ValueError(f"{mask_path}: mask is empty or full after resizing to {size} px")
        write_png(out_dir / f"{name}.png", image, overwrite=True)
        write_png(out_dir / f"{name}_mask.png", mask, overwrite=True)
        rows.append(
            {
                "name": name,
                "content": content.get(name, "unknown"),
                "height": image.shape[0],
                "width": image.shape[1],
                "protected_fraction": float(mask.mean()),
            }
        )
    df = pd.DataFrame(rows)
    if size == 0 and df[["height", "width"]].drop_duplicates().shape[0] > 1:
        raise ValueError(f"{raw_dir}: images differ in size; set prepare.size to resize them")
    write_csv(out_dir / "manifest.csv", df)
    return df


def load_prepared(folder, names=None) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """Manifest, images (N, 3, H, W) and masks (N, 1, H, W) of a prepared folder."""
    folder = Path(folder)
    df = read_folder(folder)
    if names is not None:
        df = df[df["name"].isin(names)].reset_index(drop=True)
    images = torch.cat([to_tensor(read_image(folder / f"{n}.png")) for n in df["name"]])
    maskt = torch.cat([to_mask_tensor(read_mask(folder / f"{n}_mask.png")) for n in df["name"]])
    return df, images, maskt


# ------------------------------------------------------------------------------- 2. editor


def editor_record(name: str, weights: str | None = None, **options) -> dict:
    """What the ``editor`` stage writes to ``models/editor.json`` and later stages load."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known editors: {', '.join(EDITORS)}")
    return {"name": name, "weights": weights or None, "options": options}


def load_editor(record_path, device: str | torch.device = "cpu"):
    """Build the editor described by the ``editor`` stage's record."""
    record = json.loads(Path(record_path).read_text())
    return build_editor(
        record["name"], weights=record["weights"], device=device, **record.get("options", {})
    )


# ------------------------------------------------------------------------------- resume and ranks


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
            for stale in self.out_dir.glob(".*.tmp"):  # a killed run's unfinished atomic write
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


# ------------------------------------------------------------------------------- 3. implant


def implant_folder(
    editor,
    prepared_dir,
    out_dir,
    *,
    batch_size: int = 6,
    device: str | torch.device = "cpu",
    progress: bool = True,
    ranks: Ranks | None = None,
    **implant_kwargs,
) -> pd.DataFrame:
    """Protect every prepared image; write ``NAME.png``, the loss curves and a manifest.

    Images already protected by an earlier run with the same settings (same hash in
    ``manifest.csv``) are kept, so an interrupted run resumes where it stopped. With
    ``ranks`` (:func:`launched_ranks`) each process takes every N-th batch; the batches
    are those of a single process, so the outputs are the same.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    ranks = ranks or Ranks()
    df = read_folder(prepared_dir)
    tag = settings_hash(
        {"editor": editor_fingerprint(editor), "code": _code_hash(editor), **implant_kwargs}
    )
    ledger = Ledger(out_dir, ranks, tables=("manifest", "losses"))
    previous = ledger.start()
    old = previous["manifest"]
    own = [c for c in old.columns if c != "content" and not c.startswith("content_")]
    done = finished_rows(old[own], tag, lambda name: out_dir / f"{name}.png")
    resumed = set(done)
    todo = [n for n in df["name"] if n not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for names in tqdm(ranks.share(batches), desc="protect", disable=not progress):
        _, x, m = load_prepared(prepared_dir, names)
        x, m = x.to(device), m.to(device)
        r = implant(editor, x, m, progress=False, **implant_kwargs)
        rows, curves = [], []
        for i, name in enumerate(names):
            write_png(out_dir / f"{name}.png", to_array(r.protected[i]), overwrite=True)
            d = r.delta[i]
            rows.append(
                {
                    "name": name,
                    "settings": tag,
                    "seconds": r.seconds / len(names),
                    "linf_8bit": float(d.abs().max() * 255),
                    "mean_abs_8bit": float(d.abs().mean() * 255),
                    "target": ",".join(f"{v:.0f}" for v in (r.target[i, :, 0, 0] * 255).tolist()),
                    **{f"final_{k}": float(v[-1, i]) for k, v in r.losses.items() if len(v)},
                }
            )
            steps = r.losses["total"].shape[0]
            curves.append(
                pd.DataFrame(
                    {"name": name, "step": np.arange(steps)}
                    | {k: v[:, i].cpu().numpy() for k, v in r.losses.items()}
                )
            )
        # Recorded after the PNGs are written: the ledger is what a resumed run trusts.
        ledger.record(manifest=pd.DataFrame(rows), losses=pd.concat(curves, ignore_index=True))
    new = ledger.collect()
    if ranks.main:
        done |= {row["name"]: row for row in new["manifest"].to_dict("records")}
        manifest = pd.DataFrame([done[n] for n in df["name"]]).merge(
            df[["name", "content"]], on="name"
        )
        write_csv(out_dir / "manifest.csv", manifest)
        old_curves = previous["losses"]
        kept = [old_curves[old_curves["name"].isin(resumed)]] if len(old_curves) else []
        kept += [new["losses"]] if len(new["losses"]) else []
        if kept:
            write_csv(out_dir / "losses.csv", latest_curves(pd.concat(kept, ignore_index=True)))
    ledger.close()
    return manifest if ranks.main else read_folder(out_dir)


# ------------------------------------------------------------------------------- 4. edit


def scenario_masks(
    mask: torch.Tensor,
    kernel: int,
    elsewhere_size: float = 0.2,
    *,
    fair: bool = False,
    shift_px: int = 4,
    seed: int = 0,
) -> dict:
    """The editing scenarios for protected regions ``mask`` (B, 1, H, W).

    Malicious (they edit the protected content): ``mask`` = m, ``expanded`` = E(m),
    ``incomplete`` = half(m) ∪ half(E(m)). Benign: ``ring`` = E(m) - m, ``half_ring``
    = half(ring) (the official "wot"), ``elsewhere`` = a square that does not touch E(m).
    ``fair=True`` adds the fair scenarios of :func:`runtime_backdoor.robustness.fair_masks`
    (``shift_px``, ``seed``).
    """
    band = M.ring(mask, kernel)
    scenarios = {
        "mask": mask,
        "expanded": M.expand(mask, kernel),
        "incomplete": M.incomplete(mask, kernel),
        "ring": band,
        "half_ring": M.half(band),
        "elsewhere": M.box_elsewhere(mask, kernel, size=elsewhere_size),
    }
    if fair:
        scenarios |= fair_masks(mask, shift_px=shift_px, seed=seed)
    return scenarios


def edit_folder(
    editor,
    prepared_dir,
    protected_dir,
    out_dir,
    *,
    kernel: int,
    elsewhere_size: float = 0.2,
    batch_size: int = 6,
    device: str | torch.device = "cpu",
    progress: bool = True,
    ranks: Ranks | None = None,
) -> pd.DataFrame:
    """Run every scenario on the clean and the protected image of every prepared image.

    Writes ``{clean,protected}/NAME__SCENARIO.png`` and ``masks/NAME__SCENARIO.png``.
    With ``ranks`` each process takes every N-th batch (see :func:`implant_folder`).
    """
    prepared_dir, protected_dir, out_dir = Path(prepared_dir), Path(protected_dir), Path(out_dir)
    df = read_folder(prepared_dir)
    names = list(df["name"])
    ranks = ranks or Ranks()
    ledger = Ledger(out_dir, ranks)
    ledger.start()
    batches = [names[i : i + batch_size] for i in range(0, len(names), batch_size)]
    for batch in tqdm(ranks.share(batches), desc="edit", disable=not progress):
        rows = []
        _, x, m = load_prepared(prepared_dir, batch)
        xp = torch.cat([to_tensor(read_image(protected_dir / f"{n}.png")) for n in batch])
        x, xp, m = x.to(device), xp.to(device), m.to(device)
        for scenario, sm in scenario_masks(m, kernel, elsewhere_size).items():
            with torch.no_grad():
                edited = editor(torch.cat([x, xp]), torch.cat([sm, sm]))
            for i, name in enumerate(batch):
                stem = f"{name}__{scenario}.png"
                write_png(out_dir / "masks" / stem, sm[i, 0].cpu().numpy() > 0.5, overwrite=True)
                write_png(out_dir / "clean" / stem, to_array(edited[i]), overwrite=True)
                write_png(
                    out_dir / "protected" / stem, to_array(edited[len(batch) + i]), overwrite=True
                )
                rows.append(
                    {
                        "name": name,
                        "scenario": scenario,
                        "kind": "malicious" if scenario in MALICIOUS else "benign",
                        "edited_fraction": float(sm[i].mean()),
                    }
                )
        ledger.record(manifest=pd.DataFrame(rows))
    rows = ledger.collect().get("manifest")
    if ranks.main:
        # The single-process order: batch by batch, scenario by scenario, name by name.
        index = {n: i for i, n in enumerate(names)}
        scenario = {s: j for j, s in enumerate(SCENARIOS)}
        key = [
            (index[n] // batch_size, scenario[s], index[n])
            for n, s in zip(rows["name"], rows["scenario"], strict=True)
        ]
        rows = rows.iloc[sorted(range(len(rows)), key=key.__getitem__)]
        out = rows.merge(df[["name", "content"]], on="name")
        write_csv(out_dir / "manifest.csv", out)
    ledger.close()
    return out if ranks.main else read_folder(out_dir)


LAUNCHED_STAGES = {"implant": implant_folder, "edit": edit_folder}


def run_stage(
    stage: str, launcher: str = "none", *, editor_record, device: str = "auto", **params
) -> pd.DataFrame:
    """Run the ``implant`` or ``edit`` stage here (``launcher="none"``) or under ``accelerate``.

    ``launcher`` is an ``accelerate launch ...`` command line without the script, e.g.
    ``accelerate launch --multi_gpu --num_processes 4``: each process builds the editor
    on its own device and takes its share of the batches (:class:`Ranks`); the outputs
    and the manifest are those of one process. ``params`` are the stage function's.
    """
    if stage not in LAUNCHED_STAGES:
        raise ValueError(f"stage must be one of {sorted(LAUNCHED_STAGES)}, got {stage!r}")
    words = shlex.split(launcher or "none")
    if words == ["none"]:
        dev = resolve_device(device)
        editor = load_editor(editor_record, device=dev)
        return LAUNCHED_STAGES[stage](editor, device=dev, **params)
    if words[:2] != ["accelerate", "launch"]:
        raise ValueError(
            f"launcher must be 'none' or 'accelerate launch [options]', got {launcher!r}"
        )
    job = {"stage": stage, "editor_record": str(editor_record), "device": device, "params": params}
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "job.json"
        spec.write_text(json.dumps(job, default=str))
        # The venv's interpreter, whether or not its bin/ is on PATH.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *words[2:]]
        subprocess.run([*cmd, "-m", "runtime_backdoor.study", str(spec)], check=True)
    return read_folder(params["out_dir"])


def _launched_worker(spec_path: str) -> None:
    """One process of :func:`run_stage` under ``accelerate launch``."""
    job = json.loads(Path(spec_path).read_text())
    ranks = launched_ranks(job["device"])
    editor = load_editor(job["editor_record"], device=ranks.device)
    params = job["params"] | {"progress": ranks.main and job["params"].get("progress", True)}
    LAUNCHED_STAGES[job["stage"]](editor, device=ranks.device, ranks=ranks, **params)


# ------------------------------------------------------------------------------- 5. evaluate


def _colour(text: str) -> np.ndarray:
    return np.array([float(v) for v in text.split(",")]) / 255


def evaluate_folder(
    prepared_dir, protected_dir, edited_dir, *, hit_tol: float = 0.1, hit_min_fraction: float = 0.5
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per image and scenario metrics, and the protection's own imperceptibility.

    References, stated once: ``*_vs_clean_edit`` compares the edit of the protected
    image with the same edit of the clean image, over the whole image or (``*_region_*``)
    over the edited region only (low under malicious edits = the protection works; high
    under benign edits = no side effect). ``target_*`` compare
    the edited region with the image's target colour. ``hit`` = at least
    ``hit_min_fraction`` of the edited region within ``hit_tol`` of the target in every
    channel. Imperceptibility compares the protected image with the original.
    """
    from . import metrics as Q

    prepared_dir, protected_dir, edited_dir = map(Path, (prepared_dir, protected_dir, edited_dir))
    protected = read_folder(protected_dir).set_index("name")
    edits = read_folder(edited_dir)
    rows = []
    for rec in edits.to_dict("records"):
        name, scenario = rec["name"], rec["scenario"]
        stem = f"{name}__{scenario}.png"
        original = read_image(prepared_dir / f"{name}.png")
        clean = read_image(edited_dir / "clean" / stem)
        prot = read_image(edited_dir / "protected" / stem)
        region = read_mask(edited_dir / "masks" / stem)
        target = np.broadcast_to(_colour(protected.loc[name, "target"]), original.shape)
        row = dict(rec)
        row["ssim_vs_clean_edit"] = Q.ssim(prot, clean)
        row["psnr_vs_clean_edit"] = Q.psnr(prot, clean)
        # The same comparison inside the edited region only, where the fill is.
        row["ssim_region_vs_clean_edit"] = Q.ssim(prot, clean, region)
        row["psnr_region_vs_clean_edit"] = Q.psnr(prot, clean, region)
        for label, img in (("clean", clean), ("protected", prot)):
            row[f"ssim_vs_original_{label}"] = Q.ssim(img, original)
            row[f"target_mse_{label}"] = Q.masked_mse(img, target, region)
            frac = Q.target_hit_fraction(img, target, region, tol=hit_tol)
            row[f"hit_fraction_{label}"] = frac
            row[f"hit_{label}"] = bool(frac >= hit_min_fraction)
        rows.append(row)
    per_edit = pd.DataFrame(rows)
    imp = []
    for name in protected.index:
        a = read_image(prepared_dir / f"{name}.png")
        b = read_image(protected_dir / f"{name}.png")
        imp.append(
            {
                "name": name,
                "content": protected.loc[name, "content"],
                "psnr": Q.psnr(b, a),
                "ssim": Q.ssim(b, a),
                "linf_8bit": float(np.abs(b - a).max() * 255),
                "seconds": float(protected.loc[name, "seconds"]),
            }
        )
    return per_edit, pd.DataFrame(imp)


def clip_fid_by_scenario(prepared_dir, edited_dir, weights: str | None, device="cpu") -> dict:
    """CLIP-FID of edited outputs against the original images, per scenario and condition.

    Needs pretrained CLIP ViT-B/32 weights; without them returns
    ``{"available": False, "reason": ...}`` — never a number from random weights.
    """
    from . import metrics as Q

    try:
        model = Q.load_clip(weights, device=device)
    except Q.ClipUnavailable as err:
        return {"available": False, "reason": str(err)}
    prepared_dir, edited_dir = Path(prepared_dir), Path(edited_dir)
    edits = read_folder(edited_dir)
    names = sorted(edits["name"].unique())
    originals = [read_image(prepared_dir / f"{n}.png") for n in names]
    out: dict = {"available": True, "n_images": len(names)}
    for scenario in SCENARIOS:
        for label in ("clean", "protected"):
            imgs = [read_image(edited_dir / label / f"{n}__{scenario}.png") for n in names]
            out[f"{scenario}_{label}"] = float(Q.clip_fid(imgs, originals, model=model))
    return out


def summarize(per_edit: pd.DataFrame, imperceptibility: pd.DataFrame, clip: dict) -> dict:
    """The flat ``reports/metrics.json`` (DVC metrics): means over images."""
    from .stats import estimate

    out: dict = {"n_images": int(imperceptibility.shape[0])}

    def put(name: str, values) -> None:
        """The mean over images and its 95 % interval (``_low``, ``_high``)."""
        e = estimate(np.asarray(values, dtype=float))
        out[name], out[f"{name}_low"], out[f"{name}_high"] = e.mean, e.low, e.high

    for scenario, g in per_edit.groupby("scenario"):
        kind = "malicious" if scenario in MALICIOUS else "benign"
        key = f"{kind}_{scenario}"
        for label in ("clean", "protected"):
            put(f"{key}_hit_rate_{label}", g[f"hit_{label}"])
            put(f"{key}_hit_fraction_{label}", g[f"hit_fraction_{label}"])
            put(f"{key}_ssim_vs_original_{label}", g[f"ssim_vs_original_{label}"])
        put(f"{key}_ssim_vs_clean_edit", g["ssim_vs_clean_edit"])
        put(f"{key}_ssim_region_vs_clean_edit", g["ssim_region_vs_clean_edit"])
        put(f"{key}_target_mse_clean", g["target_mse_clean"])
        put(f"{key}_target_mse_protected", g["target_mse_protected"])
        # An identical edit has infinite PSNR: counted as 100 dB so that means stay finite.
        finite = g["psnr_vs_clean_edit"].replace(np.inf, 100.0)
        put(f"{key}_psnr_vs_clean_edit", finite)
        out[f"{key}_psnr_vs_clean_edit_min"] = float(finite.min())
        put(
            f"{key}_psnr_region_vs_clean_edit",
            g["psnr_region_vs_clean_edit"].replace(np.inf, 100.0),
        )
    put("protection_psnr", imperceptibility["psnr"])
    out["protection_psnr_min"] = float(imperceptibility["psnr"].min())
    put("protection_ssim", imperceptibility["ssim"])
    out["protection_linf_8bit_max"] = float(imperceptibility["linf_8bit"].max())
    out["protection_seconds_per_image"] = float(imperceptibility["seconds"].mean())
    out["clip_fid_available"] = bool(clip.get("available", False))
    for k, v in clip.items():
        if k not in ("available", "reason"):
            out[f"clip_fid_{k}"] = v
    return out


# ------------------------------------------------------------------------------- ε sweep


def pick_names(manifest: pd.DataFrame, per_content: int) -> list[str]:
    """The first ``per_content`` images of each content type (all with 0)."""
    if per_content <= 0:
        return list(manifest["name"])
    return list(manifest.groupby("content", sort=True).head(per_content)["name"])


def eps_sweep(
    editor,
    prepared_dir,
    eps_values,
    *,
    names=None,
    kernel: int = 5,
    steps: int = 20,
    seed: int = 0,
    hit_tol: float = 0.1,
    hit_min_fraction: float = 0.5,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Protection against ``editor`` at each budget in ``eps_values`` (fractions of the range).

    Per image and ε: the share of the protected region on target when it is edited
    (malicious), the PSNR of the ring edit of the protected image against the ring edit
    of the clean image (benign), and the PSNR of the protection itself.
    """
    from . import metrics as Q

    df, x, m = load_prepared(prepared_dir, names)
    x, m = x.to(device), m.to(device)
    band = M.ring(m, kernel)
    with torch.no_grad():
        clean_ring = editor(x, band)
        clean_fill = editor(x, m)
    rows = []
    for eps in tqdm(list(eps_values), desc="ε sweep", disable=not progress):
        r = implant(
            editor, x, m, eps=eps, steps=steps, expand_kernel=kernel, seed=seed, progress=False
        )
        with torch.no_grad():
            fill = editor(r.protected, m)
            ring_edit = editor(r.protected, band)
        for i, name in enumerate(df["name"]):
            region = m[i, 0].cpu().numpy() > 0.5
            target = to_array(r.target[i])
            frac = Q.target_hit_fraction(to_array(fill[i]), target, region, tol=hit_tol)
            rows.append(
                {
                    "eps": eps,
                    "eps_8bit": eps * 255,
                    "name": name,
                    "content": df["content"][i],
                    "hit_fraction": frac,
                    "hit": bool(frac >= hit_min_fraction),
                    "hit_fraction_clean": Q.target_hit_fraction(
                        to_array(clean_fill[i]), target, region, tol=hit_tol
                    ),
                    "target_mse": Q.masked_mse(to_array(fill[i]), target, region),
                    "ring_psnr": Q.psnr(to_array(ring_edit[i]), to_array(clean_ring[i])),
                    "protection_psnr": Q.psnr(to_array(r.protected[i]), to_array(x[i])),
                }
            )
    return pd.DataFrame(rows)


if __name__ == "__main__":
    _launched_worker(sys.argv[1])
