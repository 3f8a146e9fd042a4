"""The image owner's command: happy path and every bad-input message."""

import json
import math
import os

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
    from runtime_backdoor.owner import CHECK_RELIABILITY as measured

    code, out, err = run(
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
    # every prediction comes with how often such a prediction held when measured
    said = f"protection did not work in {measured['npv']} of {measured['npv_cases']} cases"
    assert report["measured"].startswith(f"measured: when check said unlikely, {said}")
    assert err.startswith("runtime-backdoor: prediction: unlikely") and said in err
    assert len(err.splitlines()) == 1


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
    code, _, err = run(capsys, *protect_args(files, *extra))
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_unknown_editor_lists_the_known_ones(files, capsys):
    code, _, err = run(capsys, *protect_args(files, editor="photoshop"))
    assert code == 2 and "unknown editor 'photoshop'" in err and "lama" in err


def test_missing_weights_say_where_to_put_them(files, capsys):
    code, _, err = run(
        capsys, *protect_args(files, "--weights", files / "best.ckpt", editor="lama")
    )
    assert code == 2 and "best.ckpt" in err


def test_an_editor_without_its_weights_says_which_file(files, capsys):
    for editor, names in (("mat", ".pth"), ("mini-lama", "trained"), ("lama", "best.ckpt")):
        code, _, err = run(capsys, *protect_args(files, editor=editor))
        assert code == 2 and len(err.splitlines()) == 1
        assert f"--editor {editor} needs --weights" in err and names in err, err
    # where `runtime-backdoor weights fetch` puts them: the registry's default file
    code, _, err = run(capsys, *protect_args(files, editor="mat"))
    assert "`runtime-backdoor weights fetch mat-places512` puts them in models/mat/" in err


@pytest.mark.parametrize("device", ["cpu:1", "tpu9", "mps"])
def test_a_device_that_is_not_here_is_refused_in_one_line(files, capsys, device):
    folder = make_folder(files / "f") and ("check", files / "f", "--out", files / "checked")
    for argv in (protect_args(files), folder):
        code, out, err = run(capsys, *argv, "--editor", "blur-fill", "--device", device)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith("runtime-backdoor: error: --device: ") and repr(device) in err
    assert not (files / "out.png").exists() and not (files / "checked").exists()
    _, _, err = run(capsys, *protect_args(files), "--device", "cpu:1")
    assert err == "runtime-backdoor: error: --device: 'cpu:1' does not exist (use cpu)\n"


def test_editors_lists_the_registry_with_its_weight_files(capsys):
    from runtime_backdoor.editors import EDITORS

    code, out, _ = run(capsys, "editors")
    lines = out.splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == list(EDITORS)
    lama = next(line for line in lines if line.startswith("lama "))
    assert lama.endswith("[`runtime-backdoor weights fetch big-lama`]")
    assert "weights fetch" not in next(line for line in lines if line.startswith("tiny-sd "))


# ------------------------------------------------------------------------------- edit


def edit_args(d, image="photo.png", *extra):
    return ("edit", d / image, "--mask", d / "photo_mask.png", "--editor", "blur-fill", *extra)


def read8(path):
    return np.asarray(Image.open(path)).astype(int)


def test_edit_fills_only_the_region_and_matches_the_editor(files, capsys):
    import torch

    from runtime_backdoor.editors import build_editor

    code, out, err = run(capsys, *edit_args(files, "photo.png", "--out", files / "edited.png"))
    assert code == 0, err
    edited, original = read8(files / "edited.png"), read8(files / "photo.png")
    mask = read8(files / "photo_mask.png") > 127
    assert np.array_equal(edited[~mask], original[~mask])  # outside the region: untouched
    x = torch.from_numpy(original / 255.0).permute(2, 0, 1)[None].float()
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    with torch.no_grad():
        expected = build_editor("blur-fill")(x, m)[0].permute(1, 2, 0).numpy()
    assert np.abs(edited - np.round(expected * 255)).max() <= 1  # float32 rounding ties
    assert json.loads(out)["out"] == str(files / "edited.png")


def test_edit_compare_panel_and_metrics(files, capsys):
    import torch

    from runtime_backdoor import metrics as Q
    from runtime_backdoor import owner
    from runtime_backdoor.editors import build_editor

    code, _, err = run(capsys, *protect_args(files))
    assert code == 0, err
    argv = edit_args(
        files, "out.png", "--out", files / "edited.png", "--compare", files / "photo.png"
    )
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads(out)
    # The figure is the owner's labelled comparison of these very edits.
    x, m, _ = owner.read_inputs(files / "out.png", files / "photo_mask.png")
    original, _, _ = owner.read_inputs(files / "photo.png", files / "photo_mask.png")
    editor = build_editor("blur-fill")
    numbers, edits = owner.compare_edits(editor, original, x, m, "solid", torch.device("cpu"))
    figure, boxes = owner.compare_figure(edits, numbers, owner.colour_name(edits["target"]))
    panel = read8(files / "edited_compare.png")
    assert panel.shape == figure.shape and np.array_equal(panel, figure)
    k = 4  # 40 x 48 px enlarged by whole pixels to at least 160 px
    assert boxes["malicious_protected"][2:] == (40 * k, 48 * k)

    def box(name):
        top, left, h, w = boxes[name]
        return panel[top : top + h, left : left + w][::k, ::k]

    edited = read8(files / "edited.png")
    assert np.array_equal(box("malicious_protected"), edited)
    assert np.array_equal(box("malicious_difference"), np.abs(edited - box("malicious_original")))
    assert not np.array_equal(box("benign_protected"), edited)  # the ring edit, not the region's
    top, left, h, w = boxes["target"]
    swatch = panel[top : top + h, left : left + w].reshape(-1, 3)
    assert (swatch == np.round(edits["target"][0, 0] * 255)).all()  # the target colour shown
    # The labels above the panels are drawn (dark text on the white background).
    assert (panel[boxes["malicious_original"][0] - 15 : boxes["malicious_original"][0]] < 100).any()
    region = read8(files / "photo_mask.png") > 127
    prot, clean = box("malicious_protected"), box("malicious_original")
    assert report["psnr_region_vs_original_edit"] == pytest.approx(
        Q.psnr(prot / 255, clean / 255, region), abs=1e-3
    )
    assert report["ssim_region_vs_original_edit"] == pytest.approx(
        Q.ssim(prot / 255, clean / 255, region), abs=1e-4
    )
    # The benign ring edit is reported too, with the kernel it used (scaled: 3 at 40 px).
    assert report["expand"] == 3 and report["ring_psnr_vs_original_edit"] > 30
    assert report["ring_hit_fraction"] == report["ring_hit_fraction_original"] == 0
    # blur-fill is insensitive: the protected image's fill stays near the clean one, off target.
    assert report["hit_fraction"] <= 0.05 and report["psnr_region_vs_original_edit"] > 25
    assert report["verdict"] == "not protected" and "0% of the region" in report["verdict_detail"]
    # The original compared with itself: identical edits.
    argv = edit_args(
        files, "photo.png", "--out", files / "same.png", "--compare", files / "photo.png"
    )
    code, out, _ = run(capsys, *argv)
    same = json.loads(out)
    assert code == 0 and same["psnr_region_vs_original_edit"] == math.inf
    assert same["ring_psnr_vs_original_edit"] == math.inf
    assert same["ssim_region_vs_original_edit"] == pytest.approx(1.0)
    assert same["hit_fraction"] == same["hit_fraction_original"]
    (files / "same.png").unlink()  # the panel is still there: not replaced without --overwrite
    code, _, err = run(capsys, *argv)
    assert code == 2 and "same_compare.png" in err and "--overwrite" in err
    assert run(capsys, *argv, "--overwrite")[0] == 0


# ------------------------------------------------------------------------------- folders


def make_folder(folder, n=3, size=(24, 28), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    names = []
    for i in range(n):
        image = (gen.random((*size, 3)) * 200 + 20).astype(np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[4 + i : 14 + i, 6:18] = 255
        name = f"img{i:02d}"
        Image.fromarray(image).save(folder / f"{name}_example.png")
        Image.fromarray(mask).save(folder / f"{name}_example_mask.png")
        names.append(name)
    return names


def folder_protect(src, out, *extra):
    return (
        "protect",
        src,
        "--editor",
        "blur-fill",
        "--out",
        out,
        "--steps",
        "2",
        "--quiet",
        *extra,
    )


def test_folder_protect_matches_single_images_skips_bad_pairs_and_resumes(tmp_path, capsys):
    import pandas as pd

    src = tmp_path / "photos"
    names = make_folder(src)
    (src / "orphan_example.png").write_bytes((src / "img00_example.png").read_bytes())  # no mask
    (src / "broken_example.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "broken_example_mask.png").write_bytes((src / "img00_example_mask.png").read_bytes())
    out = tmp_path / "protected"
    code, stdout, err = run(capsys, *folder_protect(src, out))
    assert code == 1  # something was skipped
    assert "skipped orphan" in err and "skipped broken" in err and "Traceback" not in err
    manifest = pd.read_csv(out / "manifest.csv").set_index("name")
    assert manifest.loc[names, "status"].eq("done").all()
    assert manifest.loc[["orphan", "broken"], "status"].eq("skipped").all()
    assert json.loads(stdout.splitlines()[-1])["computed"] == 3
    for name in names:  # the same bytes as protecting each image alone
        alone = tmp_path / f"{name}.png"
        argv = ("protect", src / f"{name}_example.png", "--mask", src / f"{name}_example_mask.png")
        assert (
            run(capsys, *argv, "--editor", "blur-fill", "--out", alone, "--steps", "2", "--quiet")[
                0
            ]
            == 0
        )
        assert (out / f"{name}_example.png").read_bytes() == alone.read_bytes()
        assert np.array_equal(
            read8(out / f"{name}_example_mask.png"), read8(src / f"{name}_example_mask.png")
        )
    assert not list(out.glob(".parts/*")) and not list(out.glob(".*.tmp"))
    # Resume: nothing is redone; a lost output is redone alone.
    (src / "orphan_example.png").unlink()
    (src / "broken_example.png").unlink()
    (src / "broken_example_mask.png").unlink()
    mtimes = {n: (out / f"{n}_example.png").stat().st_mtime_ns for n in names}
    (out / "img01_example.png").unlink()
    code, stdout, _ = run(capsys, *folder_protect(src, out))
    summary = json.loads(stdout.splitlines()[-1])
    assert code == 0 and summary["computed"] == 1 and summary["resumed"] == 2
    assert [json.loads(line)["name"] for line in stdout.splitlines()[:-1]] == ["img01"]
    for n in ("img00", "img02"):
        assert (out / f"{n}_example.png").stat().st_mtime_ns == mtimes[n]
    # Other settings: everything is redone.
    code, stdout, _ = run(capsys, *folder_protect(src, out, "--seed", "1"))
    assert code == 0 and json.loads(stdout.splitlines()[-1])["computed"] == 3


def test_folder_edit_with_compare_and_folder_check(tmp_path, capsys):
    import pandas as pd

    src, prot, edited = tmp_path / "photos", tmp_path / "protected", tmp_path / "edited"
    names = make_folder(src, n=2)
    assert run(capsys, *folder_protect(src, prot))[0] == 0
    argv = ("edit", prot, "--editor", "blur-fill", "--out", edited, "--compare", src, "--quiet")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    manifest = pd.read_csv(edited / "manifest.csv")
    assert list(manifest["name"]) == names and manifest["hit_fraction"].between(0, 1).all()
    for name in names:
        panel = read8(edited / f"{name}_compare.png")
        top, left = 8 + 2 * 20, 8 + 6 * 28 + 4  # below the title and labels; second panel
        shown = panel[top : top + 6 * 24 : 6, left : left + 6 * 28 : 6]  # enlarged ×6
        assert np.array_equal(shown, read8(edited / f"{name}_example.png"))
        assert manifest.set_index("name").loc[name, "verdict"] == "not protected"
    code, _, _ = run(
        capsys, "check", src, "--editor", "blur-fill", "--out", tmp_path / "check", "--quiet"
    )
    checked = pd.read_csv(tmp_path / "check" / "manifest.csv")
    assert code == 0 and (checked["gain"] <= 1 + 1e-6).all() and len(checked) == 2


# ------------------------------------------------------------------------------- bad inputs


def _lama_state():
    from runtime_backdoor.editors.lama import load_lama

    return load_lama(None, preset="mini", seed=0).generator.state_dict()


def _save_torch(path, obj, cut=None):
    import torch

    torch.save(obj, path)
    if cut:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    return path


def _torchscript(path, cut=None):
    import torch

    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    if cut:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    return path


def _safetensors(path, cut=None):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4)}, str(path))
    if cut:
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    return path


def _diffusers_folder(path, corrupt_weights):
    (path / "unet").mkdir(parents=True)
    if corrupt_weights:
        config = {"_class_name": "UNet2DConditionModel", "in_channels": 9, "out_channels": 4}
        (path / "unet" / "config.json").write_text(json.dumps(config))
        (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk" * 10)
    return path


def _weights(editor, make):
    def setup(d):
        return ["--editor", editor, "--weights", make(d)]

    return setup


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _mini_junk(d):
    import dataclasses

    from runtime_backdoor.editors.lama import PRESETS

    (d / "mini.json").write_text(json.dumps({"config": dataclasses.asdict(PRESETS["mini"])}))
    (d / "mini.safetensors").write_bytes(b"junk")
    return d / "mini.safetensors"


def _declared_size(path, width, height):
    """A PNG whose header declares width x height (the pixel data does not matter)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def _replace(name, make):
    def setup(d):
        make(d / name)
        return []

    return setup


def _tiny(d):
    save(d / "photo.png", np.zeros((1, 1, 3), np.uint8))
    save(d / "photo_mask.png", np.full((1, 1), 255, np.uint8))
    return []


BAD_INPUTS = {
    # the four cases of the issue
    "junk-ckpt": (
        _weights(
            "lama", lambda d: (d / "garbage.ckpt").write_bytes(b"\x80junk!") and d / "garbage.ckpt"
        ),
        "garbage.ckpt",
    ),
    "sd-hub-id-not-cached": (
        lambda d: [
            "--editor",
            "sd-inpainting",
            "--weights",
            "runwayml/stable-diffusion-inpainting",
        ],
        "hf download",
    ),
    "lama-without-weights": (lambda d: ["--editor", "lama"], "needs --weights"),
    # weight files of every supported format: corrupt, truncated, foreign, wrong architecture
    "text-ckpt": (_weights("lama", lambda d: _write_bytes(d / "best.ckpt", b"garbage")), "corrupt"),
    "os-system-pickle": (
        _weights("lama", lambda d: _write_bytes(d / "best.ckpt", b"\x80\x02cos\nsystem\nq\x00.")),
        "best.ckpt",
    ),
    "truncated-ckpt": (
        _weights(
            "lama", lambda d: _save_torch(d / "best.ckpt", {"state_dict": _lama_state()}, cut=0.5)
        ),
        "best.ckpt",
    ),
    "foreign-ckpt": (
        _weights(
            "lama",
            lambda d: _save_torch(
                d / "best.ckpt", {"state_dict": {"fc.weight": __import__("torch").zeros(2, 2)}}
            ),
        ),
        "best.ckpt",
    ),
    "wrong-architecture-pth": (
        _weights("lama", lambda d: _save_torch(d / "mini.pth", _lama_state())),
        "does not match",
    ),
    "corrupt-pth": (
        _weights(
            "lama",
            lambda d: (d / "model.pth").write_bytes(b"PK\x03\x04" + b"\0" * 40) and d / "model.pth",
        ),
        "model.pth",
    ),
    "code-in-pickle": (
        _weights("lama", lambda d: _save_torch(d / "evil.pth", {"x": argparse_namespace()})),
        "evil.pth",
    ),
    "foreign-torchscript": (
        _weights("lama", lambda d: _torchscript(d / "big-lama.pt")),
        "cannot locate a LaMa generator",
    ),
    "truncated-torchscript": (
        _weights("lama", lambda d: _torchscript(d / "big-lama.pt", cut=0.6)),
        "big-lama.pt",
    ),
    "junk-safetensors": (
        _weights(
            "lama",
            lambda d: (d / "lama.safetensors").write_bytes(b"\xff" * 32) and d / "lama.safetensors",
        ),
        "lama.safetensors",
    ),
    "truncated-safetensors": (
        _weights("lama", lambda d: _safetensors(d / "lama.safetensors", cut=0.7)),
        "lama.safetensors",
    ),
    "foreign-safetensors": (
        _weights("lama", lambda d: _safetensors(d / "lama.safetensors")),
        "cannot locate a LaMa generator",
    ),
    "lama-folder-without-ckpt": (
        _weights("lama", lambda d: (d / "big-lama").mkdir() or d / "big-lama"),
        "best.ckpt",
    ),
    "mini-junk-safetensors": (_weights("mini-lama", _mini_junk), "mini.safetensors"),
    "mini-without-sidecar": (
        _weights(
            "mini-lama",
            lambda d: _mini_junk(d).with_suffix(".json").unlink() or d / "mini.safetensors",
        ),
        "mini.json",
    ),
    "empty-diffusers-folder": (
        _weights("sd-inpainting", lambda d: _diffusers_folder(d / "sd", False)),
        "sd",
    ),
    "corrupt-diffusers-folder": (
        _weights("sd-inpainting", lambda d: _diffusers_folder(d / "sd", True)),
        "sd",
    ),
    "weights-for-blur-fill": (
        lambda d: ["--editor", "blur-fill", "--weights", d / "photo.png"],
        "no weights",
    ),
    "unknown-editor": (lambda d: ["--editor", "photoshop"], "unknown editor"),
    # images and masks
    "image-missing": (_replace("photo.png", lambda p: p.unlink()), "photo.png"),
    "image-not-an-image": (
        _replace("photo.png", lambda p: p.write_bytes(b"not an image")),
        "photo.png",
    ),
    "image-truncated": (
        _replace("photo.png", lambda p: p.write_bytes(p.read_bytes()[:200])),
        "photo.png",
    ),
    "image-is-a-folder": (
        _replace("photo.png", lambda p: (p.unlink(), p.mkdir())),
        "--mask is for a single image",
    ),
    "mask-is-a-folder": (
        _replace("photo_mask.png", lambda p: (p.unlink(), p.mkdir())),
        "is a folder",
    ),
    "mask-missing": (_replace("photo_mask.png", lambda p: p.unlink()), "photo_mask.png"),
    "mask-colour": (
        _replace(
            "photo_mask.png",
            lambda p: save(
                p, np.dstack([np.full((40, 48), 255, np.uint8), np.zeros((40, 48, 2), np.uint8)])
            ),
        ),
        "colour",
    ),
    "image-1x1": (_tiny, "mask"),
    "image-20000x20000-declared": (
        _replace("photo.png", lambda p: _declared_size(p, 20000, 20000)),
        "too large",
    ),
    # options and outputs
    "out-parent-is-a-file": (lambda d: ["--out", d / "photo.png" / "out.png"], "is a file"),
    "out-not-png": (lambda d: ["--out", d / "out.jpg"], "PNG"),
    "threshold-zero": (lambda d: ["--threshold", "0"], "--threshold"),
    "device-unknown": (lambda d: ["--device", "tpu9"], "--device"),
    "steps-not-a-number": (lambda d: ["--steps", "many"], "--steps"),
    "unknown-option": (lambda d: ["--colour", "red"], "unrecognized arguments"),
    # folders
    "folder-without-images": (
        lambda d: ["IMAGE", (d / "empty").mkdir() or d / "empty"],
        "no '*_example.png'",
    ),
    "folder-out-is-a-file": (
        lambda d: ["IMAGE", make_folder(d / "f") and d / "f", "--out", d / "photo.png"],
        "is a file",
    ),
    "folder-out-is-the-input": (
        lambda d: ["IMAGE", make_folder(d / "f") and d / "f", "--out", d / "f"],
        "input folder",
    ),
}


def argparse_namespace():
    import datetime

    return datetime.date(2024, 1, 1)  # any object but tensors and training metadata


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_matrix_gives_one_line_and_no_traceback(files, capsys, case):
    setup, message = BAD_INPUTS[case]
    extra = [str(a) for a in setup(files)]
    argv = [str(a) for a in protect_args(files)]
    if extra[:1] == ["IMAGE"]:  # a folder instead of the image and its mask
        argv[1:4] = [extra[1]]
        extra = extra[2:]
        if "--out" in extra:
            i = argv.index("--out")
            del argv[i : i + 2]
    if "--editor" in extra:
        i = argv.index("--editor")
        del argv[i : i + 2]
    if "--out" in extra and "--out" in argv:
        i = argv.index("--out")
        del argv[i : i + 2]
    code, out, err = run(capsys, *argv, *extra)
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("runtime-backdoor: error:"), err
    assert message in err, err
    assert "Traceback" not in out + err and "weights_only" not in err and "trust" not in err
    assert not (files / "out.png").exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(files, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    code, out, err = run(capsys, *protect_args(files))
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err
    assert "out.png" in err and "Traceback" not in out + err
    assert not (files / "out.png").exists() and not list(files.glob(".*.tmp"))


def test_debug_shows_the_traceback(files, capsys):
    code, _, err = run(capsys, *protect_args(files, "--debug", editor="lama"))
    assert code == 2 and "Traceback" in err
    assert err.splitlines()[-1].startswith("runtime-backdoor: error: --editor lama needs --weights")


def test_a_closed_stdout_is_quiet(files):
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "runtime_backdoor.cli", "editors"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and err == ""
    # A folder run piped into head: the work goes on, nothing on stderr.
    src = make_folder(files / "many", n=3) and files / "many"
    shell = f"{sys.executable} -m runtime_backdoor.cli protect {src} --editor blur-fill --out {files / 'p'} --steps 1 --quiet | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env)
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1
    assert len(list((files / "p").glob("*_example.png"))) == 3


# ------------------------------------------------------------------------------- verdict


def _recomputed(files, out, editor_name, expand):
    """The attacker's edits of the written PNG, recomputed here without the owner's code."""
    import torch

    from runtime_backdoor import metrics as Q
    from runtime_backdoor.editors import build_editor
    from runtime_backdoor.masks import ring
    from runtime_backdoor.targets import make_target

    editor = build_editor(editor_name)

    def tensor(path):
        return torch.from_numpy(read8(path) / 255.0).permute(2, 0, 1)[None].float()

    x, xp = tensor(files / "photo.png"), tensor(out)
    m = torch.from_numpy((read8(files / "photo_mask.png") > 127).astype(np.float32))[None, None]
    band = ring(m, expand)
    phi = make_target(x, "solid")[0].permute(1, 2, 0).numpy()
    got = {}
    with torch.no_grad():
        for key, region in (("", m), ("ring_", band)):
            clean = np.round(editor(x, region)[0].permute(1, 2, 0).numpy() * 255) / 255
            prot = np.round(editor(xp, region)[0].permute(1, 2, 0).numpy() * 255) / 255
            r = region[0, 0].numpy() > 0.5
            got[f"{key}hit_fraction"] = Q.target_hit_fraction(prot, phi, r, 0.1)
            got[f"{key}hit_fraction_original"] = Q.target_hit_fraction(clean, phi, r, 0.1)
            got[f"{key}psnr"] = Q.psnr(prot, clean, r)
    return got


@pytest.mark.parametrize("editor", ["toy-control", "blur-fill"])
def test_protect_gives_one_verdict_from_the_written_png(files, capsys, editor):
    code, out, err = run(capsys, *protect_args(files, "--steps", "20", editor=editor))
    assert code == 0, err  # a written file: exit 0 whatever the verdict
    report = json.loads(out)
    assert list(report)[:3] == ["out", "verdict", "verdict_detail"]
    assert report["verdict"] in (
        "protected",
        "not protected",
        "protected, with a side effect on benign edits",
        "not protected, with a side effect on benign edits",
    )
    lines = [ln for ln in err.splitlines() if ln.startswith("runtime-backdoor: verdict: ")]
    assert len(lines) == 1 and report["verdict"] in lines[0]
    got = _recomputed(files, files / "out.png", editor, report["expand"])
    for key in ("hit_fraction", "hit_fraction_original", "ring_hit_fraction"):
        assert report[key] == pytest.approx(got[key], abs=1e-4), key
    assert report["ring_psnr_vs_original_edit"] == pytest.approx(got["ring_psnr"], abs=1e-2)
    hit = got["hit_fraction"] >= 0.5 and got["hit_fraction_original"] < 0.5
    side = got["ring_psnr"] < 30 or (
        got["ring_hit_fraction"] >= 0.5 and got["ring_hit_fraction_original"] < 0.5
    )
    expected = ("not protected" if not hit else "protected") + (", with" if side else "")
    assert report["verdict"].startswith(expected) and ("side effect" in report["verdict"]) == side
    if editor == "blur-fill":  # insensitive: the file is written, and said not to protect
        assert report["verdict"] == "not protected" and report["hit_fraction"] <= 0.05
        assert (files / "out.png").is_file()
    else:  # the toy control on this photo: the region hits, and so does its ring
        assert report["hit_fraction"] >= 0.5 and report["verdict"].startswith("protected")


def test_no_verify_skips_the_edits(files, capsys, monkeypatch):
    from runtime_backdoor import batch

    def fail(*args, **kwargs):
        raise AssertionError("verification ran")

    monkeypatch.setattr(batch, "verify_editors", fail)
    code, out, err = run(capsys, *protect_args(files, "--no-verify"))
    assert code == 0, err
    report = json.loads(out)
    assert report["verdict"] == "not verified (--no-verify)" and "hit_fraction" not in report


def test_verdict_is_in_the_help_with_its_thresholds(capsys):
    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    text = capsys.readouterr().out
    for words in (
        "protected, with a side effect on benign edits",
        "not protected, with a side effect on benign edits",
        "The same side effect without the protection",
        "at least 50% of the edited region with every channel within 0.1",
        "below 30 dB PSNR",
        "0 when the PNG was written, whatever the verdict",
        '["verdict"]',
        "--no-verify",
    ):
        assert words in " ".join(text.split()), words


def test_folder_records_verdicts_and_hashes(tmp_path, capsys):
    import hashlib

    import pandas as pd

    src, out = tmp_path / "photos", tmp_path / "protected"
    names = make_folder(src, n=2)
    code, stdout, err = run(capsys, *folder_protect(src, out))
    assert code == 0, err
    manifest = pd.read_csv(out / "manifest.csv").set_index("name")
    assert manifest.loc[names, "verdict"].eq("not protected").all()  # blur-fill
    assert manifest.loc[names, "ring_psnr_vs_original_edit"].gt(30).all()
    for name in names:
        data = (out / f"{name}_example.png").read_bytes()
        assert manifest.loc[name, "out_sha256"] == hashlib.sha256(data).hexdigest()
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["verdicts"] == {"not protected": 2} and summary["redone_damaged"] == 0


def test_resume_redoes_damaged_outputs(tmp_path, capsys):
    import pandas as pd

    src, out = tmp_path / "photos", tmp_path / "protected"
    names = make_folder(src, n=3)
    assert run(capsys, *folder_protect(src, out))[0] == 0
    good = {n: (out / f"{n}_example.png").read_bytes() for n in names}
    # an output cut to 100 bytes and one with a flipped byte: both redone, the third kept
    (out / "img01_example.png").write_bytes(good["img01"][:100])
    flipped = bytearray(good["img02"])
    flipped[-20] ^= 0xFF
    (out / "img02_example.png").write_bytes(bytes(flipped))
    mtime = (out / "img00_example.png").stat().st_mtime_ns
    code, stdout, err = run(capsys, *folder_protect(src, out))
    summary = json.loads(stdout.splitlines()[-1])
    assert code == 0 and summary["computed"] == 2 and summary["resumed"] == 1, summary
    assert summary["redone_damaged"] == 2
    assert "redoing img01: img01_example.png differs from the SHA-256 recorded" in err
    assert "redoing img02" in err
    for n in names:
        assert (out / f"{n}_example.png").read_bytes() == good[n]
    assert (out / "img00_example.png").stat().st_mtime_ns == mtime
    # a manifest of an older run, without hashes: outputs are decoded in full instead
    manifest = pd.read_csv(out / "manifest.csv").drop(columns=["out_sha256"])
    manifest.to_csv(out / "manifest.csv", index=False)
    (out / "img00_example.png").write_bytes(good["img00"][:100])
    (out / "img02_example_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code, stdout, err = run(capsys, *folder_protect(src, out))
    summary = json.loads(stdout.splitlines()[-1])
    assert code == 0 and summary["computed"] == 2 and summary["redone_damaged"] == 2, err
    assert "redoing img00: img00_example.png does not decode" in err
    assert "redoing img02: img02_example_mask.png does not decode" in err
    assert (out / "img00_example.png").read_bytes() == good["img00"]


@pytest.mark.parametrize(
    "garbage, reason",
    [
        (
            b"name,verdict\nimg00,ok\nimg01,ok,extra,fields\n",
            "C error: Expected 2 fields in line 3, saw 4",
        ),  # fmt: skip
        (bytes(range(128, 256)) * 4, "'utf-8' codec can't decode byte 0x80"),
        (b"", "No columns to parse from file"),
    ],
)
def test_a_garbage_manifest_is_named_in_one_line(tmp_path, capsys, monkeypatch, garbage, reason):
    from runtime_backdoor import batch

    src, out = tmp_path / "photos", tmp_path / "protected"
    make_folder(src, n=2)
    out.mkdir()
    (out / "manifest.csv").write_bytes(garbage)
    loaded = []
    monkeypatch.setattr(batch, "_build_editor", lambda *a: loaded.append(a))
    code, stdout, err = run(capsys, *folder_protect(src, out))
    assert code == 2 and stdout == "" and loaded == []  # refused before the editor is loaded
    assert err.startswith(f"runtime-backdoor: error: {out / 'manifest.csv'}: not a CSV table (")
    assert reason in err and "rename or remove it" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (out / "manifest.csv").read_bytes() == garbage  # left as it was
    # a killed run's part of the manifest is named the same way
    (out / "manifest.csv").unlink()
    (out / ".parts").mkdir()
    (out / ".parts" / "manifest.rank0.csv").write_bytes(garbage)
    code, _, err = run(capsys, *folder_protect(src, out))
    assert code == 2 and f"{out / '.parts' / 'manifest.rank0.csv'}: not a CSV table (" in err


def test_an_unwritable_out_is_refused_before_any_work(files, capsys, monkeypatch):
    from runtime_backdoor import batch

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(batch, "load_editor", no_work)
    monkeypatch.setattr(batch, "protect_image", no_work)
    # /proc takes no files, even from root (a chmod-ed folder would not stop root)
    argv = list(protect_args(files))
    argv[argv.index("--out") + 1] = "/proc/runtime-backdoor-test/out.png"
    code, _, err = run(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("runtime-backdoor: error: --out /proc/runtime-backdoor-test/out.png:")
    assert "cannot write in /proc" in err
    src = make_folder(files / "f", n=1) and files / "f"
    code, _, err = run(capsys, *folder_protect(src, "/proc/runtime-backdoor-test"))
    assert code == 2 and "--out /proc/runtime-backdoor-test: cannot write in /proc" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(files, capsys, monkeypatch):
    from runtime_backdoor import batch

    monkeypatch.setattr(batch, "protect_image", lambda *a, **k: pytest.fail("the work started"))
    (files / "ro").mkdir()
    (files / "ro").chmod(0o555)
    argv = list(protect_args(files))
    argv[argv.index("--out") + 1] = str(files / "ro" / "out.png")
    code, _, err = run(capsys, *argv)
    assert code == 2 and "cannot write in" in err and "Permission denied" in err


@pytest.mark.parametrize("seed", [str(2**70), "-1", "1.5"])
def test_an_out_of_range_seed_is_named(files, capsys, seed):
    code, _, err = run(capsys, *protect_args(files, "--seed", seed))
    assert code == 2 and len(err.splitlines()) == 1 and "--seed must be" in err, err
    assert "Overflow" not in err and not (files / "out.png").exists()


def test_a_kernel_that_covers_the_image_is_blamed_not_the_out_path(files, capsys):
    sparse = np.zeros((40, 48), np.uint8)
    sparse[::7, ::9] = 255  # scattered pixels: E(m) with a 17 px kernel covers everything
    save(files / "photo_mask.png", sparse)
    code, _, err = run(capsys, *protect_args(files, "--expand", "17", editor="toy-control"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "--expand 17: the expanded region E(m) covers the whole 48×40 image" in err
    assert "out.png" not in err and not (files / "out.png").exists()
    # the kernel scaled with the size (3 px here) works on the same mask
    code, out, err = run(capsys, *protect_args(files, editor="toy-control"))
    assert code == 0 and json.loads(out)["expand"] == 3, err


def test_an_editor_that_returns_nan_is_named(files, capsys, monkeypatch):
    import torch

    from runtime_backdoor import batch
    from runtime_backdoor.editors.base import Editor

    class NaNEditor(Editor):
        def predict(self, image, mask):
            return image * float("nan")

    monkeypatch.setattr(batch, "load_editor", lambda *a: NaNEditor().eval())
    assert isinstance(NaNEditor()(torch.zeros(1, 3, 8, 8), torch.ones(1, 1, 8, 8)), torch.Tensor)
    code, _, err = run(capsys, *protect_args(files))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--editor blur-fill returned NaN or infinite values" in err
    assert "nothing was written" in err and not (files / "out.png").exists()


def test_weights_given_to_an_editor_without_weights(files, capsys):
    valid = _safetensors(files / "valid.safetensors")
    for argv in (
        protect_args(files, "--weights", valid),
        ("check", files / "photo.png", "--mask", files / "photo_mask.png", "--editor",
         "blur-fill", "--weights", valid),
    ):  # fmt: skip
        code, _, err = run(capsys, *argv)
        assert code == 2 and "editor blur-fill has no weights; drop --weights" in err, err
        assert "corrupt" not in err


@pytest.mark.parametrize(
    "sidecar, words",
    [
        ("{bad", "its config sidecar {json} is not valid JSON"),
        ('{"x": 1}', "its config sidecar {json} has no 'config' object"),
        ('{"config": {"ngf": "a"}}', "the 'config' of its sidecar {json} does not describe"),
        ('{"config": {"ngf": 8}}', "its weights do not match the config in its sidecar {json}"),
    ],
)
def test_miniature_sidecar_errors_name_the_json(files, capsys, sidecar, words):
    from runtime_backdoor.editors.lama import load_lama
    from runtime_backdoor.editors.mini import save_miniature

    weights = save_miniature(load_lama(None, preset="mini", seed=0), files / "mini.safetensors")
    (files / "mini.json").write_text(sidecar)
    code, _, err = run(capsys, *protect_args(files, "--weights", weights, editor="mini-lama"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert words.format(json=files / "mini.json") in err, err


def _real_png(path, width, height):
    """A real (decodable) grey-free RGB PNG of width x height, written row by row."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z = zlib.compressobj(9)
    row = b"\0" + bytes([200, 30, 40]) * width
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    sig = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


#: the command in a fresh interpreter that writes its own peak memory (VmHWM: this process
#: since its exec, not the memory of the test process it was forked from) to a file
_MEASURED = """\
import sys
from runtime_backdoor.cli import main
try:
    code = main(sys.argv[2:])
finally:
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    open(sys.argv[1], "w").write(status)
sys.exit(code)
"""


def test_a_huge_png_is_refused_from_its_header_fast_and_small(files):
    import subprocess
    import sys
    import time

    big = _real_png(files / "big.png", 12000, 12000)
    mask = _declared_size(files / "big_mask.png", 12000, 12000)
    assert big.stat().st_size < 1_000_000  # a small file that would decode to 432 MB
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    peak = files / "peak_kb.txt"
    for command in ("check", "protect"):
        argv = [command, str(big), "--mask", str(mask), "--editor", "toy-control"]
        argv += ["--out", str(files / "o.png")] if command == "protect" else []
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _MEASURED, str(peak), *argv],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        seconds, peak_mb = time.perf_counter() - start, int(peak.read_text()) / 1024
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == (
            f"runtime-backdoor: error: image {big} is 12000×12000 px (144.0 megapixels): too "
            "large, the limit is 40 megapixels; resize it, or raise the limit with --max-pixels\n"
        )
        # refused from the header: the peak stays far below the 432 MB a decode would need
        # (how fast is the benchmark's business, not a test's: a loaded machine is slower)
        assert peak_mb < 500, (seconds, peak_mb)
        print(f"{command}: refused in {seconds:.2f} s, peak {peak_mb:.0f} MB")


def test_max_pixels_sets_the_limit(files, capsys):
    code, _, err = run(capsys, *protect_args(files, "--max-pixels", "1919"))  # 48 x 40 = 1920
    assert code == 2 and "image" in err and "48×40 px" in err and "--max-pixels" in err
    assert run(capsys, *protect_args(files, "--max-pixels", "1920"))[0] == 0
    code, _, err = run(capsys, *protect_args(files, "--max-pixels", "0"))
    assert code == 2 and "--max-pixels must be in" in err


def test_the_kernel_scales_with_the_image():
    from runtime_backdoor.owner import auto_expand

    assert [auto_expand(s, s) for s in (64, 128, 256, 512, 1024)] == [3, 5, 9, 17, 33]
    assert auto_expand(256, 1024) == 9  # the shorter side


# ------------------------------------------------------------------------------- ensembles

PAIR = "toy-control,blur-fill"
RANK = (
    "protected",
    "protected, with a side effect on benign edits",
    "not protected",
    "not protected, with a side effect on benign edits",
)


def ensemble_of(*verdicts) -> str:
    """The ensemble's verdict: protected only against every editor, a side effect if any."""
    protected = all(not v.startswith("not") for v in verdicts)
    side = any("side effect" in v for v in verdicts)
    return ("protected" if protected else "not protected") + (
        ", with a side effect on benign edits" if side else ""
    )


def test_protect_against_two_editors_gives_each_verdict_and_the_ensembles(files, capsys):
    code, out, err = run(capsys, *protect_args(files, "--steps", "5", editor=PAIR))
    assert code == 0, err
    protected, original = read8(files / "out.png"), read8(files / "photo.png")
    assert protected.shape == original.shape
    assert np.abs(protected - original).max() <= math.floor(EPS * 255)
    report = json.loads(out)
    assert list(report)[:3] == ["out", "verdict", "verdict_detail"]
    assert report["editor"] == PAIR and report["editor_weights"] == [1.0, 1.0]
    assert report["max_change_8bit"] <= math.floor(EPS * 255)
    per_editor = report["per_editor"]
    assert list(per_editor) == ["toy-control", "blur-fill"]
    # each editor's numbers are those of its own edits of the written PNG
    for name, own in per_editor.items():
        got = _recomputed(files, files / "out.png", name, report["expand"])
        for key in ("hit_fraction", "hit_fraction_original", "ring_hit_fraction"):
            assert own[key] == pytest.approx(got[key], abs=1e-4), (name, key)
        assert own["ring_psnr_vs_original_edit"] == pytest.approx(got["ring_psnr"], abs=1e-2)
    toy, blur = per_editor["toy-control"], per_editor["blur-fill"]
    assert toy["hit_fraction"] >= 0.5 and toy["verdict"].startswith("protected")
    assert blur["verdict"] == "not protected" and blur["hit_fraction"] <= 0.05
    # the ensemble is protected only when protected against every editor, and its benign
    # edits are disturbed when any editor's are
    assert report["verdict"].startswith("not protected")
    assert report["verdict"] == ensemble_of(toy["verdict"], blur["verdict"])
    assert report["verdict_detail"].startswith("protected against 1 of 2 editors (toy-control: ")
    losses = report["final_losses"]
    assert losses["total"] == pytest.approx(losses["total/toy-control"] + losses["total/blur-fill"])
    lines = [ln for ln in err.splitlines() if ln.startswith("runtime-backdoor: verdict")]
    assert [ln.split(":")[1] for ln in lines] == [
        " verdict",
        " verdict for toy-control",
        " verdict for blur-fill",
    ]
    assert lines[0] == f"runtime-backdoor: verdict: {report['verdict']}: {report['verdict_detail']}"


def test_editor_weights_weigh_each_editors_loss(files, capsys):
    for weights, (a, b) in (("1,2", (1, 2)), ("1,0", (1, 0))):
        code, out, err = run(
            capsys, *protect_args(files, "--editor-weights", weights, "--overwrite", editor=PAIR)
        )
        assert code == 0, err
        report = json.loads(out)
        assert report["editor_weights"] == [a, b]
        losses = report["final_losses"]
        total = a * losses["total/toy-control"] + b * losses["total/blur-fill"]
        assert losses["total"] == pytest.approx(total)


def test_one_editor_is_the_single_editor_result_bit_for_bit(files, capsys):
    import torch

    from runtime_backdoor import owner
    from runtime_backdoor.editors import build_editor

    code, out, err = run(capsys, *protect_args(files, "--steps", "5", editor="toy-control"))
    assert code == 0, err
    report = json.loads(out)
    assert report["editor"] == "toy-control" and "per_editor" not in report
    assert "editor_weights" not in report and "total/toy-control" not in report["final_losses"]
    # the owner's code given the one editor as an ensemble of one: the same bytes
    x, m, target = owner.read_inputs(files / "photo.png", files / "photo_mask.png")
    editor = build_editor("toy-control")
    alone, result = owner.protect_image(
        {"toy-control": editor}, x, m, target, torch.device("cpu"), eps=EPS, steps=5,
        expand=None, seed=0, name={"toy-control": "--editor toy-control"},
    )  # fmt: skip
    owner.write_output(files / "list.png", result, overwrite=False)
    assert (files / "list.png").read_bytes() == (files / "out.png").read_bytes()
    assert alone["final_losses"]["total"] == report["final_losses"]["total"]
    assert alone["editor_weights"] == [1.0]


def test_weights_are_matched_to_editors_by_position(files, capsys):
    from runtime_backdoor.editors.lama import load_lama
    from runtime_backdoor.editors.mini import save_miniature

    weights = save_miniature(load_lama(None, preset="mini", seed=0), files / "mini.safetensors")
    argv = protect_args(files, "--weights", f",{weights}", editor="toy-control,mini-lama")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads(out)
    assert list(report["per_editor"]) == ["toy-control", "mini-lama"]
    assert all(v["verdict"] in RANK for v in report["per_editor"].values())
    # the other way round: the file goes to the toy, which has none
    argv = protect_args(files, "--weights", f"{weights},", editor="toy-control,mini-lama")
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--weights entry 1 of 2 ({weights}, for toy-control): editor toy-control has no " in err
    assert "leave its entry empty" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ("--editor", "toy-control,nonesuch"),
            "--editor: unknown editor 'nonesuch'; known editors: ",
        ),
        (
            ("--editor", "toy-control,toy-control"),
            "--editor toy-control,toy-control: toy-control is named twice",
        ),  # fmt: skip
        (("--editor", "toy-control,"), "--editor toy-control,: an empty name"),
        (("--editor", "toy-control,lama"), "--editor lama needs its --weights entry (2 of 2, "),
        (
            ("--editor", PAIR, "--weights", "a.ckpt"),
            "--weights a.ckpt: 2 editors need 2 comma-separated entries",
        ),  # fmt: skip
        (
            ("--editor", "toy-control,lama", "--weights", ",x.ckpt"),
            "--weights entry 2 of 2 (x.ckpt, for lama): ",
        ),  # fmt: skip
        (
            ("--editor", PAIR, "--editor-weights", "1"),
            "--editor-weights 1: 2 editors need 2 weights",
        ),  # fmt: skip
        (
            ("--editor", PAIR, "--editor-weights", "1,-1"),
            "--editor-weights 1,-1: every weight must be a non-negative",
        ),  # fmt: skip
        (("--editor", PAIR, "--editor-weights", "1,nan"), "--editor-weights 1,nan: every weight"),
        (
            ("--editor", PAIR, "--editor-weights", "0,0"),
            "--editor-weights 0,0: at least one weight",
        ),
        (("--editor", PAIR, "--editor-weights", "a,b"), "--editor-weights a,b: give 2 numbers"),
        (
            ("--editor", "toy-control", "--editor-weights", "1"),
            "--editor-weights is for several editors",
        ),  # fmt: skip
    ],
)
def test_bad_editor_lists_are_one_line_naming_the_option(files, capsys, argv, message):
    args = list(protect_args(files))
    i = args.index("--editor")
    del args[i : i + 2]
    code, out, err = run(capsys, *args, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("runtime-backdoor: error: "), err
    assert message in err and "Traceback" not in err, err
    assert out == "" and not (files / "out.png").exists()


def test_edit_takes_one_editor_and_check_estimates_each(files, capsys):
    edit = ("edit", files / "photo.png", "--mask", files / "photo_mask.png", "--out", files / "e.png")  # fmt: skip
    code, _, err = run(capsys, *edit, "--editor", PAIR)
    assert code == 2 and len(err.splitlines()) == 1 and "edit uses one editor" in err, err
    check = ("check", files / "photo.png", "--mask", files / "photo_mask.png", "--editor")
    code, out, err = run(capsys, *check, PAIR)
    assert code == 0, err
    report = json.loads(out)
    assert report["editor"] == PAIR and report["eps"] == EPS
    assert list(report["per_editor"]) == ["toy-control", "blur-fill"]
    for name, own in report["per_editor"].items():  # each the estimate check gives it alone
        code, out, _ = run(capsys, *check, name)
        assert own == {k: v for k, v in json.loads(out).items() if k not in ("editor", "eps")}
    assert report["per_editor"]["blur-fill"]["verdict"].startswith("unlikely")
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("runtime-backdoor: prediction for toy-control: ")
    assert lines[1].startswith("runtime-backdoor: prediction for blur-fill: unlikely")


def test_the_editor_of_an_ensemble_that_returns_nan_is_named(files, capsys, monkeypatch):
    from runtime_backdoor import batch
    from runtime_backdoor.editors import build_editor
    from runtime_backdoor.editors.base import Editor

    class NaNEditor(Editor):
        def predict(self, image, mask):
            return image * float("nan")

    def load(name, weights, device):
        return NaNEditor().eval() if name == "blur-fill" else build_editor(name)

    monkeypatch.setattr(batch, "load_editor", load)
    code, _, err = run(capsys, *protect_args(files, editor=PAIR))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "error: --editor blur-fill returned NaN or infinite values" in err
    assert "nothing was written" in err and not (files / "out.png").exists()


def test_no_verify_gives_no_verdict_for_any_editor(files, capsys):
    code, out, err = run(capsys, *protect_args(files, "--no-verify", editor=PAIR))
    assert code == 0, err
    report = json.loads(out)
    unverified = "not verified (--no-verify)"
    assert report["verdict"] == unverified
    assert report["per_editor"] == {
        n: {"verdict": unverified} for n in ("toy-control", "blur-fill")
    }
    assert err == f"runtime-backdoor: verdict: {unverified}\n"


def test_the_ensemble_is_in_the_help(capsys):
    from runtime_backdoor.owner import ENSEMBLE_RULE

    with pytest.raises(SystemExit):
        main(["protect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in (
        "--editor A,B",
        "--editor-weights W1,W2",
        "--editor toy-control,lama --weights ,models/big-lama.pt",
        '"per_editor"',
        '"verdict/toy-control"',
        ENSEMBLE_RULE,
    ):
        assert words in text, words


def test_folder_ensemble_records_each_verdict_and_resumes(tmp_path, capsys):
    import pandas as pd

    src, out = tmp_path / "photos", tmp_path / "protected"
    names = make_folder(src, n=2)

    def protect(*extra, editor=PAIR):
        argv = list(folder_protect(src, out, *extra))
        argv[argv.index("--editor") + 1] = editor
        code, stdout, err = run(capsys, *argv)
        assert code == 0, err
        return [json.loads(line) for line in stdout.splitlines()]

    lines = protect()
    summary = lines[-1]
    manifest = pd.read_csv(out / "manifest.csv").set_index("name")
    for name in names:
        row = manifest.loc[name]
        each = [row["verdict/toy-control"], row["verdict/blur-fill"]]
        assert set(each) <= set(RANK) and row["verdict/blur-fill"] == "not protected"
        assert row["verdict"] == ensemble_of(*each) and row["verdict"].startswith("not protected")
        assert row["hit_fraction/blur-fill"] <= 0.05 and row["hit_fraction/toy-control"] >= 0
        assert json.loads(row["editor_weights"]) == [1.0, 1.0]
        # the same bytes as protecting the image alone against the same editors
        alone = tmp_path / f"{name}.png"
        argv = ("protect", src / f"{name}_example.png", "--mask", src / f"{name}_example_mask.png")
        code, stdout, _ = run(capsys, *argv, "--editor", PAIR, "--out", alone, "--steps", "2", "--quiet")  # fmt: skip
        assert code == 0 and (out / f"{name}_example.png").read_bytes() == alone.read_bytes()
        single = json.loads(stdout)
        assert single["per_editor"]["toy-control"]["verdict"] == row["verdict/toy-control"]
    assert [line["verdict/blur-fill"] for line in lines[:-1]] == ["not protected"] * 2
    assert summary["verdicts"] == manifest["verdict"].value_counts().to_dict()
    assert sum(summary["verdicts"].values()) == 2
    assert summary["verdicts_per_editor"]["blur-fill"] == {"not protected": 2}
    tags = {manifest.loc[names[0], "settings"]}
    # the same editors: resumed; other editors, order or weights: redone
    again = protect()
    assert len(again) == 1 and again[0]["computed"] == 0 and again[0]["resumed"] == 2
    assert again[0]["verdicts_per_editor"] == summary["verdicts_per_editor"]
    assert protect("--editor-weights", "1,1")[-1]["resumed"] == 2  # the default, spelt out
    for extra, editor in (
        ((), "blur-fill,toy-control"),
        (("--editor-weights", "1,2"), "blur-fill,toy-control"),
        ((), "toy-control"),
    ):
        assert protect(*extra, editor=editor)[-1]["computed"] == 2, (extra, editor)
        tags.add(pd.read_csv(out / "manifest.csv").set_index("name").loc[names[0], "settings"])
    assert len(tags) == 4


def test_folder_check_estimates_each_editor(tmp_path, capsys):
    import pandas as pd

    src = tmp_path / "photos"
    make_folder(src, n=2)
    argv = ("check", src, "--editor", PAIR, "--out", tmp_path / "check", "--quiet")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    checked = pd.read_csv(tmp_path / "check" / "manifest.csv")
    assert len(checked) == 2 and (checked["gain/blur-fill"] <= 1 + 1e-6).all()
    assert checked["verdict/blur-fill"].str.startswith("unlikely").all()
    assert (checked["gain/toy-control"] > checked["gain/blur-fill"]).all()


def test_the_batch_runner_names_pairs_as_the_data_module_does_without_importing_torch():
    import subprocess
    import sys

    from runtime_backdoor import batch, data

    assert (batch.IMAGE_SUFFIX, batch.MASK_SUFFIX) == (data.IMAGE_SUFFIX, data.MASK_SUFFIX)
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, runtime_backdoor.cli; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert loaded.stdout.strip() == "False"  # the command line answers --help and refusals fast
