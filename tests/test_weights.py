"""Weight downloads against servers on 127.0.0.1 started here: the real fetch code, no internet.

Plain URLs go through the mirror variable to a small http.server; the hub path goes to a
fake hub endpoint (the routes huggingface_hub's ``model_info`` and
``snapshot_download`` use: repo info, tree listing, HEAD and GET of ``resolve``).
"""

import hashlib
import io
import json
import os
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runtime_backdoor import cli, downloads, weights
from runtime_backdoor.weights import REGISTRY, WeightFile, WeightsError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: several chunks, so a cut lands mid-transfer
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """Routes: path -> (status, body, headers); ``cuts[path]`` = how many GETs to cut half-way,
    ``stalls[path]`` = how many to stall half-way (until the test ends), ``unsized``: paths
    served without Content-Length (the body ends when the connection closes), ``ranges``:
    paths that honour ``Range: bytes=N-`` (206, or 416 past the end; ``asked`` records each
    GET's Range header)."""

    def __init__(self):
        self.routes, self.cuts, self.stalls, self.hits = {}, {}, {}, []
        self.unsized, self.sent, self.release = set(), {}, threading.Event()
        self.ranges, self.asked = set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body):
                path = self.path.split("?", 1)[0]
                server.hits.append((self.command, path))
                status, data, headers = server.routes.get(path, (404, b"not found", {}))
                wanted = self.headers.get("Range")
                if self.command == "GET":
                    server.asked.append((path, wanted))
                if wanted and status == 200 and path in server.ranges:
                    first = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if first >= len(data):
                        status, headers = 416, {"Content-Range": f"bytes */{len(data)}"}
                        data = b""
                    else:
                        end = f"{first}-{len(data) - 1}/{len(data)}"
                        status, headers = 206, {**headers, "Content-Range": f"bytes {end}"}
                        data = data[first:]
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if path in server.unsized:
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return
                if server.stalls.get(path, 0) > 0:
                    server.stalls[path] -= 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    server.release.wait(120)  # silent, connection open
                    self.close_connection = True
                    return
                if path in server.unsized:
                    sent = 0
                    try:
                        for i in range(0, len(data), 1 << 16):
                            self.wfile.write(data[i : i + (1 << 16)])
                            sent += len(data[i : i + (1 << 16)])
                    except OSError:  # the client hung up
                        pass
                    server.sent[path] = sent
                    return
                if body and server.cuts.get(path, 0) > 0:
                    server.cuts[path] -= 1
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True  # the peer sees a short body
                    return
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def gets(self, path):
        return sum(1 for method, p in self.hits if method == "GET" and p == path)


@pytest.fixture
def server(monkeypatch, tmp_path):
    s = Server()
    s.thread.start()
    monkeypatch.setenv(weights.MIRROR_ENV, s.url)
    monkeypatch.setenv(weights.MODELS_ENV, str(tmp_path / "models"))
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def tiny(monkeypatch):
    """A registry entry for PAYLOAD; its source host is never contacted (the mirror is)."""
    spec = WeightFile(
        "tiny", "test file", "file", "https://weights.invalid/releases/tiny.bin", "sub/tiny.bin",
        "test licence", checksum=f"md5:{md5(PAYLOAD)}", size=len(PAYLOAD),
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "tiny", spec)
    return spec


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_downloads_checks_and_records(server, tiny, tmp_path):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    path, what = downloads.fetch("tiny", progress=False)
    assert path == tmp_path / "models" / "sub" / "tiny.bin"
    assert path.read_bytes() == PAYLOAD
    assert tiny.checksum in what
    assert leftovers(path.parent) == ["tiny.bin"]  # no temporary file left behind
    record = json.loads((tmp_path / "models" / "weights.json").read_text())["tiny"]
    assert record["sha256"] == sha256(PAYLOAD) and record["size"] == len(PAYLOAD)
    assert record["url"] == f"{server.url}/tiny.bin"

    # a good copy is not fetched again
    path, what = downloads.fetch("tiny", progress=False)
    assert what == "present, checksum ok" and server.gets("/tiny.bin") == 1
    assert weights.verify("tiny") == (True, f"ok: {path} ({tiny.checksum})")


def test_wrong_checksum_deletes_and_names_both_hashes(server, tiny):
    served = PAYLOAD[::-1]
    server.routes["/tiny.bin"] = (200, served, {})
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny", retries=0, progress=False)
    message = str(err.value)
    assert f"expected {tiny.checksum}, found md5:{md5(served)}" in message
    assert "deleted" in message and "\n" not in message
    assert leftovers(weights.destination(tiny).parent) == []


def test_http_404_says_what_to_do_by_hand(server, tiny):
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny", retries=0, progress=False)
    target = weights.destination(tiny)
    assert str(err.value) == (
        f"tiny: {server.url}/tiny.bin answered HTTP 404; download it elsewhere, copy it to "
        f"{target} by hand, then run `runtime-backdoor weights verify tiny`"
    )
    assert leftovers(target.parent) == []


def test_no_server_is_one_line_with_the_url(monkeypatch, tiny, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{port}")
    monkeypatch.setenv(weights.MODELS_ENV, str(tmp_path / "models"))
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny", retries=0, progress=False)
    message = str(err.value)
    assert message.startswith(f"tiny: cannot download http://127.0.0.1:{port}/tiny.bin (")
    assert "copy it to" in message and "weights verify tiny" in message and "\n" not in message


def test_transfer_cut_half_way(server, tiny):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    target = weights.destination(tiny)
    # without a retry: an error, and the half file never gets the final name
    server.cuts["/tiny.bin"] = 1
    with pytest.raises(WeightsError, match="cannot download"):
        downloads.fetch("tiny", retries=0, progress=False)
    assert leftovers(target.parent) == []
    # with one retry the download restarts from zero and succeeds
    server.cuts["/tiny.bin"] = 1
    path, _ = downloads.fetch("tiny", retries=1, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.gets("/tiny.bin") == 3
    assert leftovers(target.parent) == ["tiny.bin"]


def test_redirect_is_followed(server, monkeypatch):
    spec = WeightFile(
        "moved", "test", "file", "https://weights.invalid/moved.bin", "moved.bin", "test",
        checksum=f"md5:{md5(PAYLOAD)}",
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "moved", spec)
    server.routes["/moved.bin"] = (302, b"", {"Location": "/storage/blob-7"})
    server.routes["/storage/blob-7"] = (200, PAYLOAD, {})
    path, _ = downloads.fetch("moved", retries=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.gets("/storage/blob-7") == 1


def test_corrupt_local_copy_is_reported_then_replaced(server, tiny):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    target = weights.destination(tiny)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    ok, line = weights.verify("tiny")
    assert not ok
    assert f"expected {tiny.checksum}, found md5:{md5(b'truncated')}" in line
    downloads.fetch("tiny", retries=0, progress=False)
    assert target.read_bytes() == PAYLOAD and server.gets("/tiny.bin") == 1


def test_real_entry_goes_to_the_mirror(server):
    # the registry's own big-lama entry, against the local server (which has no such file)
    with pytest.raises(WeightsError) as err:
        downloads.fetch("big-lama", retries=0, progress=False)
    assert f"{server.url}/big-lama.pt answered HTTP 404" in str(err.value)
    assert server.hits == [("GET", "/big-lama.pt")]


def make_zip(files: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def test_zip_without_published_checksum_is_recorded_on_first_fetch(server, tmp_path, monkeypatch):
    ckpt, config = PAYLOAD[:1000], b"generator: ffc_resnet\n"
    archive = make_zip({"big-lama/models/best.ckpt": ckpt, "big-lama/config.yaml": config})
    server.routes["/big-lama.zip"] = (200, archive, {})
    folder, what = downloads.fetch("big-lama-ckpt", retries=0, progress=False)
    models = tmp_path / "models"
    assert folder == models / "big-lama"
    assert (folder / "models" / "best.ckpt").read_bytes() == ckpt
    assert (folder / "config.yaml").read_bytes() == config
    assert sha256(archive) in what and "recorded" in what
    assert leftovers(models) == ["big-lama", "weights.json"]  # the zip and temporaries are gone
    record = json.loads((models / "weights.json").read_text())["big-lama-ckpt"]
    assert record["zip_sha256"] == sha256(archive) and record["check_sha256"] == sha256(ckpt)
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # like any other folder
    assert (models / "weights.json").stat().st_mode & 0o777 == 0o666 & ~umask

    _, what = downloads.fetch("big-lama-ckpt", retries=0, progress=False)
    assert what.startswith("present") and server.gets("/big-lama.zip") == 1
    assert weights.verify("big-lama-ckpt")[0]
    (folder / "models" / "best.ckpt").write_bytes(b"x")
    ok, line = weights.verify("big-lama-ckpt")
    assert not ok and f"expected sha256:{sha256(ckpt)}" in line and sha256(b"x") in line


def test_zip_with_unsafe_paths_is_refused(server):
    server.routes["/big-lama.zip"] = (
        200,
        make_zip({"big-lama/models/best.ckpt": b"x", "big-lama/../../evil": b"y"}),
        {},
    )
    with pytest.raises(WeightsError, match="unsafe member path"):
        downloads.fetch("big-lama-ckpt", retries=0, progress=False)
    assert leftovers(weights.models_dir()) == []  # nothing extracted, nothing left


# ---------------------------------------------------------------- hub


HUB_REPO = "test-org/tiny-hub-repo"


@pytest.fixture
def hub_spec(monkeypatch):
    """A hub entry of the tests' own (the registry's entries change with the study)."""
    spec = WeightFile(
        "tiny-hub", "test hub repo", "hub", HUB_REPO, "hub/tiny", "test licence",
        hub_files=("open_clip_model.safetensors",),
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "tiny-hub", spec)
    return spec


@pytest.fixture
def hub(server, monkeypatch, hub_spec):
    """The fake hub serves a two-file repo; returns the files."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    repo = HUB_REPO
    files = {"open_clip_model.safetensors": PAYLOAD[:5000], "README.md": b"# readme\n"}
    siblings = [
        {
            "rfilename": n,
            "size": len(d),
            "lfs": {"sha256": sha256(d), "size": len(d), "pointerSize": 130},
        }
        for n, d in files.items()
    ]
    info = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings})
    for route in (f"/api/models/{repo}", f"/api/models/{repo}/revision/{COMMIT}"):
        server.routes[route] = (
            200, info.encode(), {"Content-Type": "application/json"},
        )  # fmt: skip
    tree = [
        {"type": "file", "path": n, "size": len(d), "oid": sha256(d)[:40],
         "lfs": {"oid": sha256(d), "size": len(d), "pointerSize": 130}}
        for n, d in files.items()
    ]  # fmt: skip
    server.routes[f"/api/models/{repo}/tree/{COMMIT}"] = (
        200, json.dumps(tree).encode(), {"Content-Type": "application/json"},
    )  # fmt: skip
    for name, data in files.items():
        server.routes[f"/{repo}/resolve/{COMMIT}/{name}"] = (
            200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{sha256(data)}"'},
        )  # fmt: skip
    return files


def test_hub_fetch_takes_only_the_needed_files_and_records_the_commit(server, hub, tmp_path):
    path, what = downloads.fetch("tiny-hub")
    folder = tmp_path / "models" / "hub" / "tiny"
    assert path == folder and COMMIT in what
    assert (folder / "open_clip_model.safetensors").read_bytes() == hub[
        "open_clip_model.safetensors"
    ]
    assert not (folder / "README.md").exists()  # not a file the study needs
    record = json.loads((tmp_path / "models" / "weights.json").read_text())["tiny-hub"]
    assert record["commit"] == COMMIT
    assert record["files"] == {
        "open_clip_model.safetensors": {
            "size": 5000, "sha256": sha256(hub["open_clip_model.safetensors"])
        }
    }  # fmt: skip
    assert weights.primary_path(REGISTRY["tiny-hub"]) == folder / "open_clip_model.safetensors"
    # present and matching: no second download
    gets = server.gets(f"/{HUB_REPO}/resolve/{COMMIT}/open_clip_model.safetensors")
    _, what = downloads.fetch("tiny-hub")
    assert what.startswith("present") and gets == 1
    assert weights.verify("tiny-hub") == (True, f"ok: {folder} (commit {COMMIT}, 1 files)")


def test_hub_checksum_mismatch_deletes_the_file(server, hub, tmp_path):
    repo = HUB_REPO
    bad = b"tampered"
    server.routes[f"/{repo}/resolve/{COMMIT}/open_clip_model.safetensors"] = (
        200, bad, {"X-Repo-Commit": COMMIT, "ETag": '"x"'},
    )  # fmt: skip
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny-hub")
    expected = sha256(hub["open_clip_model.safetensors"])
    assert f"expected sha256:{expected}, found sha256:{sha256(bad)}" in str(err.value)
    assert not (tmp_path / "models/hub/tiny/open_clip_model.safetensors").exists()


def test_a_stalled_hub_file_gives_up_and_says_how_to_copy_it(server, hub, monkeypatch, tmp_path):
    monkeypatch.setattr(downloads, "STALL_SECONDS", 0.5)
    route = f"/{HUB_REPO}/resolve/{COMMIT}/open_clip_model.safetensors"
    server.stalls[route] = 5
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny-hub")
    message = str(err.value)
    assert "(stalled: no data for 0.5 s after 2,500 of 5,000 bytes)" in message
    assert f"hf download {HUB_REPO} open_clip_model.safetensors" in message and "\n" not in message
    assert not (tmp_path / "models/hub/tiny/open_clip_model.safetensors").exists()
    assert leftovers(tmp_path / "models/hub/tiny") == []


def test_a_hub_file_larger_than_its_listed_size_is_refused(server, hub, tmp_path):
    route = f"/{HUB_REPO}/resolve/{COMMIT}/open_clip_model.safetensors"
    server.routes[route] = (200, PAYLOAD, {"X-Repo-Commit": COMMIT})  # 1 MiB, listed at 5,000
    limit = 5000 + downloads.SIZE_MARGIN
    with pytest.raises(
        WeightsError, match=f"it announced 1,048,576 bytes, more than the {limit:,}"
    ):
        downloads.fetch("tiny-hub")
    server.unsized.add(route)  # no Content-Length: the transfer stops at the limit
    with pytest.raises(WeightsError, match=f"it sent more than {limit:,} bytes"):
        downloads.fetch("tiny-hub")
    assert leftovers(tmp_path / "models/hub/tiny") == []


def test_hub_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(weights.MODELS_ENV, str(tmp_path / "models"))
    with pytest.raises(WeightsError) as err:
        downloads.fetch("sd15-inpainting")
    message = str(err.value)
    assert "hf download stable-diffusion-v1-5/stable-diffusion-inpainting" in message
    assert f"--local-dir {tmp_path / 'models' / 'sd15-inpainting'}" in message
    assert "weights verify sd15-inpainting" in message and "\n" not in message
    assert "(HF_HUB_OFFLINE is set: unset it to download, as `make weights` does)" in message


def test_hub_unreachable_is_one_line(monkeypatch, tmp_path, hub_spec):
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv(weights.MODELS_ENV, str(tmp_path / "models"))
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny-hub")
    message = str(err.value)
    assert message.startswith(f"tiny-hub: cannot download {HUB_REPO}")
    assert "weights verify tiny-hub" in message and "\n" not in message


# ---------------------------------------------------------------- CLI


def test_cli_list_shows_every_file(capsys):
    assert cli.main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for spec in REGISTRY.values():
        assert f"{spec.name}" in out and spec.source in out and spec.licence in out
    assert "205,669,692 bytes" in out and "md5:e3aa4aaa15225a33ec84f9f4bc47e500" in out
    assert "md5:8ca927835fa3f5e21d65ffcb165377ed" in out
    clip = weights.primary_path(REGISTRY["clip-vit-b-32"], Path("models"))
    assert f"goes to  {clip}" in out and str(clip).startswith("models/clip/")
    assert out.count("[make weights]") == len(downloads.DEFAULT_SET)


def test_cli_verify_and_fetch_exit_codes(server, tiny, capsys):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    assert cli.main(["weights", "verify", "tiny"]) == 1
    assert "missing:" in capsys.readouterr().out
    assert cli.main(["weights", "verify"]) == 0  # nothing fetched yet: listed, not failed
    assert "tiny: not fetched" in capsys.readouterr().out
    assert cli.main(["weights", "fetch", "tiny"]) == 0
    assert "tiny: downloaded" in capsys.readouterr().out
    assert cli.main(["weights", "verify"]) == 0
    assert "tiny: ok:" in capsys.readouterr().out
    assert cli.main(["weights", "fetch", "nonesuch"]) == 2
    assert capsys.readouterr().err.startswith(
        "runtime-backdoor weights: error: unknown weights 'nonesuch'; known: big-lama"
    )


# ---------------------------------------------------------------- stalls and sizes


def test_a_stall_mid_body_gives_up_within_the_stall_time_and_says_so(server, tiny, monkeypatch):
    import time

    monkeypatch.setattr(downloads, "STALL_SECONDS", 1.0)
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.stalls["/tiny.bin"] = 2
    target = weights.destination(tiny)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny", retries=1, progress=False)  # two attempts, both stall
    seconds = time.monotonic() - start
    assert str(err.value) == (
        f"tiny: cannot download {server.url}/tiny.bin (stalled: no data for 1 s after "
        f"524,288 of 1,048,576 bytes); download it elsewhere, copy it to {target} by hand, "
        "then run `runtime-backdoor weights verify tiny`"
    )
    assert server.gets("/tiny.bin") == 2 and seconds < 2 * 1.0 + 2, seconds
    assert leftovers(target.parent) == []
    # a stall that clears: the next attempt completes
    server.stalls["/tiny.bin"] = 1
    path, _ = downloads.fetch("tiny", retries=1, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_stalls_stop_retrying_once_another_would_pass_the_give_up_time(server, tiny, monkeypatch):
    """The default constants (30 s, 90 s) at a thirtieth of the scale: two attempts, not three."""
    import time

    monkeypatch.setattr(downloads, "STALL_SECONDS", 1.0)
    monkeypatch.setattr(downloads, "GIVE_UP_SECONDS", 3.0)
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.stalls["/tiny.bin"] = 3
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"\(stalled: "):
        downloads.fetch("tiny", retries=2, progress=False)
    assert server.gets("/tiny.bin") == 2 and time.monotonic() - start < 3.0


@pytest.mark.slow
def test_a_stalled_download_fails_within_90_seconds_at_the_real_timeouts(server, tiny):
    import time

    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.stalls["/tiny.bin"] = 3
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"\(stalled: no data for 30 s after 524,288"):
        downloads.fetch("tiny", progress=False)  # the CLI's default retries
    seconds = time.monotonic() - start
    assert 60 <= seconds < 90 and server.gets("/tiny.bin") == 2, seconds


def test_the_stall_time_is_30_seconds_per_attempt():
    assert downloads.STALL_SECONDS == 30


def test_a_trickle_is_a_stall(server, tiny, monkeypatch):
    monkeypatch.setattr(downloads, "STALL_SECONDS", 0.3)
    monkeypatch.setattr(downloads, "STALL_MIN_BYTES", 2 * len(PAYLOAD))  # never reached in 0.3 s
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.stalls["/tiny.bin"] = 1  # half at once, then nothing: the window sees too little
    with pytest.raises(WeightsError, match=r"\(stalled: "):
        downloads.fetch("tiny", retries=0, progress=False)


def test_more_bytes_than_registered_are_refused(server, tiny):
    too_much = PAYLOAD * 3
    limit = downloads.size_limit(tiny)
    assert limit == len(PAYLOAD) + 64 * 1024  # 1 MiB registered: the 64 KiB margin
    target = weights.destination(tiny)
    # announced in Content-Length: refused before the body
    server.routes["/tiny.bin"] = (200, too_much, {})
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny", retries=2, progress=False)
    assert (
        f"(it announced 3,145,728 bytes, more than the {limit:,} expected (registered size "
        "plus margin); nothing was downloaded)" in str(err.value)
    )
    assert server.gets("/tiny.bin") == 1  # not retried: the file is not the registered one
    # not announced: the transfer stops at the limit
    server.unsized.add("/tiny.bin")
    with pytest.raises(WeightsError) as err:
        downloads.fetch("tiny", retries=2, progress=False)
    assert f"(it sent more than {limit:,} bytes (registered size plus margin); stopped there)" in str(err.value)  # fmt: skip
    assert server.gets("/tiny.bin") == 2 and leftovers(target.parent) == []


def test_an_unsized_download_of_the_right_size_is_fine(server, tiny):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.unsized.add("/tiny.bin")
    path, _ = downloads.fetch("tiny", retries=0, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_the_big_lama_entry_is_capped_near_its_size():
    spec = REGISTRY["big-lama"]
    assert spec.size < downloads.size_limit(spec) <= spec.size * 1.011
    assert downloads.size_limit(REGISTRY["mat-places512"]) == downloads.MAX_UNREGISTERED_BYTES


def test_a_refused_connection_is_named(monkeypatch, tiny, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(weights.MIRROR_ENV, f"http://127.0.0.1:{port}")
    monkeypatch.setenv(weights.MODELS_ENV, str(tmp_path / "models"))
    with pytest.raises(WeightsError, match=r"\(could not connect: Connection refused\)"):
        downloads.fetch("tiny", retries=0, progress=False)


def test_a_server_error_is_retried_and_a_404_is_not(server, tiny):
    server.routes["/tiny.bin"] = (503, b"busy", {})
    with pytest.raises(WeightsError, match="answered HTTP 503"):
        downloads.fetch("tiny", retries=2, progress=False)
    assert server.gets("/tiny.bin") == 3


def test_a_published_hash_prefix_is_checked(server, monkeypatch, tmp_path):
    """torchvision names its files with the SHA-256's first 8 digits (the LPIPS backbones)."""
    spec = WeightFile(
        "prefixed", "test", "file", "https://weights.invalid/prefixed.bin", "prefixed.bin",
        "test", checksum=f"sha256:{sha256(PAYLOAD)[:8]}",
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "prefixed", spec)
    server.routes["/prefixed.bin"] = (200, PAYLOAD[::-1], {})  # another file
    with pytest.raises(WeightsError, match=f"expected sha256:{sha256(PAYLOAD)[:8]}, found sha256:"):
        downloads.fetch("prefixed", retries=0, progress=False)
    server.routes["/prefixed.bin"] = (200, PAYLOAD, {})
    path, what = downloads.fetch("prefixed", retries=0, progress=False)
    assert path.read_bytes() == PAYLOAD and what == f"downloaded, sha256:{sha256(PAYLOAD)[:8]} ok"
    assert weights.verify("prefixed")[0]
    path.write_bytes(PAYLOAD[:-1])
    ok, line = weights.verify("prefixed")
    assert not ok and line.startswith("checksum mismatch")
    assert weights.digest_matches("7be5be79" + "0" * 56, "7be5be79")
    assert not weights.digest_matches("7be5be79" + "0" * 56, "7be5")  # too short to mean anything
    assert REGISTRY["lpips-alex"].checksum == "sha256:7be5be79"


def _killed_fetch(target: Path, data: bytes) -> Path:
    """What a fetch killed (SIGKILL) part-way leaves: its ``.part`` with the first bytes."""
    part = downloads.part_path(target)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    return part


def test_a_killed_fetch_is_resumed_with_a_range_request(server, tiny):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.ranges.add("/tiny.bin")
    target = weights.destination(tiny)
    part = _killed_fetch(target, PAYLOAD[:300_000])
    assert part.name == ".tiny.bin.part"
    path, what = downloads.fetch("tiny", retries=0, progress=False)
    assert server.asked == [("/tiny.bin", "bytes=300000-")]  # only the rest was sent
    assert path.read_bytes() == PAYLOAD and what == f"downloaded, {tiny.checksum} ok"
    assert leftovers(target.parent) == ["tiny.bin"]  # hash checked, no .part left
    assert weights.verify("tiny")[0]


def test_a_killed_fetch_starts_over_when_the_server_ignores_range(server, tiny):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})  # no Range support: 200, whole file
    target = weights.destination(tiny)
    _killed_fetch(target, b"\xff" * 500_000)
    path, _ = downloads.fetch("tiny", retries=0, progress=False)
    assert server.asked == [("/tiny.bin", "bytes=500000-")] and server.gets("/tiny.bin") == 1
    assert path.read_bytes() == PAYLOAD and leftovers(target.parent) == ["tiny.bin"]


@pytest.mark.parametrize("kept", [b"\xff" * 300_000, PAYLOAD, PAYLOAD + b"x"])
def test_a_bad_or_whole_part_is_downloaded_again_from_the_start(server, tiny, kept):
    """A ``.part`` whose bytes are not the file's (the hash of the resumed whole does not
    match), or that holds all of it (416), is downloaded again: the hash decides."""
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.ranges.add("/tiny.bin")
    target = weights.destination(tiny)
    _killed_fetch(target, kept)
    path, _ = downloads.fetch("tiny", retries=0, progress=False)
    assert server.asked[0] == ("/tiny.bin", f"bytes={len(kept)}-")
    assert server.asked[-1] == ("/tiny.bin", None) and len(server.asked) == 2
    assert path.read_bytes() == PAYLOAD and leftovers(target.parent) == ["tiny.bin"]


def test_a_retry_resumes_where_the_cut_stopped(server, tiny):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    server.ranges.add("/tiny.bin")
    server.cuts["/tiny.bin"] = 1
    path, _ = downloads.fetch("tiny", retries=1, progress=False)
    assert server.asked == [("/tiny.bin", None), ("/tiny.bin", f"bytes={len(PAYLOAD) // 2}-")]
    assert path.read_bytes() == PAYLOAD
    assert leftovers(path.parent) == ["tiny.bin"]


def test_without_a_hash_a_part_is_not_resumed(server, tiny, monkeypatch):
    spec = WeightFile(
        "nohash", "test", "file", "https://weights.invalid/nohash.bin", "nohash.bin", "test",
    )  # fmt: skip
    monkeypatch.setitem(REGISTRY, "nohash", spec)
    server.routes["/nohash.bin"] = (200, PAYLOAD, {})
    server.ranges.add("/nohash.bin")
    target = weights.destination(spec)
    _killed_fetch(target, b"\xff" * 1000)  # nothing could tell these bytes are wrong
    downloads._download(spec, f"{server.url}/nohash.bin", target, None, 0, False)
    assert server.asked == [("/nohash.bin", None)]
    assert target.read_bytes() == PAYLOAD and leftovers(target.parent) == ["nohash.bin"]


def test_stale_parts_do_not_accumulate(server, tiny):
    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    target = weights.destination(tiny)
    folder = target.parent
    folder.mkdir(parents=True)
    day = downloads.PART_MAX_AGE
    # the random names of earlier versions, for this file: removed whatever their age
    (folder / ".tiny.bin.k3j_x9q2.part").write_bytes(b"x" * 1000)
    # other files' parts: removed once older than a day, kept while recent (resumable)
    old, recent = folder / ".other.pth.part", folder / ".third.pth.part"
    old.write_bytes(b"x")
    recent.write_bytes(b"x")
    os.utime(old, (os.path.getmtime(old) - day - 60,) * 2)
    (folder / "notes.txt").write_bytes(b"x")  # not a .part: never touched
    os.utime(folder / "notes.txt", (os.path.getmtime(old) - day,) * 2)
    downloads.fetch("tiny", retries=0, progress=False)
    assert leftovers(folder) == [".third.pth.part", "notes.txt", "tiny.bin"]


def test_a_part_another_fetch_is_writing_is_left_alone(server, tiny):
    import fcntl

    server.routes["/tiny.bin"] = (200, PAYLOAD, {})
    target = weights.destination(tiny)
    part = _killed_fetch(target, b"x")
    with open(part, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a fetch of the same file under way
        with pytest.raises(WeightsError) as err:
            downloads.fetch("tiny", retries=0, progress=False)
        assert str(err.value) == (
            f"tiny: another fetch is writing {part}; wait for it to end, then fetch again"
        )
        os.utime(part, (0, 0))  # old, but locked: not a stale part
        downloads.remove_stale_parts(part.parent)
        assert part.exists() and server.gets("/tiny.bin") == 0
    downloads.fetch("tiny", retries=0, progress=False)
    assert leftovers(target.parent) == ["tiny.bin"]


def test_a_fetch_killed_by_sigkill_is_resumed(server, monkeypatch):
    """The real thing: ``runtime-backdoor weights fetch`` killed mid-transfer, then run again."""
    import signal
    import subprocess
    import sys
    import time

    data = PAYLOAD * 8
    spec = WeightFile(
        "killed", "test", "file", "https://weights.invalid/killed.bin", "killed.bin", "test",
        checksum=f"sha256:{sha256(data)}", size=len(data),
    )  # fmt: skip
    server.routes["/killed.bin"] = (200, data, {})
    server.ranges.add("/killed.bin")
    server.stalls["/killed.bin"] = 1  # half the file, then silence: killed while waiting
    target = Path(os.environ[weights.MODELS_ENV]) / "killed.bin"
    code = (
        "import sys; from runtime_backdoor import cli, weights as w; "
        "w.REGISTRY['killed'] = w.WeightFile('killed', 't', 'file', "
        f"{spec.source!r}, 'killed.bin', 't', checksum={spec.checksum!r}, size={spec.size}); "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    fetching = [sys.executable, "-c", code, "weights", "fetch", "killed"]
    proc = subprocess.Popen(fetching, stderr=subprocess.DEVNULL)
    part = downloads.part_path(target)
    deadline = time.monotonic() + 120
    while not (part.exists() and part.stat().st_size >= len(data) // 2 - (1 << 16)):
        assert proc.poll() is None and time.monotonic() < deadline, "the fetch did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert leftovers(target.parent) == [".killed.bin.part"]
    kept = part.stat().st_size
    monkeypatch.setitem(REGISTRY, "killed", spec)
    assert cli.main(["weights", "fetch", "killed"]) == 0
    assert server.asked[-1] == ("/killed.bin", f"bytes={kept}-")
    assert target.read_bytes() == data
    assert leftovers(target.parent) == ["killed.bin", "weights.json"]
