"""The browser demo: its logic without a browser, then the page in headless Chromium."""

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime_backdoor import demo as D
from runtime_backdoor.cli import CliError, main

EPS = 0.025
TOY = "toy-control: a TOY sensitive control, not an inpainter"


@pytest.fixture
def files(tmp_path):
    """A small photo (skimage's cat, offline) and its mask, as an owner would upload them."""
    from skimage import data

    image = Image.fromarray(data.chelsea()).resize((96, 64), Image.Resampling.LANCZOS)
    mask = np.zeros((64, 96), np.uint8)
    mask[20:44, 30:62] = 255  # the cat's right eye and nose
    image.save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "photo_mask.png")
    return tmp_path


@pytest.fixture
def page_demo(tmp_path):
    folder = tmp_path / "workspace"
    folder.mkdir()
    return D.Demo(D.available_editors(models=tmp_path / "no-models"), folder, device="cpu")


def painted(mask: np.ndarray) -> dict:
    """The editor's value for a region painted on an image (one RGBA layer)."""
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask > 0] = (255, 45, 85, 255)
    return {"background": None, "layers": [layer], "composite": None}


def cli_protect(files, out, *extra):
    args = ["protect", files / "photo.png", "--mask", files / "photo_mask.png"]
    args += ["--editor", "toy-control", "--out", out, "--quiet", *extra]
    assert main([str(a) for a in args]) == 0
    return np.asarray(Image.open(out))


# ------------------------------------------------------------------------------- logic


def test_verdict_says_gain_against_needed():
    ok = {"eps": EPS, "gain": 63.8, "needed": 15.6, "verdict": "likely protectable"}
    text = D.verdict_text(ok, "toy-control", "the painted region, 12.5% of the image")
    assert text.startswith("**Likely protectable** against toy-control")
    assert "**63.8** vs needed **15.6**" in text and "6.38/255" in text and "painted" in text
    low = ok | {"gain": 1.0, "verdict": "unlikely"}
    assert "will probably not trigger" in D.verdict_text(low, "blur-fill", "x")


def test_messages_are_one_line_and_name_files_not_temporary_folders(tmp_path):
    err = ValueError(f"{tmp_path}/ab12cd/photo_mask.png: mask is empty\n(no pixel)")
    assert D.page_message(err, tmp_path) == "photo_mask.png: mask is empty (no pixel)"
    assert D.page_message(KeyError("x")).startswith("unexpected KeyError")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: (
                Image.new("L", (40, 30), 255).crop((-5, -5, 35, 25)).save(d / "photo_mask.png")
            ),
            "must match",
        ),
        (lambda d: Image.new("L", (96, 64)).save(d / "photo_mask.png"), "mask is empty"),
        (lambda d: Image.new("L", (96, 64), 255).save(d / "photo_mask.png"), "whole image"),
        (lambda d: (d / "photo.png").write_bytes(b"not an image"), "photo.png: cannot read"),
    ],
)
def test_bad_inputs_are_one_line_on_the_page(files, page_demo, change, message):
    change(files)
    for action in (page_demo.check, page_demo.protect):
        with pytest.raises(Exception) as caught:
            settings = (EPS,) if action == page_demo.check else (EPS, 2, 0, 17)
            action(files / "photo.png", files / "photo_mask.png", None, TOY, *settings)
        text = D.page_message(caught.value, page_demo.folder)
        assert message in text and "\n" not in text and "Traceback" not in text
    assert list(page_demo.folder.iterdir()) == []  # nothing left of the failed requests


@pytest.mark.parametrize(
    "label, eps, steps, message",
    [
        ("photoshop", EPS, 5, "unknown editor 'photoshop'; choose one of: "),
        (TOY, 300, 5, "eps must be in (0, 0.25]"),
        (TOY, "six", 5, "eps must be a number"),
        (TOY, EPS, 0, "steps must be a whole number in [1, 10000]"),
        (TOY, EPS, float("inf"), "steps must be a whole number in [1, 10000]"),
    ],
)
def test_bad_settings_are_named(files, page_demo, label, eps, steps, message):
    with pytest.raises((D.PageError, ValueError, CliError), match=re.escape(message)):
        page_demo.protect(files / "photo.png", files / "photo_mask.png", None, label, eps, steps, 0, 17)  # fmt: skip
    assert list(page_demo.folder.iterdir()) == []


def test_nothing_to_protect_says_what_to_do(files, page_demo):
    with pytest.raises(D.PageError, match="paint the region"):
        page_demo.check(files / "photo.png", None, painted(np.zeros((64, 96))), TOY, EPS)
    with pytest.raises(D.PageError, match="upload an image"):
        page_demo.check(None, None, None, TOY, EPS)


def test_painted_region_is_scaled_to_the_image():
    small = np.zeros((32, 48), np.uint8)
    small[10:20, 15:30] = 1
    region = D.painted_region(painted(small), (96, 64))
    assert region.shape == (64, 96) and region[20:40, 30:60].all() and region.sum() == 4 * 150
    assert D.painted_region(painted(np.zeros((8, 8))), (8, 8)) is None
    assert D.painted_region(None, (8, 8)) is None


def test_large_images_are_shown_downscaled_and_say_so(tmp_path, page_demo):
    Image.new("RGB", (2000, 1000), (10, 200, 30)).save(tmp_path / "big.jpg")
    value, note = page_demo.preview(tmp_path / "big.jpg")
    assert value["background"].shape == (D.DISPLAY_SIDE // 2, D.DISPLAY_SIDE, 3)
    assert "2000×1000" in note and "uses all 2000×1000 pixels" in note and "PNG" in note
    mask = np.zeros((1000, 2000), np.uint8)
    mask[100:300, 400:1000] = 255
    Image.fromarray(mask).save(tmp_path / "big_mask.png")
    value, note = page_demo.preview(tmp_path / "big.jpg", tmp_path / "big_mask.png")
    shown = D.painted_region(value, (2000, 1000))  # the paint, scaled back: the mask
    assert value["layers"][0].shape == (384, 768, 4) and "uploaded mask is shown" in note
    assert np.mean(shown == (mask > 0)) > 0.995


def test_editors_on_offer(tmp_path):
    models = tmp_path / "models"
    (models / "editor").mkdir(parents=True)
    (models / "editor" / "mini-lama.safetensors").touch()
    (models / "big-lama.pt").touch()
    choices = D.available_editors(models, editor="lama", weights_path=models / "big-lama.pt")
    names = [c.name for c in choices]
    assert names == ["lama", "mini-lama", "toy-control", "blur-fill"]  # --editor first, once
    assert "TOY" in choices[2].label
    assert [c.name for c in D.available_editors(tmp_path / "none")] == ["toy-control", "blur-fill"]


def test_fetched_weights_are_offered_after_the_cheap_editors(tmp_path):
    from runtime_backdoor.editors import EDITORS

    models = tmp_path / "models"
    (models / "mat").mkdir(parents=True)
    (models / "mat" / "Places_512_FullData_G.pth").touch()
    (models / "sd15-inpainting").mkdir()  # a diffusers folder counts once it is complete
    choices = D.available_editors(models)
    assert [(c.name, c.weights) for c in choices] == [
        ("toy-control", None),
        ("blur-fill", None),
        ("mat", models / "mat" / "Places_512_FullData_G.pth"),
    ]
    assert choices[1].label == f"blur-fill: {EDITORS['blur-fill'].title}"
    assert "mat-places512" in choices[2].label
    (models / "sd15-inpainting" / "model_index.json").write_text("{}")
    assert [c.weights for c in D.available_editors(models)[2:]] == [
        models / "sd15-inpainting",  # in the registry's order
        models / "mat" / "Places_512_FullData_G.pth",
    ]


def test_the_page_and_the_command_share_the_owners_code(tmp_path):
    from runtime_backdoor import cli, owner

    assert CliError is owner.CliError and D.owner is owner
    assert cli.load_editor is owner.load_editor and cli.protect_image is owner.protect_image
    with pytest.raises(CliError, match=r"^--device: 'cpu:1' does not exist"):
        D.Demo(D.available_editors(tmp_path / "none"), tmp_path, device="cpu:1")


def test_workspace_is_removed_and_holds_gradio_files():
    before = os.environ.get("GRADIO_TEMP_DIR")
    with pytest.raises(RuntimeError), D.workspace() as folder:
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
        (folder / "run" / "x.png").parent.mkdir()
        (folder / "run" / "x.png").write_bytes(b"x")
        raise RuntimeError("a request failed")
    assert not folder.exists() and os.environ.get("GRADIO_TEMP_DIR") == before


def test_protect_with_a_painted_region_is_the_commands_result(files, page_demo):
    mask = np.asarray(Image.open(files / "photo_mask.png"))
    r = page_demo.protect(files / "photo.png", None, painted(mask), TOY, EPS, 3, 0, 17)
    ours = np.asarray(Image.open(r["file"]))
    assert np.array_equal(np.asarray(Image.open(r["mask"])), mask)  # the mask it offers
    assert np.array_equal(ours, cli_protect(files, files / "cli.png", "--steps", "3"))
    assert "| malicious: fill the protected region |" in r["table"]
    assert "--steps 3 --seed 0 --expand 17" in r["table"]
    assert r["malicious"].shape == (128, 2 * (3 * 96 + 2 * 4), 3)  # enlarged ×2, 3 panels


def test_demo_command_refuses_an_unknown_editor(capsys):
    assert main(["demo", "--editor", "photoshop"]) == 2
    assert "unknown editor 'photoshop'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """``runtime-backdoor demo`` on a free port of 127.0.0.1, in an empty folder (no models)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 (read back below)
    cmd = [sys.executable, "-m", "runtime_backdoor.cli", "demo", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.seek(0)
                pytest.fail(f"the demo did not start:\n{log.read()}")
            time.sleep(0.5)
    log.seek(0)
    folder = Path(re.search(r"temporary files in (\S+)", log.read()).group(1))
    yield url, proc, folder
    if proc.poll() is None:  # the test failed: stop it as a person would, then for good
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            shutil.rmtree(folder, ignore_errors=True)
    log.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_page_in_a_browser(files, server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, proc, folder = server
    outside = []
    # Every check waits up to a minute: on a loaded 2-core machine the page can take seconds
    # to update after an upload (Playwright's default is 5 s).
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.on("request", lambda r: outside.append(r.url) if "127.0.0.1" not in r.url else None)
        page.goto(url)
        verdict = page.locator("#verdict")

        page.locator("#image-file input[type=file]").set_input_files(files / "photo.png")
        expect(page.locator("#image-note")).to_contain_text("photo.png: 96×64 px", timeout=60_000)
        expect(verdict).to_contain_text("paint the region", timeout=60_000)
        # A brush stroke across the middle of the canvas: check's verdict comes at once. On a
        # loaded machine the canvas can still be settling when the first stroke lands (seen
        # once in a full-suite run), so the stroke is redrawn, as a person would, at most 3 times.
        for attempt in range(3):
            page.wait_for_timeout(1000 * attempt)
            box = page.locator("#painter canvas").first.bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x - 40, y)
            page.mouse.down()
            for i in range(9):
                page.mouse.move(x - 40 + 10 * i, y + 2 * i)
            page.mouse.up()
            try:
                expect(verdict).to_contain_text("Mask: the painted region", timeout=20_000)
                break
            except AssertionError:
                if attempt == 2:
                    raise

        page.locator("#mask-file input[type=file]").set_input_files(files / "photo_mask.png")
        page.locator("#editor input").click()
        page.get_by_role("option", name="toy-control").click()
        expect(verdict).to_contain_text("against toy-control", timeout=60_000)
        expect(verdict).to_contain_text("the uploaded file photo_mask.png, 12.5%")
        expect(verdict).to_contain_text(re.compile(r"gain \d+(\.\d+)? vs needed \d"))
        page.locator("#steps input").fill("12")

        page.locator("#protect").click()
        results = page.locator("#results")
        expect(results).to_contain_text("The same from the command line", timeout=120_000)
        expect(results).to_contain_text("malicious: fill the protected region")
        expect(results).to_contain_text("benign: fill the ring around it")
        expect(results).to_contain_text(re.compile(r"\d+%\s+\d+%\s+\d+\.\d dB"))
        for panel in ("original", "protected", "delta", "malicious", "benign"):
            expect(page.locator(f"#{panel} img")).to_be_visible()
        page.screenshot(path=tmp_path / "demo.png", full_page=True)
        if os.environ.get("DEMO_SCREENSHOT"):
            shutil.copyfile(tmp_path / "demo.png", os.environ["DEMO_SCREENSHOT"])

        with page.expect_download() as download:
            page.locator("#download").click()
        assert download.value.suggested_filename == "photo_protected.png"
        download.value.save_as(tmp_path / "downloaded.png")

        # A bad setting is one line in the page, not a traceback.
        page.locator("#eps input").fill("300")
        expect(verdict).to_contain_text("eps must be in (0, 0.25]", timeout=60_000)
        page.locator("#protect").click()
        expect(page.get_by_text("eps must be in (0, 0.25]").last).to_be_visible(timeout=60_000)
        assert "Traceback" not in page.content()
        browser.close()

    assert outside == []  # nothing fetched from outside this machine
    ours = np.asarray(Image.open(tmp_path / "downloaded.png"))
    original = np.asarray(Image.open(files / "photo.png")).astype(int)
    assert ours.shape == original.shape == (64, 96, 3)
    assert np.abs(ours.astype(int) - original).max() <= math.floor(EPS * 255)
    assert np.array_equal(ours, cli_protect(files, tmp_path / "cli.png", "--steps", "12"))

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not folder.exists()  # the temporary folder is removed on exit
