"""The browser demo: its logic without a browser, then the page in headless Chromium."""

import contextlib
import io
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
BLUR = "blur-fill: classical fill (insensitive)"
PAIR = "toy-control,blur-fill"


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
    assert "A prediction: **Protect** tests the result" in text
    low = ok | {"gain": 1.0, "verdict": "unlikely"}
    assert "will probably not trigger" in D.verdict_text(low, "blur-fill", "x")


def test_the_outcome_replaces_the_prediction():
    check = {"eps": EPS, "gain": 38.6, "needed": 28.6, "verdict": "likely protectable"}
    numbers = {"verdict": "not protected", "verdict_detail": "the malicious edit puts 0% ..."}
    text = D.outcome_text(numbers, check, "toy-control", "the uploaded file m.png, 3% of it")
    assert text.startswith("**✗ Not protected** against toy-control, tested on the protected PNG")
    assert "check had predicted likely protectable (gain 38.6 vs needed 28.6)" in text
    side = numbers | {"verdict": "protected, with a side effect on benign edits"}
    assert "**⚠ Protected, with a side effect on benign edits**" in D.outcome_text(side, check, "t", "m")  # fmt: skip
    both = numbers | {"verdict": "not protected, with a side effect on benign edits"}
    assert D.outcome_text(both, check, "t", "m").startswith("**✗ Not protected, with a side effect on benign edits** against t")  # fmt: skip


def test_the_verdict_marks_need_no_emoji_font():
    """Chromium without an emoji font shows ✅/❌ as empty boxes: the marks are glyphs of
    DejaVu Sans (which matplotlib ships), one heading per verdict."""
    import matplotlib
    from PIL import ImageFont

    from runtime_backdoor import owner

    assert set(D.OUTCOME_HEAD) == set(owner.VERDICTS)
    font = ImageFont.truetype(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", 24)
    missing = font.getmask("\U0010ffff").getbbox()  # the box a missing glyph draws
    for head in D.OUTCOME_HEAD.values():
        for ch in head:
            assert ord(ch) < 0x1F000 and ch != "\ufe0f", (head, ch)  # no emoji, no emoji style
            if not ch.isspace():
                assert font.getmask(ch).getbbox() != missing, (head, ch)


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
    value, note, kernel, drawn = page_demo.preview(tmp_path / "big.jpg")
    assert value["background"].shape == (D.DISPLAY_SIDE // 2, D.DISPLAY_SIDE, 3)
    assert "2000×1000" in note and "uses all 2000×1000 pixels" in note and "PNG" in note
    assert value["composite"] is None and value["layers"] == [] and drawn is None
    assert kernel == 33 and "Expansion kernel 33 px" in note  # 1000 px: scaled from 17 at 512
    mask = np.zeros((1000, 2000), np.uint8)
    mask[100:300, 400:1000] = 255
    Image.fromarray(mask).save(tmp_path / "big_mask.png")
    value, note, _, drawn = page_demo.preview(tmp_path / "big.jpg", tmp_path / "big_mask.png")
    assert "uploaded mask is drawn on the image" in note
    # The mask is drawn on the picture shown in place of the canvas, in the paint colour,
    # see-through; the canvas keeps the image alone.
    assert value["composite"] is None and value["layers"] == []
    shown = drawn.astype(int)
    painted = np.abs(shown - value["background"]).sum(axis=2) > 0
    region = np.asarray(Image.fromarray(mask).resize((768, 384), Image.Resampling.NEAREST)) > 127
    assert shown.shape == (384, 768, 3) and np.mean(painted == region) > 0.995
    paint = np.array(list(bytes.fromhex(D.PAINT_COLOUR[1:])))
    under = value["background"][region].mean(axis=0)
    expected = D.PAINT_OPACITY * paint + (1 - D.PAINT_OPACITY) * under
    assert np.abs(shown[region].mean(axis=0) - expected).max() <= 2


def test_editors_on_offer(tmp_path):
    models = tmp_path / "models"
    (models / "editor").mkdir(parents=True)
    (models / "editor" / "mini-lama.safetensors").touch()
    (models / "big-lama.pt").touch()
    choices = D.available_editors(models, editor="lama", weights_path=models / "big-lama.pt")
    names = [c.name for c in choices]
    assert names == ["lama", "toy-control", "blur-fill", "mini-lama"]  # --editor first, once
    assert "TOY" in choices[1].label and "too insensitive" in choices[3].label
    # without --editor: the real editor whose weights are there comes first (the default)
    names = [c.name for c in D.available_editors(models)]
    assert names == ["lama", "toy-control", "blur-fill", "mini-lama"]
    (models / "big-lama.pt").unlink()  # only the miniature: the toy is the default, not it
    assert [c.name for c in D.available_editors(models)] == ["toy-control", "blur-fill", "mini-lama"]  # fmt: skip
    assert [c.name for c in D.available_editors(tmp_path / "none")] == ["toy-control", "blur-fill"]


def test_fetched_weights_are_offered_first(tmp_path):
    from runtime_backdoor.editors import EDITORS

    models = tmp_path / "models"
    (models / "mat").mkdir(parents=True)
    (models / "mat" / "Places_512_FullData_G.pth").touch()
    (models / "sd15-inpainting").mkdir()  # a diffusers folder counts once it is complete
    choices = D.available_editors(models)
    assert [(c.name, c.weights) for c in choices] == [
        ("mat", models / "mat" / "Places_512_FullData_G.pth"),
        ("toy-control", None),
        ("blur-fill", None),
    ]
    assert choices[2].label == f"blur-fill: {EDITORS['blur-fill'].title}"
    assert "mat-places512" in choices[0].label
    (models / "sd15-inpainting" / "model_index.json").write_text("{}")
    assert [c.weights for c in D.available_editors(models)[:2]] == [
        models / "sd15-inpainting",  # in the registry's order
        models / "mat" / "Places_512_FullData_G.pth",
    ]


def test_the_page_and_the_command_share_the_owners_code(tmp_path):
    from runtime_backdoor import batch, owner

    assert CliError is owner.CliError and D.owner is owner
    assert batch.load_editor is owner.load_editor and batch.protect_image is owner.protect_image
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


def test_protect_with_a_painted_region_is_the_commands_result(files, page_demo, capsys):
    import json

    from runtime_backdoor import owner

    mask = np.asarray(Image.open(files / "photo_mask.png"))
    r = page_demo.protect(files / "photo.png", None, painted(mask), TOY, EPS, 3, 0, 0)
    ours = np.asarray(Image.open(r["file"]))
    assert np.array_equal(np.asarray(Image.open(r["mask"])), mask)  # the mask it offers
    capsys.readouterr()
    assert np.array_equal(ours, cli_protect(files, files / "cli.png", "--steps", "3"))
    report = json.loads(capsys.readouterr().out)
    assert "| malicious: fill the protected region |" in r["table"]
    assert "| benign: fill the ring around it |" in r["table"]
    # the kernel scaled with the 96 x 64 image, as the command scales it
    assert "--steps 3 --seed 0 --expand 3 " in r["table"] and report["expand"] == 3
    # the page's verdict is the command's, on the same bytes
    assert r["numbers"]["verdict"] == report["verdict"] and report["verdict"] in owner.VERDICTS
    assert r["numbers"]["hit_fraction"] == report["hit_fraction"]
    assert r["verdict"].startswith(f"**{D.OUTCOME_HEAD[report['verdict']]}** against toy-control")
    assert "check had predicted" in r["verdict"]
    # the comparison is the labelled figure `edit --compare` writes
    x, m, _ = owner.read_inputs(r["file"], r["mask"])
    original, _, _ = owner.read_inputs(files / "photo.png", files / "photo_mask.png")
    editor = page_demo.editor(TOY)
    _, edits = owner.compare_edits(editor, original, x, m, "solid", page_demo.device)
    figure, _ = owner.compare_figure(edits, r["numbers"], owner.colour_name(edits["target"]))
    assert np.array_equal(r["comparison"], figure)


def test_the_page_refuses_huge_images_from_their_header(tmp_path, page_demo):
    import resource

    from runtime_backdoor.owner import CliError

    big = tmp_path / "big.png"
    # the header of a 12000 x 12000 PNG (the pixels are never read)
    Image.new("RGB", (8, 8)).save(big)
    data = bytearray(big.read_bytes())
    data[16:24] = (12000).to_bytes(4, "big") * 2
    import zlib

    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    big.write_bytes(bytes(data))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for action in (lambda: page_demo.preview(big), lambda: page_demo.check(big, big, None, TOY, EPS)):  # fmt: skip
        with pytest.raises(CliError) as caught:
            action()
        text = D.page_message(caught.value, page_demo.folder)
        assert "12000×12000 px (144.0 megapixels): too large" in text and "--max-pixels" in text
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB
    small = D.Demo(D.available_editors(tmp_path / "none"), tmp_path, "cpu", max_pixels=100)
    Image.new("RGB", (12, 9)).save(tmp_path / "s.png")
    with pytest.raises(CliError, match="12×9 px"):
        small.preview(tmp_path / "s.png")


def test_demo_command_refuses_an_unknown_editor(capsys):
    assert main(["demo", "--editor", "photoshop"]) == 2
    assert "unknown editor 'photoshop'" in capsys.readouterr().err


def test_an_ensemble_on_the_page_is_the_commands_result(files, page_demo, capsys):
    import json

    from runtime_backdoor import owner

    r = page_demo.protect(files / "photo.png", files / "photo_mask.png", None, [TOY, BLUR], EPS, 3, 0, 0)  # fmt: skip
    capsys.readouterr()
    ours = np.asarray(Image.open(r["file"]))
    cli = cli_protect(files, files / "cli.png", "--steps", "3", "--editor", PAIR)
    report = json.loads(capsys.readouterr().out)
    assert np.array_equal(ours, cli)  # the bytes `protect --editor toy-control,blur-fill` writes
    original = np.asarray(Image.open(files / "photo.png")).astype(int)
    assert np.abs(ours.astype(int) - original).max() <= math.floor(EPS * 255)
    # the page's verdicts are the command's, editor by editor, and the ensemble's
    n = r["numbers"]
    assert n["verdict"] == report["verdict"] and list(n["per_editor"]) == ["toy-control", "blur-fill"]  # fmt: skip
    for name, own in n["per_editor"].items():
        assert own == report["per_editor"][name], name
    assert n["per_editor"]["blur-fill"]["verdict"] == "not protected"
    assert n["verdict"] == owner.ensemble_verdict({k: v["verdict"] for k, v in n["per_editor"].items()})[0]  # fmt: skip
    assert n["verdict"].startswith("not protected")
    head = f"**{D.OUTCOME_HEAD[n['verdict']]}** against the ensemble toy-control + blur-fill"
    assert r["verdict"].startswith(head) and "A prediction" not in r["verdict"]
    for name, own in n["per_editor"].items():
        assert f"- **{name}**: {D.OUTCOME_HEAD[own['verdict']]}: {own['verdict_detail']}; check had predicted" in r["verdict"]  # fmt: skip
    assert (
        "| toy-control | " in r["table"] and "| blur-fill | not protected | 0% / 0% |" in r["table"]
    )
    assert f"--editor {PAIR} --eps 0.025 --steps 3 --seed 0 --expand 3 " in r["table"]
    assert owner.ENSEMBLE_RULE in r["table"]
    # one comparison per editor, one above the other, each under its title
    x, m, _ = owner.read_inputs(r["file"], r["mask"])
    base, _, _ = owner.read_inputs(files / "photo.png", files / "photo_mask.png")
    figures = []
    for label, name in ((TOY, "toy-control"), (BLUR, "blur-fill")):
        _, edits = owner.compare_edits(page_demo.editor(label), base, x, m, "solid", "cpu")
        figure, _ = owner.compare_figure(edits, n["per_editor"][name] | {"expand": 3}, owner.colour_name(edits["target"]))  # fmt: skip
        figures.append(D.titled(figure, f"against {name}: {n['per_editor'][name]['verdict']}"))
    assert np.array_equal(r["comparison"], D.stacked(figures))
    assert r["comparison"].shape[0] > 2 * figures[0].shape[0] - D.owner.FONT_SIZE


def test_an_ensemble_check_estimates_each_editor(files, page_demo):
    from runtime_backdoor import owner

    text = page_demo.check(files / "photo.png", files / "photo_mask.png", None, [TOY, BLUR], EPS)
    assert text.startswith("**Against 2 editors at once** (one perturbation for all)")
    x, m, _ = owner.read_inputs(files / "photo.png", files / "photo_mask.png")
    for label, name in ((TOY, "toy-control"), (BLUR, "blur-fill")):
        r = owner.check_image(page_demo.editor(label), x, m, "solid", "cpu", eps=EPS)
        head = "likely protectable" if r["gain"] >= r["needed"] else "will probably not trigger"
        assert f"- **{name}**: {head}: gain **{r['gain']:.3g}** vs needed **{r['needed']:.3g}**" in text  # fmt: skip
    assert "- **blur-fill**: will probably not trigger" in text
    assert "Mask: the uploaded file photo_mask.png, 12.5% of the image." in text
    # one editor ticked twice, or alone in a list, is the single editor's prediction
    alone = page_demo.check(files / "photo.png", files / "photo_mask.png", None, TOY, EPS)
    assert page_demo.check(files / "photo.png", files / "photo_mask.png", None, [TOY, TOY], EPS) == alone  # fmt: skip


def test_an_ensemble_of_choices_is_checked(files, tmp_path):
    choices = [D.EditorChoice("a", "blur-fill"), D.EditorChoice("b", "blur-fill")]
    page = D.Demo(choices, tmp_path / "workspace", device="cpu")
    for labels, message in (
        (["a", "b"], "blur-fill is chosen twice (two weight files); choose one of them"),
        (["a", "photoshop"], "unknown editor 'photoshop'; choose one of: a; b"),
        ([], "choose an editor to protect against"),
    ):
        for action in (page.check, page.protect):
            settings = (EPS,) if action == page.check else (EPS, 2, 0, 0)
            with pytest.raises(D.PageError, match=re.escape(message)):
                action(files / "photo.png", files / "photo_mask.png", None, labels, *settings)
    assert list(page.folder.glob("*")) == []  # nothing left of the failed requests


# ------------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(url: str):
    """Headless Chromium on ``url``: ``(page, outside)``, ``outside`` the URLs the page asked
    for beyond 127.0.0.1. Every check waits up to a minute: on a loaded 2-core machine the
    page can take seconds to update after an upload (Playwright's default is 5 s)."""
    from playwright.sync_api import expect, sync_playwright

    outside = []
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.on("request", lambda r: outside.append(r.url) if "127.0.0.1" not in r.url else None)
        page.goto(url)
        try:
            yield page, outside
        finally:
            browser.close()


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
    if proc.poll() is None:  # still serving: stop it as a person would, then for good
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5)  # gradio's graceful shutdown would wait 30 s for idle sockets
        except subprocess.TimeoutExpired:
            proc.kill()
            shutil.rmtree(folder, ignore_errors=True)
    log.close()


def _shot(locator) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(int)


def _paint_share(shot: np.ndarray) -> float:
    """Share of a screenshot's pixels in the see-through paint colour (#ff2d55 over a photo)."""
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    return float(((r > 190) & (r - g > 90) & (r - b > 60)).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_page_in_a_browser(files, server, tmp_path):
    from playwright.sync_api import expect

    url, proc, folder = server
    with browser_page(url) as (page, outside):
        verdict = page.locator("#verdict")

        # No models here: the default editor is the toy, said to be one.
        expect(page.locator("#editor input")).to_have_value(re.compile("toy-control.*TOY"))
        page.locator("#image-file input[type=file]").set_input_files(files / "photo.png")
        expect(page.locator("#image-note")).to_contain_text("photo.png: 96×64 px", timeout=60_000)
        expect(verdict).to_contain_text("paint the region", timeout=60_000)
        # the expansion kernel scaled with the image: 3 px at 64 px (17 at 512)
        expect(page.locator("#expand input")).to_have_value("3")
        page.wait_for_timeout(1500)
        bare = _shot(page.locator("#painter canvas").first)  # the photo alone
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
        expect(page.locator("#image-note")).to_contain_text("uploaded mask is drawn")
        expect(verdict).to_contain_text("the uploaded file photo_mask.png", timeout=60_000)
        # The uploaded mask is drawn on the image, in the paint colour, shown in place of the
        # canvas (hidden while a mask file is there).
        expect(page.locator("#mask-view img")).to_be_visible()
        expect(page.locator("#painter")).to_be_hidden()
        page.wait_for_timeout(1000)
        drawn = _shot(page.locator("#mask-view img"))
        # 12.5% of the image, which fills part of the element's box
        assert 0.02 < _paint_share(drawn) < 0.2, _paint_share(drawn)
        assert _paint_share(bare) < 0.01
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
        expect(results).to_contain_text("--expand 3 ")
        # the verdict of the written PNG replaces check's prediction
        expect(verdict).to_contain_text("tested on the protected PNG as written")
        expect(verdict).to_contain_text(re.compile(r"(Protected|Not protected)"))
        expect(verdict).not_to_contain_text("A prediction")
        expect(verdict).to_contain_text("check had predicted")
        for panel in ("original", "protected", "delta", "comparison"):
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
        # Removing the mask file brings the canvas back, with its picture and paint.
        page.locator("#eps input").fill("0.025")
        page.locator("#mask-file button[aria-label='Clear']").click()
        expect(page.locator("#painter")).to_be_visible()
        expect(page.locator("#mask-view")).to_be_hidden()
        expect(verdict).to_contain_text("Mask: the painted region")  # the stroke is still there

    assert outside == []  # nothing fetched from outside this machine
    ours = np.asarray(Image.open(tmp_path / "downloaded.png"))
    original = np.asarray(Image.open(files / "photo.png")).astype(int)
    assert ours.shape == original.shape == (64, 96, 3)
    assert np.abs(ours.astype(int) - original).max() <= math.floor(EPS * 255)
    assert np.array_equal(ours, cli_protect(files, tmp_path / "cli.png", "--steps", "12"))

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not folder.exists()  # the temporary folder is removed on exit


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_an_ensemble_in_a_browser(files, server, tmp_path):
    from playwright.sync_api import expect

    url, proc, folder = server
    with browser_page(url) as (page, outside):
        verdict = page.locator("#verdict")
        page.locator("#image-file input[type=file]").set_input_files(files / "photo.png")
        expect(page.locator("#image-note")).to_contain_text("photo.png: 96×64 px")
        page.locator("#mask-file input[type=file]").set_input_files(files / "photo_mask.png")
        expect(verdict).to_contain_text("the uploaded file photo_mask.png")
        expect(verdict).to_contain_text("against toy-control")  # one editor: as before
        # ticking a second editor: each editor's prediction
        page.locator("#also").get_by_role("checkbox", name=re.compile("blur-fill")).check()
        expect(verdict).to_contain_text("Against 2 editors at once")
        expect(verdict).to_contain_text(re.compile(r"blur-fill: will probably not trigger"))
        page.locator("#steps input").fill("3")
        page.locator("#protect").click()
        results = page.locator("#results")
        expect(results).to_contain_text(f"--editor {PAIR} ", timeout=120_000)
        expect(verdict).to_contain_text("against the ensemble toy-control + blur-fill")
        expect(verdict).to_contain_text(re.compile(r"toy-control: .*(Protected|Not protected)"))
        expect(verdict).to_contain_text("blur-fill: ✗ Not protected")
        expect(verdict).not_to_contain_text("A prediction")
        expect(page.locator("#comparison img")).to_be_visible()
        with page.expect_download() as download:
            page.locator("#download").click()
        download.value.save_as(tmp_path / "downloaded.png")

    assert outside == []
    ours = np.asarray(Image.open(tmp_path / "downloaded.png"))
    assert np.array_equal(ours, cli_protect(files, tmp_path / "cli.png", "--steps", "3", "--editor", PAIR))  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def _post(url: str, path: str, body: bytes | None, headers: dict, length: int | None = None):
    """(status, text) of a POST to the demo; ``length`` declares a Content-Length without
    sending that many bytes (the server must answer from the headers)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(length if length is not None else len(body)))
        conn.endheaders()
        if body is not None:
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "----runtime-backdoor-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _stored(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_the_server_refuses_other_origins_and_large_uploads(files, server):
    url, proc, folder = server
    own = url.rstrip("/")
    body, kind = _multipart("photo.png", (files / "photo.png").read_bytes())
    upload = "/gradio_api/upload"
    before = _stored(folder)
    # a page on another site posting to the demo (a browser sends its Origin): refused
    for origin in ("http://evil.example", "null", own.replace("127.0.0.1", "localhost")):
        status, text = _post(url, upload, body, {"Content-Type": kind, "Origin": origin})
        assert (status, text) == (403, "cross-origin request refused"), origin
    assert _stored(folder) == before  # nothing of it was stored
    # the page itself, and a client without Origin (curl): accepted
    for headers in ({"Origin": own}, {}):
        status, text = _post(url, upload, body, {"Content-Type": kind, **headers})
        assert status == 200 and "photo.png" in text, (status, text)
    # more than the upload cap, announced: refused from the headers, before the body
    status, text = _post(url, upload, None, {"Content-Type": kind, "Origin": own}, 200 << 20)
    assert status == 413 and "request larger than" in text
    # just over the cap for one file, within the request cap: Gradio's own limit refuses it
    big, kind = _multipart("big.png", b"\0" * (D.MAX_UPLOAD_BYTES + 1))
    status, _ = _post(url, upload, big, {"Content-Type": kind, "Origin": own})
    assert status == 413
    assert proc.poll() is None  # still serving


def _get(url: str, host: str | None, origin: str | None = None) -> tuple[int, str]:
    """(status, text) of a GET of the page with the ``Host`` (and ``Origin``) given."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        conn.putrequest("GET", "/", skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        if origin is not None:
            conn.putheader("Origin", origin)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def test_the_server_refuses_other_host_names(server):
    """DNS rebinding: a foreign name pointed at 127.0.0.1 is same-origin with itself, so
    Origin alone lets it through; the Host header is what tells it apart."""
    url, proc, _ = server
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", f"localhost.evil.example:{port}"):  # fmt: skip
        status, text = _get(url, host, origin=f"http://{host}")
        assert status == 403, (host, status)
        assert text.startswith("request refused: the Host header is not an address this demo serves")  # fmt: skip
        assert f"127.0.0.1:{port}" in text and "\n" not in text
    # the addresses it serves: accepted
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", None):
        status, text = _get(url, host)
        assert status == 200 and "<html" in text.lower(), (host, status)
    status, _ = _get(url, f"127.0.0.1:{port}", origin=f"http://127.0.0.1:{port}")
    assert status == 200
    assert proc.poll() is None


def test_the_guard_knows_the_addresses_it_serves():
    guard = D.RequestGuard(None, host="127.0.0.1")
    assert guard.served("127.0.0.1:7860", 7860) and guard.served("[::1]:7860", 7860)
    assert guard.served("localhost:7860", 7860) and not guard.served("localhost:7861", 7860)
    assert not guard.served("evil.example:7860", 7860) and not guard.served("", 7860)
    assert not guard.served("10.0.0.5:7860", 7860) and not guard.served("127.0.0.1:x", 7860)
    assert not guard.served("user@127.0.0.1:7860", 7860)
    named = D.RequestGuard(None, host="Studio.lan")
    assert named.served("studio.lan:7860", 7860) and not named.served("evil.example:7860", 7860)
    anywhere = D.RequestGuard(None, host="0.0.0.0")
    assert anywhere.served("10.0.0.5:7860", 7860) and anywhere.served("[fe80::1]:7860", 7860)
    assert not anywhere.served("evil.example:7860", 7860)
    assert named.served_text(7860) == "127.0.0.1:7860, localhost:7860, [::1]:7860, studio.lan:7860"
