"""Stage ``edit``: every scenario (malicious and benign masks) on the clean and the protected image.

Writes ``data/edited/{clean,protected,masks}/NAME__SCENARIO.png`` and a manifest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import (
    load_prepared,
    read_folder,
    read_image,
    to_array,
    to_tensor,
    write_csv,
    write_json,
    write_png,
)
from ..launch import Ledger, Ranks, run_stage
from ..masks import MALICIOUS, SCENARIOS, scenario_masks


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
    With ``ranks`` each process takes every N-th batch (see :func:`runtime_backdoor.pipeline.implant.implant_folder`).
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


def run(
    out_dir,
    *,
    prepared_dir="data/prepared",
    protected_dir="data/protected",
    editor_record="models/editor/editor.json",
    expand_kernel: int = 5,
    elsewhere_size: float = 0.2,
    batch_size: int = 6,
    device: str = "auto",
    launcher: str = "none",
) -> dict:
    """The stage: edit every image in every scenario (here or under ``launcher``), summarise."""
    edits = run_stage(
        edit_folder, launcher, editor_record=editor_record, device=device,
        prepared_dir=prepared_dir, protected_dir=protected_dir, out_dir=out_dir,
        kernel=expand_kernel, elsewhere_size=elsewhere_size, batch_size=batch_size,
    )  # fmt: skip
    summary = {"n_edits": int(len(edits)), "scenarios": sorted(edits["scenario"].unique().tolist())}
    write_json(Path(out_dir) / "summary.json", summary)
    return {"edits": edits, "summary": summary}
