"""Stage ``implant``: the run-time backdoor for every prepared image, against the recorded editor.

Writes ``data/protected/NAME.png`` (8-bit, within ε of the original), ``losses.csv``, a manifest
tagged with a settings hash (a resumed run keeps what matches) and the loss-curve figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..budget import Budget
from ..data import load_prepared, read_folder, to_array, write_csv, write_json, write_png
from ..implant import implant
from ..launch import (
    Ledger,
    Ranks,
    code_hash,
    editor_fingerprint,
    finished_rows,
    latest_curves,
    run_stage,
    settings_hash,
)
from ..plots import plt, save_figure, sns
from ..summaries import loss_curves


def implant_folder(
    editor,
    prepared_dir,
    out_dir,
    *,
    budget: Budget | dict,
    batch_size: int = 6,
    device: str | torch.device = "cpu",
    progress: bool = True,
    ranks: Ranks | None = None,
    **options,
) -> pd.DataFrame:
    """Protect every prepared image at ``budget``; write ``NAME.png``, the loss curves and a
    manifest. ``budget``: a :class:`~runtime_backdoor.budget.Budget` or its fields as a dict
    (how :func:`runtime_backdoor.launch.run_stage` hands it to other processes); ``options``:
    other keywords of :func:`runtime_backdoor.implant.implant` (``autocast_dtype``...).

    Images already protected by an earlier run with the same settings (same hash in
    ``manifest.csv``) are kept, so an interrupted run resumes where it stopped. With
    ``ranks`` (:func:`runtime_backdoor.launch.launched_ranks`) each process takes every N-th batch; the batches
    are those of a single process, so the outputs are the same.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    ranks = ranks or Ranks()
    budget = Budget(**budget) if isinstance(budget, dict) else budget
    df = read_folder(prepared_dir)
    tag = settings_hash(
        {
            "editor": editor_fingerprint(editor),
            "code": code_hash(editor),
            **budget.kwargs(),
            **options,
        }  # fmt: skip
    )
    ledger = Ledger(out_dir, ranks, tables=("manifest", "losses"))
    previous = ledger.start()
    old = previous["manifest"]
    own = [c for c in old.columns if c != "content" and not c.startswith("content_")]
    done = finished_rows(old[own], tag, lambda name: out_dir / f"{name}.png")
    resumed = set(done)
    todo = [n for n in df["name"] if n not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    if resumed and ranks.main and progress:  # say so, rather than an empty progress bar
        print(
            f"reused {len(resumed)} of {len(df)} protected images from an earlier run with the same "
            f"settings ({out_dir / 'manifest.csv'}: their seconds are that run's); "
            f"{len(todo)} to protect"
        )
    for names in tqdm(ranks.share(batches), desc="protect", disable=not progress or not todo):
        _, x, m = load_prepared(prepared_dir, names)
        x, m = x.to(device), m.to(device)
        r = implant(editor, x, m, budget=budget, progress=False, **options)
        rows, curves = _write_batch(r, names, out_dir, tag)
        # Recorded after the PNGs are written: the ledger is what a resumed run trusts.
        ledger.record(manifest=pd.DataFrame(rows), losses=pd.concat(curves, ignore_index=True))
    new = ledger.collect()
    if ranks.main:
        done |= {row["name"]: row for row in new["manifest"].to_dict("records")}
        manifest = _write_tables(out_dir, df, done, previous["losses"], new["losses"], resumed)
    ledger.close()
    return manifest if ranks.main else read_folder(out_dir)


def _write_batch(r, names: list[str], out_dir: Path, tag: str) -> tuple[list, list]:
    """Write a batch's protected images (``NAME.png``); return its manifest rows and loss
    curves."""
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
    return rows, curves


def _write_tables(
    out_dir: Path, df: pd.DataFrame, done: dict, old_curves, new_curves, resumed: set
) -> pd.DataFrame:
    """Write ``manifest.csv`` (every image, in ``df``'s order) and ``losses.csv`` (the curves
    of the images kept from an earlier run and of the new ones); return the manifest."""
    manifest = pd.DataFrame([done[n] for n in df["name"]]).merge(df[["name", "content"]], on="name")
    write_csv(out_dir / "manifest.csv", manifest)
    kept = [old_curves[old_curves["name"].isin(resumed)]] if len(old_curves) else []
    kept += [new_curves] if len(new_curves) else []
    if kept:
        write_csv(out_dir / "losses.csv", latest_curves(pd.concat(kept, ignore_index=True)))
    return manifest


def loss_plot(losses: pd.DataFrame):
    """The loss terms over optimisation steps (mean and spread over images)."""
    long = losses.melt(
        id_vars=["name", "step"], value_vars=["implant", "incomplete", "hide"], var_name="term"
    )
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.lineplot(data=long, x="step", y="value", hue="term", ax=ax, errorbar=("pi", 50))
    ax.set_yscale("log")
    ax.set_ylabel("masked MSE")
    ax.set_title("run-time backdoor optimisation")
    fig.tight_layout()
    return fig


def run(
    out_dir,
    *,
    budget: Budget,
    prepared_dir="data/prepared",
    editor_record="models/editor/editor.json",
    figure="reports/figures/loss_curves.png",
    curves="reports/plots/loss_curves.csv",
    batch_size: int = 6,
    device: str = "auto",
    launcher: str = "none",
) -> dict:
    """The stage: protect every image at ``budget`` (here or under ``launcher``), plot the
    losses (``figure``; their medians per step to ``curves``), summarise."""
    manifest = run_stage(
        implant_folder, launcher, editor_record=editor_record, device=device,
        prepared_dir=prepared_dir, out_dir=out_dir, batch_size=batch_size, budget=budget.kwargs(),
    )  # fmt: skip
    losses = pd.read_csv(Path(out_dir) / "losses.csv")
    save_figure(loss_plot(losses), figure)
    write_csv(curves, loss_curves(losses))  # the median curves for `dvc plots`
    summary = {
        "n_images": int(len(manifest)),
        "linf_8bit_max": float(manifest["linf_8bit"].max()),
        "seconds_per_image": float(manifest["seconds"].mean()),
        "final_implant_mean": float(manifest["final_implant"].mean()),
    }
    write_json(Path(out_dir) / "summary.json", summary)
    return {"manifest": manifest, "summary": summary, "figure": Path(figure)}
