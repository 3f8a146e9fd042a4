"""Smoke tests of benchmarks/benchmark_protection.py: its arithmetic, FLOP counting and JSON.

No timing assertions: the machine is shared and timings are noise here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
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


def test_utilisation_and_extrapolation_arithmetic(bench):
    flops = bench.Flops(pass_flops=10, clean_flops=3, passes=20)
    assert flops.per_image == 203
    # 2 TFLOP in 4 s on a 1 TFLOP/s peak: half of it
    assert bench.utilisation(2e12, 4.0, 1e12) == pytest.approx(0.5, rel=1e-12)
    for seconds, peak in ((0.0, 1e12), (1.0, 0.0)):
        with pytest.raises(ValueError):
            bench.utilisation(1.0, seconds, peak)
    with pytest.raises(ValueError):
        bench.Peak(0.0, "nothing", True)
    # above 1 is explained, never read as faster than the peak
    measured, sheet = bench.Peak(1e12, "m", True), bench.Peak(1e12, "d", False)
    assert bench.mfu_note(1.0, measured) == bench.mfu_note(0.3, sheet) == ""
    assert bench.mfu_note(None, measured) == ""
    note = bench.mfu_note(1.6, measured)
    assert "Winograd/FFT" in note and "under load" in note and "not faster" in note
    assert "under load" not in bench.mfu_note(1.6, sheet)
    # 2 s outside the loop are paid once; 8 s for 2 iterations -> 80 s for 20
    assert bench.extrapolate(10.0, 8.0, 2, 20) == pytest.approx(82.0)
    assert bench.extrapolate(10.0, 8.0, 20, 20) == pytest.approx(10.0)


def test_peaks_are_stated_measured_on_cpu_and_datasheet_on_known_gpus(bench):
    cpu = bench.device_peaks(
        torch.device("cpu"), {"matmul": {"fp32": 0.21e12}, "conv3x3": {"fp32": 0.25e12}}
    )
    assert cpu["fp32"].flops_per_second == 0.25e12 and cpu["fp32"].measured
    assert (
        cpu["fp32"].source.startswith("measured: 3x3 convolution") and "0.21" in cpu["fp32"].source
    )
    cpu = bench.device_peaks(
        torch.device("cpu"), {"matmul": {"fp32": 0.3e12}, "conv3x3": {"fp32": 0.25e12}}
    )
    assert cpu["fp32"].flops_per_second == 0.3e12 and "matmul" in cpu["fp32"].source
    measured = {k: {"fp32": 50e12, "tf32": 300e12, "bf16": 600e12} for k in ("matmul", "conv3x3")}
    sheet = {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12}
    for name, entry in (("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100 SXM")):
        assert bench.datasheet_gpu(name) == entry
        gpu = bench.device_peaks(torch.device("cuda"), measured, gpu_name=name)
        assert {k: p.flops_per_second for k, p in gpu.items()} == sheet
        assert gpu["tf32"].source == f"datasheet: {entry} TF32 dense" and not gpu["tf32"].measured
    for name in (
        "NVIDIA H100 PCIe",
        "NVIDIA H200 NVL",
        "NVIDIA GH200 480GB",
        "NVIDIA A100-SXM4-80GB",
    ):
        assert bench.datasheet_gpu(name) is None
        gpu = bench.device_peaks(torch.device("cuda"), measured, gpu_name=name)
        assert {k: p.flops_per_second for k, p in gpu.items()} == measured["matmul"]
        assert all(p.measured and "no datasheet entry" in p.source for p in gpu.values())
    assert bench.cpu_model()  # /proc/cpuinfo's model name, or what platform knows


def test_measured_throughputs_are_positive_and_count_a_direct_convolution(bench, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "_best_seconds", lambda fn, device, repeats: seen.append(fn) or 0.5)
    got = bench.measure_throughput(torch.device("cpu"))
    batch, channels, size = bench.CONV_SHAPE["cpu"]
    assert got["conv3x3"]["fp32"] == pytest.approx(2 * batch * channels**2 * 9 * size**2 / 0.5)
    assert got["matmul"]["fp32"] == pytest.approx(2 * 2048**3 / 0.5)
    assert len(seen) == 3  # the matmul, the convolution in both memory layouts


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


def test_cases_that_cannot_run_here_are_skipped_with_their_counts(bench):
    peaks = {"fp32": bench.Peak(1e11, "measured: test", True)}
    budget = bench.Budget(repeats=1, max_seconds=1.0)
    slow = bench.run_case(bench.CASES["big-lama-512"], torch.device("cpu"), peaks, budget)
    assert slow.status == "skipped: needs a GPU" and "even at the peak (0.1 TFLOP/s)" in slow.note
    assert slow.seconds_per_image is None and slow.mfu is None and slow.mfu_note == ""
    assert slow.peak_flops_per_second == 1e11 and slow.peak_source == "measured: test"
    assert slow.seconds_at_peak == pytest.approx(slow.gflop_per_image * 1e9 / 1e11, rel=1e-12)
    assert slow.estimate_gib > 0
    cuda_only = bench.run_case(
        bench.CASES["big-lama-512-bf16"], torch.device("cpu"), {"fp32": 1e11}, budget
    )  # a bare number is a peak of unstated source
    assert cuda_only.status == "skipped: needs a GPU" and cuda_only.peak_source == "given"


def test_ensemble_cases_add_their_members_flops_and_hold_one_members_activations(bench):
    ens = bench.CASES["smoke-ensemble-mini+tiny-sd-32-s1"]
    mini, tiny = bench.CASES["smoke-mini-32"], bench.CASES["smoke-tiny-sd-32-s1"]
    assert ens.editors == ("mini-lama", "tiny-sd") and ens.label == "mini-lama+tiny-sd"
    # each member as its own case: SD settings only on the SD member
    assert [(m.editor, m.size, m.sampler_steps) for m in ens.member_cases()] == [
        ("mini-lama", 32, None),
        ("tiny-sd", 32, 1),
    ]
    counted, parts = bench.count_flops(ens), [bench.count_flops(mini), bench.count_flops(tiny)]
    assert counted.pass_flops == sum(p.pass_flops for p in parts) > 0
    assert counted.clean_flops == sum(p.clean_flops for p in parts) > 0
    assert counted.per_image == sum(p.per_image for p in parts)
    est, alone = (
        bench.estimate_memory(ens),
        [bench.estimate_memory(mini), bench.estimate_memory(tiny)],
    )
    assert est.weight_bytes == sum(a.weight_bytes for a in alone)  # every member's weights
    assert est.activation_bytes == max(a.activation_bytes for a in alone)  # one at a time
    editors = bench.build_editors(ens, torch.device("meta"))
    assert [type(e).__name__ for e in editors] == ["LamaEditor", "DiffusionInpaintEditor"]
    with pytest.raises(ValueError, match="build_editors"):
        bench.build_editor(ens, torch.device("meta"))
    with pytest.raises(ValueError, match="one editor"):
        bench.Case("x", "tiny-sd", 32, 1, photoguard=True, ensemble_with=("mini-lama",))
    # every ensemble row names member rows of the same size that run before it
    order = list(bench.CASES)
    ensembles = [c for c in bench.CASES.values() if c.ensemble_with]
    assert {len(c.editors) for c in ensembles} == {2, 3}
    for case in ensembles:
        members = [bench.CASES[m] for m in case.members]
        assert tuple(m.editor for m in members) == case.editors
        assert {m.size for m in members} == {case.size} and all(
            not m.ensemble_with for m in members
        )
        assert {m.bf16 for m in members} == {case.bf16}
        assert all(order.index(m.name) < order.index(case.name) for m in members)
        assert set(case.groups) <= {g for m in members for g in m.groups}


def test_an_ensemble_is_compared_with_its_members_also_from_an_earlier_report(bench, tmp_path):
    def row(case, seconds, peak, work, members=()):
        r = bench.Row(case, "e", 512, None, "-", "ours 20 it", members=list(members))
        r.seconds_per_image, r.peak_memory_gib, r.working_memory_gib = seconds, peak, work
        return r

    a, b = row("a", 1.0, 10.0, 8.0), row("b", 3.0, 6.0, 4.0)
    ens = row("a+b", 4.4, 11.0, 8.8, members=("a", "b"))
    expected = {
        "case": "a+b",
        "reference": "a + b",
        "what": "ensemble of 2: time / sum of members', memory / largest member's",
        "time_ratio": pytest.approx(1.1),  # against 1 + 3 s
        "peak_memory_ratio": pytest.approx(1.1),  # against the larger peak, 10 GiB
        "working_memory_ratio": pytest.approx(1.1),  # against 8 GiB
    }
    assert bench.compare([a, b, ens]) == [expected]
    # members measured in an earlier call (gpu_check's key step), read back from its JSON
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"rows": [{**asdict(r), "floor_seconds": 1.0} for r in (a, b)]}))
    references = bench.load_rows([key, tmp_path / "missing.json"])
    assert [r.case for r in references] == ["a", "b"]  # unknown fields dropped, no file skipped
    assert bench.compare([ens], references) == [expected]
    assert bench.compare([ens]) == []  # no members, no comparison


@pytest.mark.slow  # a subprocess or many benchmark cases: make test-all
def test_the_gpu_ensembles_fit_an_h100_by_the_estimate(bench):
    """Big-LaMa + MAT + SD-1.5 at 512 px: the fp32 upper bound already fits in 80 GB."""
    three = bench.estimate_memory(bench.CASES["ensemble-big-lama+mat+sd15-512-s4-bf16"])
    sd = bench.estimate_memory(bench.CASES["sd15-512-s4-bf16"])
    assert three.activation_bytes == sd.activation_bytes  # SD-1.5's, the largest member's
    assert sd.weight_bytes < three.weight_bytes < sd.weight_bytes + 2**30  # + LaMa's and MAT's
    assert three.total_bytes / 2**30 < 70
    two = bench.estimate_memory(bench.CASES["ensemble-big-lama+mat-512"])
    assert two.activation_bytes == bench.estimate_memory(bench.CASES["mat-512"]).activation_bytes
    assert two.total_bytes / 2**30 < 12


@pytest.mark.slow  # a subprocess or many benchmark cases: make test-all
def test_a_two_editor_ensemble_needs_its_larger_members_memory_not_the_sum(bench):
    """Peak RSS as the benchmark measures it (reset per case), at 64 px, one iteration.

    The process itself (about 0.8 GiB) is in every peak, so the benchmark's pairing (the
    miniature + Big-LaMa, whose sum would be about 1.1x the larger) passes 1.2x easily. Two
    Big-LaMa editors, whose sum would be twice one, show it: the working memory (peak minus what
    was held before the run, weights and LaMa's folded copy included there) stays one editor's.
    """
    budget = bench.Budget(repeats=1, max_seconds=60.0, max_iterations=1)
    peaks = {"fp32": bench.Peak(1e11, "test", True)}

    def measure(editor, *others):
        case = bench.Case("+".join((editor, *others)), editor, 64, ensemble_with=others)
        row = bench.run_case(case, torch.device("cpu"), peaks, budget)
        assert row.status == "ok", row.note
        return row

    measure("mini-lama")  # the first case of a process also holds one-time allocations
    lama, mini = measure("lama"), measure("mini-lama")
    pair, twins = measure("mini-lama", "lama"), measure("lama", "lama")
    assert 0 < mini.working_memory_gib < lama.working_memory_gib < 0.5
    assert pair.peak_memory_gib <= 1.2 * lama.peak_memory_gib
    assert pair.working_memory_gib <= 1.2 * lama.working_memory_gib
    assert 0.8 * lama.working_memory_gib <= twins.working_memory_gib
    assert twins.working_memory_gib <= 1.2 * lama.working_memory_gib  # the sum would be 2x
    # what the twins' peak adds is the second editor's weights, held once, not per iteration
    weights = bench.estimate_memory(bench.Case("w", "lama", 64)).weight_bytes / 2**30
    assert twins.peak_memory_gib - lama.peak_memory_gib < 2.5 * weights  # module + folded copy


def _keys(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


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
    assert report["schema"] == bench.SCHEMA == 2
    for key in ("device", "versions", "settings", "load_average", "rows", "comparisons"):
        assert key in report
    assert report["device"]["type"] == "cpu" and report["complete"]
    assert report["device"]["cpu_model"] == report["device"]["name"] == bench.cpu_model()
    assert report["versions"]["torch"] == torch.__version__
    assert len(report["load_average"]["before"]) == 3
    # both throughputs are recorded; the higher is the stated peak
    matmul = report["matmul_flops_per_second"]["fp32"]
    conv = report["conv3x3_flops_per_second"]["fp32"]
    assert matmul > 0 and conv > 0
    peak = report["peak_flops_per_second"]["fp32"]
    assert peak["value"] == max(matmul, conv) and peak["measured"]
    assert peak["source"].startswith("measured: ")
    assert not [k for k in _keys(report) if "floor" in k]  # MFU replaced the floor
    rows = {r["case"]: r for r in report["rows"]}
    assert set(rows) == {c.name for c in bench.select_cases(["smoke"], "cpu")}
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["seconds_per_image"] > 0
        assert row["iterations_measured"] == 1 and row["extrapolated"]
        assert "extrapolated from 1" in row["note"]
        assert row["peak_memory_gib"] > 0
        # MFU = counted FLOPs / measured seconds / the stated peak
        assert row["peak_precision"] == "fp32" and row["peak_flops_per_second"] == peak["value"]
        assert row["peak_source"] == peak["source"]
        flops_per_second = row["gflop_per_image"] * 1e9 / row["seconds_per_image"]
        assert row["mfu"] == pytest.approx(flops_per_second / peak["value"], rel=1e-9)
        assert row["tflop_per_second"] == pytest.approx(flops_per_second / 1e12, rel=1e-9)
        assert (row["mfu_note"] != "") == (row["mfu"] > 1)
    assert rows["smoke-mini-32-separate"]["switches"] == "separate passes"
    whats = {c["what"] for c in report["comparisons"]}
    assert {"separate passes", "PhotoGuard-style / ours"} <= whats
    assert rows["smoke-mini-32-unfolded"]["switches"] == "unfolded"
    assert "unfolded" in whats
    # the ensemble: its editor, its FLOPs (the members' sum) and its comparison with them
    ens = rows["smoke-ensemble-mini+tiny-sd-32-s1"]
    assert ens["editor"] == "mini-lama+tiny-sd" and ens["switches"] == "ensemble of 2"
    members = [rows["smoke-mini-32"], rows["smoke-tiny-sd-32-s1"]]
    assert ens["members"] == [m["case"] for m in members]
    assert ens["gflop_per_image"] == pytest.approx(sum(m["gflop_per_image"] for m in members))
    (entry,) = [c for c in report["comparisons"] if c["case"] == ens["case"]]
    assert entry["reference"] == "smoke-mini-32 + smoke-tiny-sd-32-s1"
    total = sum(m["seconds_per_image"] for m in members)
    assert entry["time_ratio"] == pytest.approx(ens["seconds_per_image"] / total)
    largest = max(m["peak_memory_gib"] for m in members)
    assert entry["peak_memory_ratio"] == pytest.approx(ens["peak_memory_gib"] / largest)
    table = bench.table([bench.Row(**r) for r in report["rows"]], report["comparisons"])
    assert "| MFU " in table and "MFU note" in table and "floor" not in table


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


def test_gpu_check_runs_device_checks_then_the_rehearsal_then_the_benchmarks(bench, tmp_path):
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
    # the targets first, then the ensembles against their rows, then the rest
    bench_calls = [line.split() for line in log.read_text().splitlines() if "benchmark_pro" in line]
    outs = [Path(call[call.index("--out") + 1]).name for call in bench_calls]
    assert outs == ["gpu-key.json", "gpu-ensemble.json", "gpu-rest.json"]
    key, ens, _ = bench_calls
    # the key step leaves ENSEMBLE (75) seconds of the deadline: at most 400 - 75 left
    assert float(key[key.index("--deadline-seconds") + 1]) <= 325
    assert ens[ens.index("--compare-with") + 1].endswith("gpu-key.json")
    cases = ens[ens.index("--cases") + 1 :]
    assert cases == ["ensemble-big-lama+mat-512", "ensemble-big-lama+mat+sd15-512-s4-bf16"]
    for name in cases:
        members = bench.CASES[name].members
        assert "gpu" in bench.CASES[name].groups and set(members) <= set(key), name


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
