"""Scale-out with `accelerate launch`: two CPU processes (gloo) write the bytes one process writes,
merge into one manifest, and a run killed mid-way resumes without losing or repeating an image."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from runtime_backdoor.data import write_json
from runtime_backdoor.editors import editor_record, load_recorded_editor
from runtime_backdoor.launch import Ranks, run_stage
from runtime_backdoor.pipeline.edit import edit_folder
from runtime_backdoor.pipeline.implant import implant_folder

# Every test here starts processes (accelerate launch): the slow tier (make test-all).
pytestmark = pytest.mark.slow

N_IMAGES = 6
STEPS = "8"
# One thread per process in every run: the float results then do not depend on threading.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    # Each launch its own rendezvous port: other runs on the machine may hold the default one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def protect_cmd(prefix, src, out):
    cli = ["-m", "runtime_backdoor.cli", "protect", str(src), "--editor", "blur-fill"]
    return [*prefix, *cli, "--out", str(out), "--steps", STEPS, "--device", "cpu", "--quiet"]


def computed(stdout: str) -> list[str]:
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [r["name"] for r in rows if r.get("status") == "done"]


def recorded_in(out) -> list[str]:
    """The images a (running or killed) launch has recorded as finished."""
    try:
        parts = [pd.read_csv(p) for p in out.glob(".parts/manifest.rank*.csv")]
    except (pd.errors.EmptyDataError, FileNotFoundError):  # a part being replaced
        return []
    return [n for p in parts for n in p["name"]]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (the workers run in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(stat))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def outputs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    gen = np.random.default_rng(0)
    for i in range(N_IMAGES):
        mask = np.zeros((24, 24), np.uint8)
        mask[5 + i % 4 : 15 + i % 4, 6:16] = 255
        image = (gen.random((24, 24, 3)) * 200 + 20).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i:02d}_example.png")
        Image.fromarray(mask).save(folder / f"img{i:02d}_example_mask.png")
    return folder


@pytest.fixture(scope="module")
def single(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    done = subprocess.run(
        protect_cmd([sys.executable], photos, out), env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert sorted(computed(done.stdout)) == [f"img{i:02d}" for i in range(N_IMAGES)]
    return out


def test_two_processes_write_the_bytes_of_one(photos, single, tmp_path):
    out = tmp_path / "two"
    done = subprocess.run(
        protect_cmd(launch(2), photos, out), env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = computed(done.stdout)
    assert sorted(names) == sorted(set(names)) and len(names) == N_IMAGES  # each image once
    assert outputs(out) == outputs(single)  # images and masks, byte for byte
    one, two = (pd.read_csv(d / "manifest.csv").drop(columns=["seconds"]) for d in (single, out))
    pd.testing.assert_frame_equal(one.drop(columns=["out"]), two.drop(columns=["out"]))
    assert not list(out.glob(".parts/*"))


def test_a_killed_run_resumes_without_losing_or_repeating(photos, single, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        protect_cmd(launch(2), photos, out),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while len(recorded_in(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)  # the launcher and its workers, at once, like a lost node
    proc.wait()
    recorded = recorded_in(out)
    assert 2 <= len(recorded) < N_IMAGES, "the run should be killed mid-way"
    again = subprocess.run(
        protect_cmd(launch(2), photos, out), env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    redone = computed(again.stdout)
    summary = json.loads(again.stdout.splitlines()[-1])
    assert not set(redone) & set(recorded)  # nothing recorded is done again
    assert sorted(redone + recorded) == [f"img{i:02d}" for i in range(N_IMAGES)]  # nothing lost
    assert summary["resumed"] == len(recorded) and summary["computed"] == len(redone)
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["status"].eq("done").all() and manifest["settings"].nunique() == 1
    assert outputs(out) == outputs(single)
    assert not list(out.glob(".parts/*")) and not list(out.glob(".*.tmp"))


def test_start_folds_a_killed_runs_parts_and_drops_its_unfinished_writes(tmp_path):
    """A process killed inside an atomic write leaves a temporary file, in the folder or in
    .parts/: the next run removes it and keeps the finished rows."""
    from runtime_backdoor.launch import Ledger

    out = tmp_path / "out"
    (out / ".parts").mkdir(parents=True)
    pd.DataFrame({"name": ["a"], "status": ["done"]}).to_csv(out / "manifest.csv", index=False)
    pd.DataFrame({"name": ["b"], "status": ["done"]}).to_csv(
        out / ".parts" / "manifest.rank1.csv", index=False
    )
    (out / ".parts" / ".manifest.rank0.csv.9buknl97.tmp").write_text("name,sta")
    (out / ".a.png.x1y2.tmp").write_bytes(b"\x89PNG")
    tables = Ledger(out).start()
    assert list(tables["manifest"]["name"]) == ["a", "b"]
    assert not list(out.glob(".parts/*")) and not list(out.glob(".*.tmp"))


def _prepared(folder, n=4, size=24):
    folder.mkdir()
    gen = np.random.default_rng(1)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        mask[4 + i : 14 + i, 6:16] = 255
        image = (gen.random((size, size, 3)) * 200 + 20).astype(np.uint8)
        Image.fromarray(image).save(folder / f"p{i}.png")
        Image.fromarray(mask).save(folder / f"p{i}_mask.png")
    pd.DataFrame({"name": [f"p{i}" for i in range(n)], "content": "logo"}).to_csv(
        folder / "manifest.csv", index=False
    )
    return folder


def test_pipeline_stages_split_by_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prepared = _prepared(tmp_path / "prepared")
    record = write_json(tmp_path / "editor.json", editor_record("blur-fill"))
    settings = {"budget": {"steps": 3, "expand_kernel": 5}, "batch_size": 2, "progress": False}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_stage(
            implant_folder, "none", editor_record=record, device="cpu",
            prepared_dir=prepared, out_dir=tmp_path / "p1", **settings,
        )  # fmt: skip
        edit = {"kernel": 5, "batch_size": 1, "progress": False}
        editor = load_recorded_editor(record)
        edits_one = edit_folder(editor, prepared, tmp_path / "p1", tmp_path / "e1", **edit)
        # The edit stage with two ranks as threads: the split and the merge, without launches.
        barrier = threading.Barrier(2)
        ranks = [Ranks(i, 2, torch.device("cpu"), barrier.wait) for i in range(2)]
        results = {}

        def rank(r):
            results[r.index] = edit_folder(
                editor, prepared, tmp_path / "p1", tmp_path / "e2", ranks=r, **edit
            )

        workers = [threading.Thread(target=rank, args=(r,)) for r in ranks]
        [w.start() for w in workers]
        [w.join() for w in workers]
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(edits_one, results[0], check_dtype=False)
    pd.testing.assert_frame_equal(edits_one, results[1], check_dtype=False)
    for sub in ("clean", "protected", "masks"):
        assert outputs(tmp_path / "e1" / sub) == outputs(tmp_path / "e2" / sub)
    # The implant stage under the launcher: two processes, the bytes and manifest of one.
    launcher = "accelerate launch " + " ".join(launch(2)[3:])
    two = run_stage(
        implant_folder, launcher, editor_record=record, device="cpu",
        prepared_dir=prepared, out_dir=tmp_path / "p2", **settings,
    )  # fmt: skip
    assert outputs(tmp_path / "p1") == outputs(tmp_path / "p2")
    cols = [c for c in one.columns if c != "seconds"]
    pd.testing.assert_frame_equal(one[cols], two[cols], check_dtype=False)
    losses = [pd.read_csv(tmp_path / d / "losses.csv") for d in ("p1", "p2")]
    pd.testing.assert_frame_equal(*losses)
    with pytest.raises(ValueError, match="launcher"):
        run_stage(edit_folder, "torchrun", editor_record=record)
