"""Stage ``implant`` (runtime_backdoor.pipeline.implant): protection of a folder, resumable."""

import json

import pandas as pd
import pytest

from runtime_backdoor.editors.simple import GlobalMixEditor
from runtime_backdoor.implant import Budget
from runtime_backdoor.launch import code_hash
from runtime_backdoor.pipeline import implant, prepare


def test_resume_key_covers_the_editor_code():
    from runtime_backdoor.editors.lama import load_lama

    lama = load_lama(None, preset="mini", seed=0)
    mix = GlobalMixEditor(gain=800)
    assert code_hash(mix) == code_hash(GlobalMixEditor(gain=1, seed=1))
    assert code_hash(mix) != code_hash(lama)  # simple.py vs lama.py


def test_implant_resumes_only_what_matches(raw, tmp_path):
    prepare.prepare(raw, tmp_path / "prepared", size=64)
    editor = GlobalMixEditor(gain=800)
    budget = Budget(steps=3, expand_kernel=5)

    def protect(e=editor, **over):
        return implant.implant_folder(
            e, tmp_path / "prepared", tmp_path / "protected", budget=budget.replace(**over),
            batch_size=2, progress=False,
        )  # fmt: skip

    first = protect()
    assert len(first) == 3 and first["linf_8bit"].max() <= 6.375 + 1e-6
    # An interrupted run: one output lost. The rerun redoes only that one.
    lost = tmp_path / "protected" / f"{first['name'][1]}.png"
    kept = tmp_path / "protected" / f"{first['name'][0]}.png"
    lost.unlink()
    mtime = kept.stat().st_mtime_ns
    again = protect()
    assert lost.is_file() and kept.stat().st_mtime_ns == mtime
    assert again["settings"].nunique() == 1
    assert sorted(again.columns) == sorted(first.columns)  # a resumed manifest keeps its shape
    # Other weights or other settings: nothing is reused.
    protect(GlobalMixEditor(gain=800, seed=1))
    assert kept.stat().st_mtime_ns != mtime
    mtime = kept.stat().st_mtime_ns
    protect(steps=2)
    assert kept.stat().st_mtime_ns != mtime


def test_stage_writes_losses_figure_and_summary(raw, tmp_path):
    from runtime_backdoor.data import write_json
    from runtime_backdoor.editors import editor_record

    prepare.prepare(raw, tmp_path / "prepared", size=32)
    record = write_json(tmp_path / "editor.json", editor_record("toy-control"))

    def run():
        return implant.run(
            tmp_path / "protected", prepared_dir=tmp_path / "prepared", editor_record=record,
            figure=tmp_path / "loss.png", curves=tmp_path / "plots" / "loss.csv", device="cpu",
            budget=Budget(steps=2, expand_kernel=3),
        )  # fmt: skip

    result = run()
    summary = json.loads((tmp_path / "protected" / "summary.json").read_text())
    assert summary == result["summary"] and summary["n_images"] == 3
    assert summary["linf_8bit_max"] <= 6.375 + 1e-6
    assert (tmp_path / "loss.png").stat().st_size > 5_000
    curves = pd.read_csv(tmp_path / "plots" / "loss.csv")
    losses = pd.read_csv(tmp_path / "protected" / "losses.csv")
    assert curves["step"].tolist() == [0, 1]
    assert curves["total"].tolist() == pytest.approx(
        losses.groupby("step")["total"].median().tolist()
    )


def test_a_rerun_says_what_it_reused(raw, tmp_path, capsys):
    prepare.prepare(raw, tmp_path / "prepared", size=32)

    def protect():
        return implant.implant_folder(
            GlobalMixEditor(gain=800), tmp_path / "prepared", tmp_path / "protected",
            budget=Budget(steps=2, expand_kernel=3), batch_size=2,
        )  # fmt: skip

    protect()
    assert "reused" not in capsys.readouterr().out
    protect()
    out = capsys.readouterr()
    assert (
        "reused 3 of 3 protected images from an earlier run" in out.out
        and "0 to protect" in out.out
    )
    assert "protect:" not in out.err  # no empty progress bar
