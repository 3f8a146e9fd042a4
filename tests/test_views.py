"""The attacker's views of a large photo (runtime_backdoor.views): geometry, paste-back,
memory bounded by the view, the verdict per pipeline and the options' one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from runtime_backdoor import views
from runtime_backdoor.cli import main
from runtime_backdoor.owner import CliError, load_editor

EPS = 0.025
CPU = torch.device("cpu")


def test_defaults_are_iopaints():
    assert (views.CROP_TRIGGER, views.CROP_MARGIN, views.RESIZE_LIMIT) == (800, 128, 1280)


def test_crop_box_is_the_masks_box_with_the_margin_clipped_to_the_image():
    mask = np.zeros((2000, 3000), bool)
    mask[900:1100, 1400:1700] = True
    assert views.crop_box(mask, 128) == (772, 1272, 1228, 1828)
    mask[:] = False
    mask[10:50, 2950:2990] = True  # near the top right corner
    assert views.crop_box(mask, 128) == (0, 2822, 178, 3000)
    assert views.crop_box(mask, 0) == (10, 2950, 50, 2990)


def test_resize_size_brings_the_longer_side_to_the_limit():
    assert views.resize_size(3024, 4032, 1280) == (960, 1280)
    assert views.resize_size(4032, 3024, 1280) == (1280, 960)
    assert views.resize_size(700, 900, 1280) == (700, 900)  # within it: unchanged


def test_pipelines_follow_the_image_size():
    s = views.ViewSettings()
    assert views.tool_pipelines(600, 800, s) == ["original"]
    assert views.tool_pipelines(900, 1000, s) == ["crop"]  # above the trigger, within the limit
    assert views.tool_pipelines(3024, 4032, s) == ["crop", "resize"]
    assert views.protect_view_name(3024, 4032, s) == "crop"
    assert views.protect_view_name(600, 800, s) == "original"
    assert views.protect_view_name(3024, 4032, views.ViewSettings(view="resize")) == "resize"


@pytest.mark.parametrize(
    "settings, option",
    [
        (views.ViewSettings(view="tiles"), "--view"),
        (views.ViewSettings(crop_margin=-1), "--crop-margin"),
        (views.ViewSettings(crop_trigger=0), "--crop-trigger"),
        (views.ViewSettings(resize_limit=0), "--resize-limit"),
    ],
)
def test_bad_settings_name_the_option(settings, option):
    with pytest.raises(CliError, match=f"^{option}"):
        settings.check()


def test_a_view_above_the_editors_limit_is_refused_naming_resize():
    mask = np.zeros((3000, 4000), bool)
    mask[10:2990, 10:3990] = True
    with pytest.raises(CliError, match="--view resize"):
        views.make_view("crop", mask, views.ViewSettings())


class Recorder(torch.nn.Module):
    """An editor that records the size of every image it is given."""

    def __init__(self, editor):
        super().__init__()
        self.editor, self.sizes = editor, []

    def forward(self, image, mask):
        self.sizes.append(tuple(image.shape[-2:]))
        return self.editor(image, mask)


def photo(h, w, seed=0):
    gen = np.random.default_rng(seed)
    small = gen.random((h // 50 + 1, w // 50 + 1, 3)).astype(np.float32)
    big = np.kron(small, np.ones((50, 50, 1), np.float32))[:h, :w]
    return np.round(big * 200 + 20) / 255  # on the 8-bit grid, as read from a PNG


def test_a_large_photo_is_protected_on_the_crop_only(tmp_path):
    image = photo(2000, 3000).astype(np.float32)
    mask = np.zeros((2000, 3000), bool)
    mask[900:1100, 1400:1700] = True
    editor = Recorder(load_editor("toy-control", None, CPU))
    s = views.ViewSettings()
    report, out = views.protect_view(
        editor, image, mask, "solid", CPU, settings=s, eps=EPS, steps=2, expand=None, seed=0
    )
    crop = views.crop_box(mask, views.CROP_MARGIN)
    assert report["view"] == "crop" and report["view_box"] == list(crop)
    assert set(editor.sizes) == {(crop[2] - crop[0], crop[3] - crop[1])}  # never the photo
    original = np.round(image * 255).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == original.shape
    outside = np.ones((2000, 3000), bool)
    outside[crop[0] : crop[2], crop[1] : crop[3]] = False
    assert np.array_equal(out[outside], original[outside])  # byte for byte
    change = np.abs(out.astype(int) - original)
    assert change.max() <= int(EPS * 255) and report["max_change_8bit"] == change.max()

    written = tmp_path / "protected.png"
    Image.fromarray(out).save(written)
    editor.sizes.clear()
    verdict = views.verify_pipelines(
        {"toy-control": editor}, image, mask, "solid", CPU, written, settings=s,
        expand=report["expand"], protected_view="crop", target_rgb=report["target_rgb"],
    )  # fmt: skip
    assert set(editor.sizes) <= {(crop[2] - crop[0], crop[3] - crop[1]), (853, 1280)}
    assert list(verdict["pipelines"]) == ["crop", "resize"]
    assert set(verdict["held_under"]) | set(verdict["not_held_under"]) == {"crop", "resize"}
    assert "held under" in verdict["verdict_detail"]


def test_a_resized_view_maps_delta_back_within_eps():
    image = photo(1200, 1600, seed=1).astype(np.float32)
    mask = np.zeros((1200, 1600), bool)
    mask[500:700, 600:900] = True
    editor = Recorder(load_editor("toy-control", None, CPU))
    s = views.ViewSettings(view="resize")
    report, out = views.protect_view(
        editor, image, mask, "solid", CPU, settings=s, eps=EPS, steps=1, expand=None, seed=0
    )
    assert report["view"] == "resize" and report["view_size"] == [1280, 960]
    assert set(editor.sizes) == {(960, 1280)}
    original = np.round(image * 255).astype(np.uint8)
    assert np.abs(out.astype(int) - original).max() <= int(EPS * 255)


@pytest.fixture
def large_files(tmp_path):
    image = (photo(900, 1000, seed=2) * 255).astype(np.uint8)
    mask = np.zeros((900, 1000), np.uint8)
    mask[400:500, 450:600] = 255
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "photo_mask.png")
    return tmp_path


def test_protect_above_the_trigger_reports_each_pipeline(large_files, capsys):
    d = large_files
    code = main(
        ["protect", str(d / "photo.png"), "--mask", str(d / "photo_mask.png"), "--editor",
         "toy-control", "--steps", "2", "--out", str(d / "out.png"), "--quiet"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["view"] == "crop" and list(report["pipelines"]) == ["crop"]
    assert "held_under" in report and "attacker pipelines" in report["verdict_detail"]
    written = np.asarray(Image.open(d / "out.png"))
    original = np.asarray(Image.open(d / "photo.png"))
    assert np.abs(written.astype(int) - original).max() <= int(EPS * 255)


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--crop-margin", "-1"], "--crop-margin"),
        (["--resize-limit", "0"], "--resize-limit"),
        (["--crop-trigger", "0"], "--crop-trigger"),
        (["--view", "tiles"], "--view"),
    ],
)
def test_bad_view_options_are_one_line_naming_the_option(large_files, capsys, extra, option):
    d = large_files
    argv = ["protect", str(d / "photo.png"), "--mask", str(d / "photo_mask.png"),
            "--editor", "toy-control", "--out", str(d / "out.png"), *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and option in err
    assert not (d / "out.png").exists()


def test_help_shows_the_tools_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--crop-margin", "default 128", "default 800", "default 1280", "megapixels"):
        assert text in out


def test_check_estimates_on_the_view_protect_uses(large_files, capsys):
    d = large_files
    argv = ["check", str(d / "photo.png"), "--mask", str(d / "photo_mask.png"),
            "--editor", "toy-control", "--crop-margin", "16"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["view"] == "crop" and report["view_size"] == [182, 132]
    assert "gain" in report and "needed" in report


def test_the_owners_page_states_the_committed_large_photo_benchmark():
    """The table in docs/owners.md is the benchmark's JSON, row by row (no typed numbers)."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "reports/benchmarks/large_photo.json").read_text())["rows"]
    page = (root / "docs/owners.md").read_text()
    for r in rows:
        if r.get("editor") not in ("toy-control", "mini-lama") or r.get("photo") != "4032x3024":
            continue
        line = next(
            x
            for x in page.splitlines()
            if x.startswith("| 4032 × 3024") and f"`{r['editor']}`" in x
        )
        seconds, gb = re.search(r"\| (\d+) s \| ([\d.]+) GB \|", line).groups()
        assert int(seconds) == round(r["seconds"]) and float(gb) == round(r["peak_rss_gb"], 2), line
        assert ("met" in line.split("|")[-2]) == r["within_budget"], line
