"""Smoke tests of benchmarks/benchmark_protection.py: its arithmetic, FLOP counting and JSON.

No timing assertions: the machine is shared and timings are noise here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_protection.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_protection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_floor_and_extrapolation_arithmetic(bench):
    flops = bench.Flops(pass_flops=10, clean_flops=3, passes=20)
    assert flops.per_image == 203
    assert bench.floor_seconds(2e12, 1e12) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bench.floor_seconds(1.0, 0.0)
    # 2 s outside the loop are paid once; 8 s for 2 iterations -> 80 s for 20
    assert bench.extrapolate(10.0, 8.0, 2, 20) == pytest.approx(82.0)
    assert bench.extrapolate(10.0, 8.0, 20, 20) == pytest.approx(10.0)


def test_plan_iterations_fits_the_budget(bench):
    assert bench.plan_iterations(0.1, 20, 3, 45.0) == (20, 3)
    assert bench.plan_iterations(1.0, 20, 3, 30.0) == (10, 3)
    assert bench.plan_iterations(20.0, 20, 3, 45.0) == (1, 2)
    assert bench.plan_iterations(100.0, 20, 3, 45.0) == (1, 1)
    assert bench.plan_iterations(0.1, 20, 3, 45.0, cap=1) == (1, 3)
    with pytest.raises(ValueError):
        bench.Budget(repeats=0)


def test_flops_on_meta_match_a_real_run(bench):
    from torch.utils.flop_counter import FlopCounterMode

    case = bench.CASES["smoke-mini-32"]
    counted = bench.count_flops(case)
    editor = bench.build_editor(case, torch.device("cpu"))
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    m = torch.zeros(3, 1, 32, 32)
    m[..., 8:24, 8:24] = 1
    with FlopCounterMode(display=False) as counter:
        editor(x, m).sum().backward()
    assert counted.pass_flops == counter.get_total_flops() > 0
    assert counted.per_image == 20 * counted.pass_flops + counted.clean_flops


def test_checkpointing_estimate_keeps_less_but_recomputes_a_step(bench):
    plain = bench.estimate_memory(bench.CASES["tiny-sd-64-s4"])
    ckpt = bench.estimate_memory(bench.CASES["tiny-sd-64-s4-ckpt"])
    assert plain.weight_bytes == ckpt.weight_bytes > 0
    assert 0 < ckpt.activation_bytes < plain.activation_bytes


@pytest.mark.slow  # a subprocess or many benchmark cases: make test-all
def test_counts_do_not_depend_on_which_cases_ran_before(bench):
    plain, ckpt = bench.CASES["tiny-sd-64-s4"], bench.CASES["tiny-sd-64-s4-ckpt"]

    def fresh(fn, case):
        bench._count_flops.cache_clear()
        bench._saved_bytes.cache_clear()
        return fn(case)

    first = fresh(bench.count_flops, plain), fresh(bench.estimate_memory, plain)
    fresh(bench.count_flops, ckpt)  # builds an editor with checkpointing on shared parts
    fresh(bench.estimate_memory, ckpt)
    again = fresh(bench.count_flops, plain), fresh(bench.estimate_memory, plain)
    assert again == first
    assert fresh(bench.count_flops, ckpt).pass_flops > first[0].pass_flops  # recomputation


def test_case_selection(bench):
    smoke = bench.select_cases(["smoke"], "cpu")
    assert [c.name for c in smoke][:2] == ["smoke-mini-32", "smoke-mini-32-separate"]
    assert {c.name for c in bench.select_cases([], "cpu")} >= {"mini-128", "sd15-512-s4"}
    assert all(c.compare_to in bench.CASES for c in bench.CASES.values() if c.compare_to)
    with pytest.raises(SystemExit):
        bench.select_cases(["no-such-case"], "cpu")


def test_cases_name_their_editors_as_the_registry_does(bench):
    from runtime_backdoor.editors import EDITORS

    editors = {name: case.editor for name, case in bench.CASES.items()}
    assert set(editors.values()) == set(bench.EDITOR_KINDS) <= set(EDITORS)
    assert editors["mini-128"] == "mini-lama" and editors["big-lama-512"] == "lama"
    assert editors["tiny-sd-64-s4"] == "tiny-sd" and editors["sd15-512-s4"] == "sd-inpainting"
    assert editors["mat-512"] == "mat"
    with pytest.raises(ValueError, match="unknown editor kind 'sd-tiny'"):
        bench.build_editor(bench.Case("old", "sd-tiny", 32), torch.device("meta"))


def test_cases_that_cannot_run_here_are_skipped_with_their_floor(bench):
    throughput = {"fp32": 1e11}
    budget = bench.Budget(repeats=1, max_seconds=1.0)
    slow = bench.run_case(bench.CASES["big-lama-512"], torch.device("cpu"), throughput, budget)
    assert slow.status == "skipped: needs a GPU"
    assert slow.floor_seconds > 0 and slow.seconds_per_image is None
    assert slow.estimate_gib > 0
    cuda_only = bench.run_case(
        bench.CASES["big-lama-512-bf16"], torch.device("cpu"), throughput, budget
    )
    assert cuda_only.status == "skipped: needs a GPU"


@pytest.mark.slow  # a subprocess or many benchmark cases: make test-all
def test_smoke_run_writes_the_report(bench, tmp_path):
    out = tmp_path / "smoke.json"
    bench.run(
        ["smoke"],
        device="cpu",
        budget=bench.Budget(repeats=1, max_seconds=30.0, max_iterations=1),
        out=out,
        echo=lambda _: None,
    )
    report = json.loads(out.read_text())
    assert report["schema"] == bench.SCHEMA
    for key in ("device", "versions", "settings", "load_average", "rows", "comparisons"):
        assert key in report
    assert report["device"]["type"] == "cpu" and report["complete"]
    assert report["versions"]["torch"] == torch.__version__
    assert len(report["load_average"]["before"]) == 3
    assert report["matmul_flops_per_second"]["fp32"] > 0
    rows = {r["case"]: r for r in report["rows"]}
    assert set(rows) == {c.name for c in bench.select_cases(["smoke"], "cpu")}
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["seconds_per_image"] > 0 and row["floor_seconds"] > 0
        assert row["iterations_measured"] == 1 and row["extrapolated"]
        assert "extrapolated from 1" in row["note"]
        assert row["peak_memory_gib"] > 0
    assert rows["smoke-mini-32-separate"]["switches"] == "separate passes"
    whats = {c["what"] for c in report["comparisons"]}
    assert {"separate passes", "PhotoGuard-style / ours"} <= whats
    assert rows["smoke-mini-32-unfolded"]["switches"] == "unfolded"
    assert "unfolded" in whats


def test_deadline_skips_the_remaining_cases_and_still_writes_the_report(bench, tmp_path):
    out = tmp_path / "late.json"
    bench.run(["smoke-mini-32*"], device="cpu", out=out, echo=lambda _: None, deadline=0.0)
    report = json.loads(out.read_text())
    assert report["complete"] and report["settings"]["deadline_seconds"] == 0.0
    assert {r["status"] for r in report["rows"]} == {"skipped: out of time"}
    assert len(report["rows"]) == 3


@pytest.mark.slow  # a subprocess or many benchmark cases: make test-all
def test_device_checks_pass_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "device_checks", SCRIPT.parent / "device_checks.py"
    )
    checks = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = checks
    try:
        spec.loader.exec_module(checks)
        rows = checks.run("cpu", tmp_path / "checks.json", echo=lambda _: None)
    finally:
        sys.modules.pop(spec.name, None)
    assert [r.name for r in rows] == list(checks.CHECKS)
    failed = [(r.name, r.value, r.what) for r in rows if not r.passed]
    assert not failed
    by_name = {r.name: r for r in rows}
    assert by_name["lama-device-vs-cpu"].value == 0  # the CPU against itself
    assert 0 < by_name["sd-vs-diffusers-pipeline"].value < 1e-4  # two implementations
    report = json.loads((tmp_path / "checks.json").read_text())
    assert report["passed"] and report["device"] == "cpu" and len(report["checks"]) == len(rows)


# --------------------------------------------------------------------------- the GPU rehearsal

REHEARSAL = SCRIPT.parent / "rehearse_pipeline.py"
#: what the GPU image lacks; the rehearsal's code path must not need it
ABSENT_ON_GPU = ("dvc", "papermill", "open_clip")


@pytest.mark.slow
def test_rehearsal_dry_run_runs_every_stage_without_papermill_dvc_or_open_clip(tmp_path):
    import os
    import subprocess

    # A fresh interpreter in which importing any of ABSENT_ON_GPU fails, as on the GPU image.
    hide = f"import sys; sys.modules.update(dict.fromkeys({ABSENT_ON_GPU!r}))"
    run = f"import runpy; runpy.run_path({str(REHEARSAL)!r}, run_name='__main__')"
    out, keep = tmp_path / "rehearsal.json", tmp_path / "keep"
    args = ["--dry-run", "--out", str(out), "--keep", str(keep)]
    src = str(SCRIPT.parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", f"{hide}; sys.argv[1:] = {args!r}; {run}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["device"] == "cpu"
    assert report["settings"]["size"] == 64 and report["settings"]["lama_preset"] == "mini"
    pipeline = ["editor", "implant", "edit", "evaluate", "figures"]
    order = [(r["editor"], r["stage"]) for r in report["stages"]]
    expected = [("data", "prepare"), *(("lama", s) for s in pipeline)]
    sd = "sd-inpainting"
    assert order == [*expected, (sd, "prepare"), *((sd, s) for s in pipeline)]
    rows = {(r["editor"], r["stage"]): r for r in report["stages"]}
    for row in rows.values():
        assert row["status"] == "ok" and row["seconds"] > 0
        assert row["peak_gpu_gib"] is None  # no GPU memory to report on the CPU
    assert rows["data", "prepare"]["images"] == 2 and rows[sd, "prepare"]["images"] == 1
    for editor, images in (("lama", 2), (sd, 1)):
        implant = rows[editor, "implant"]
        assert implant["images"] == images and implant["seconds_per_image"] > 0
        assert implant["linf_8bit_max"] <= 6.375 + 1e-6  # the paper's ε, 8-bit grid
        assert rows[editor, "edit"]["edits"] == 6 * images
        assert rows[editor, "evaluate"]["clip_fid"] == "open_clip is not installed"
        assert 20 < rows[editor, "evaluate"]["protection_psnr"] < 60
        metrics = json.loads((keep / editor / "metrics.json").read_text())
        assert metrics["n_images"] == images and metrics["clip_fid_available"] is False
        for name in ("grid.png", "scenarios.png", "loss_curves.png"):
            assert (keep / editor / "figures" / name).stat().st_size > 5_000
        assert "| malicious | mask |" in (keep / editor / "results.md").read_text()
    assert rows["lama", "editor"]["parameters"] > 100_000  # the miniature preset


def test_rehearsal_past_its_deadline_records_every_stage_as_skipped(tmp_path):
    spec = importlib.util.spec_from_file_location("rehearse_pipeline", REHEARSAL)
    rehearse = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rehearse
    try:
        spec.loader.exec_module(rehearse)
        out = tmp_path / "late.json"
        rehearse.run(
            out, device="cpu", settings=rehearse.DRY_RUN, deadline=0.0, echo=lambda _: None
        )
        with pytest.raises(ValueError, match="--editors"):
            rehearse.run(None, device="cpu", editors=["mat"], echo=lambda _: None)
    finally:
        sys.modules.pop(spec.name, None)
    report = json.loads(out.read_text())
    assert report["complete"] and report["settings"]["deadline"] == 0.0
    assert [(r["editor"], r["stage"], r["status"]) for r in report["stages"]] == [
        ("data", "prepare", "skipped: out of time")
    ]


def test_gpu_check_runs_device_checks_then_the_rehearsal_then_the_benchmarks(tmp_path):
    """The order of gpu_check.sh's calls, with a stand-in interpreter that only logs them."""
    import subprocess

    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(tmp_path / "out"),
           "DEVICE": "cpu", "DEADLINE": "400"}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(SCRIPT.parent / "gpu_check.sh")], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    scripts = [
        word.removeprefix("benchmarks/")
        for line in log.read_text().splitlines()
        for word in line.split()[:1]
        if word.startswith("benchmarks/")
    ]
    # most important first: correctness, the rehearsal, then the benchmark rows in the time left
    assert scripts[:2] == ["device_checks.py", "rehearse_pipeline.py"]
    assert len(scripts) >= 3 and set(scripts[2:]) == {"benchmark_protection.py"}
    rehearsal = next(line for line in log.read_text().splitlines() if "rehearse" in line)
    assert "--dry-run" in rehearsal.split() and "--deadline 210" in rehearsal


def test_rehearsal_records_a_failed_stage_and_keeps_the_json(tmp_path):
    spec = importlib.util.spec_from_file_location("rehearse_pipeline", REHEARSAL)
    rehearse = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rehearse
    try:
        spec.loader.exec_module(rehearse)
        out = tmp_path / "r.json"
        rec = rehearse.Recorder(out, torch.device("cpu"), rehearse.DRY_RUN, deadline=None)
        assert rec.stage("lama", "editor", lambda: {"gain": 2.0}, echo=lambda _: None)
        assert not rec.stage("lama", "implant", lambda: 1 / 0, echo=lambda _: None)
    finally:
        sys.modules.pop(spec.name, None)
    report = json.loads(out.read_text())  # written after each stage, before the run completes
    assert not report["complete"]
    ok, failed = report["stages"]
    assert ok["status"] == "ok" and ok["gain"] == 2.0 and ok["seconds"] >= 0
    assert failed["status"] == "failed: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("total, runs_scaleout", [("520", True), ("20", False)])
def test_gpu_check_gives_the_scaleout_only_what_is_left_of_total(tmp_path, total, runs_scaleout):
    """The last step is bounded by TOTAL (the device tool's limit), and skipped under 30 s."""
    import subprocess

    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(out), "DEVICE": "cuda",
           "DEADLINE": "400", "TOTAL": total}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(SCRIPT.parent / "gpu_check.sh")], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    called = "benchmarks/benchmark_scaleout.py" in log.read_text()
    assert called == runs_scaleout
    if not runs_scaleout:
        note = (out / "gpu-scaleout.log").read_text()
        assert "scale-out step skipped" in note and "left of TOTAL=20" in note
