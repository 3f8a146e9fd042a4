"""The image owner's command: happy path and every bad-input message."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from runtime_backdoor.cli import main

EPS = 0.025


@pytest.fixture
def files(tmp_path):
    gen = np.random.default_rng(0)
    image = (gen.random((40, 48, 3)) * 200 + 20).astype(np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    mask[10:25, 12:30] = 255
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "photo_mask.png")
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def protect_args(d, *extra, editor="blur-fill"):
    return (
        "protect",
        d / "photo.png",
        "--mask",
        d / "photo_mask.png",
        "--editor",
        editor,
        "--out",
        d / "out.png",
        "--steps",
        "2",
        "--quiet",
        *extra,
    )


def test_protect_writes_a_png_within_budget_and_keeps_the_original(files, capsys):
    before = (files / "photo.png").read_bytes()
    code, out, err = run(capsys, *protect_args(files))
    assert code == 0, err
    report = json.loads(out)
    protected = np.asarray(Image.open(files / "out.png")).astype(int)
    original = np.asarray(Image.open(files / "photo.png")).astype(int)
    assert protected.shape == original.shape
    assert np.abs(protected - original).max() <= math.ceil(EPS * 255)
    assert report["max_change_8bit"] <= math.ceil(EPS * 255)
    assert (files / "photo.png").read_bytes() == before
    assert not list(files.glob(".*tmp"))  # no temporary file left behind


def test_protect_refuses_to_overwrite(files, capsys):
    run(capsys, *protect_args(files))
    code, _, err = run(capsys, *protect_args(files))
    assert code == 2 and "exists; pass --overwrite" in err
    code, _, err = run(
        capsys,
        "protect",
        files / "photo.png",
        "--mask",
        files / "photo_mask.png",
        "--editor",
        "blur-fill",
        "--out",
        files / "photo.png",
        "--overwrite",
    )
    assert code == 2 and "is an input file" in err


def test_check_reports_gain_and_verdict(files, capsys):
    code, out, _ = run(
        capsys,
        "check",
        files / "photo.png",
        "--mask",
        files / "photo_mask.png",
        "--editor",
        "blur-fill",
    )
    report = json.loads(out)
    assert code == 0 and report["gain"] <= 1.0 + 1e-6 and report["verdict"].startswith("unlikely")


def test_editors_lists_the_registry(capsys):
    code, out, _ = run(capsys, "editors")
    assert code == 0 and "lama" in out and "sd-inpainting" in out and "blur-fill" in out


def save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "photo.png").unlink(), "photo.png"),
        (lambda d: (d / "photo.png").write_bytes(b"not an image"), "photo.png"),
        (
            lambda d: save(
                d / "photo_mask.png",
                (255 * (np.zeros((30, 48)) + (np.arange(48) < 10))).astype(np.uint8),
            ),
            "must match",
        ),
        (lambda d: save(d / "photo_mask.png", np.zeros((40, 48), np.uint8)), "empty"),
        (lambda d: save(d / "photo_mask.png", np.full((40, 48), 255, np.uint8)), "whole image"),
    ],
)
def test_bad_files_get_one_clear_line(files, capsys, change, message):
    change(files)
    code, _, err = run(capsys, *protect_args(files))
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("runtime-backdoor: error:")]
    assert len(line) == 1 and message in line[0], err
    assert not (files / "out.png").exists()


def test_non_binary_mask_is_thresholded_with_a_warning(files, capsys):
    mask = np.zeros((40, 48), np.uint8)
    mask[10:25, 12:30] = 200
    mask[10:12, 12:30] = 90  # below the 50 % threshold: dropped
    save(files / "photo_mask.png", mask)
    code, _, err = run(capsys, *protect_args(files))
    assert code == 0
    assert "not binary" in err and "thresholded at 50%" in err


def test_rgba_grey_and_16_bit_images_are_converted(files, capsys):
    gen = np.random.default_rng(1)
    rgba = (gen.random((40, 48, 4)) * 255).astype(np.uint8)
    rgba[..., 3] = 128
    save(files / "photo.png", rgba)
    code, _, err = run(capsys, *protect_args(files))
    assert code == 0 and "alpha channel dropped" in err
    grey16 = (gen.random((40, 48)) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(files / "photo.png")
    code, _, err = run(capsys, *protect_args(files, "--overwrite"))
    assert code == 0, err
    assert np.asarray(Image.open(files / "out.png")).shape == (40, 48, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--eps", "0"), "--eps must be in"),
        (("--eps", "300"), "--eps must be in"),
        (("--steps", "0"), "--steps must be in"),
        (("--expand", "4"), "--expand must be odd"),
        (("--target", "nothing.png"), "--target"),
    ],
)
def test_out_of_range_options_are_named(files, capsys, extra, message):
    with pytest.raises(SystemExit) if extra[0] in ("--eps", "--steps") else _no_exit():
        code, _, err = run(capsys, *protect_args(files, *extra))
        assert code == 2 and message in err
    if extra[0] in ("--eps", "--steps"):
        assert message in capsys.readouterr().err


def test_unknown_editor_lists_the_known_ones(files, capsys):
    code, _, err = run(capsys, *protect_args(files, editor="photoshop"))
    assert code == 2 and "unknown editor 'photoshop'" in err and "lama" in err


def test_missing_weights_say_where_to_put_them(files, capsys):
    code, _, err = run(
        capsys, *protect_args(files, "--weights", files / "best.ckpt", editor="lama")
    )
    assert code == 2 and "best.ckpt" in err


def test_reserved_mat_editor_explains(files, capsys):
    code, _, err = run(capsys, *protect_args(files, editor="mat"))
    assert code == 2 and "not implemented" in err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
