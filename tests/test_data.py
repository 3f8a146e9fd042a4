import hashlib
import os
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from runtime_backdoor import data, samples


def write_png16_rgb(path, arr):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, payload):
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def load(path):
    with Image.open(path) as im:
        return im.mode, im.size, np.asarray(im)


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, samples.make_sample(out, n_per_type=6, size=128, seed=0)


# --- the embedded sample ------------------------------------------------------------------------


def test_sample_layout_and_manifest(sample):
    out, df = sample
    assert list(df.columns) == list(data.MANIFEST_COLUMNS)
    assert df.content.value_counts().to_dict() == {"watermark": 6, "logo": 6, "face": 6}
    assert pd.read_csv(out / "manifest.csv").equals(df)
    pairs = data.list_pairs(out)
    assert sorted(n for n, _, _ in pairs) == sorted(df.name)
    for _, row in df.iterrows():
        img = load(out / f"{row['name']}_example.png")
        msk = load(out / f"{row['name']}_example_mask.png")
        assert img[:2] == ("RGB", (128, 128))
        assert msk[:2] == ("L", (128, 128))
        assert set(np.unique(msk[2]).tolist()) == {0, 255}
        assert int((msk[2] == 255).sum()) == row["protected_pixels"]
        assert row["source"].split("+")[0] in samples.SAMPLE_SOURCES
    assert not list(out.glob("*.tmp")), "temporary files left behind"


@pytest.mark.parametrize(
    "content, lo, hi", [("watermark", 0.01, 0.2), ("logo", 0.02, 0.2), ("face", 0.03, 0.5)]
)
def test_sample_coverage_is_realistic(sample, content, lo, hi):
    _, df = sample
    frac = df[df.content == content].protected_pixels / 128**2
    assert frac.between(lo, hi).all(), frac.tolist()


def test_sample_is_deterministic_and_seeded(sample, tmp_path):
    out, df = sample
    again = samples.make_sample(tmp_path / "a", n_per_type=6, size=128, seed=0)
    assert again.equals(df)
    for name in df.name:
        for suffix in ("_example.png", "_example_mask.png"):
            assert file_digest(out / f"{name}{suffix}") == file_digest(
                tmp_path / "a" / f"{name}{suffix}"
            )
    # Image k of a type does not depend on how many are made.
    few = samples.make_sample(tmp_path / "b", n_per_type=2, size=128, seed=0)
    for name in few.name:
        assert file_digest(out / f"{name}_example.png") == file_digest(
            tmp_path / "b" / f"{name}_example.png"
        )
    other = samples.make_sample(tmp_path / "c", n_per_type=2, size=128, seed=1)
    differ = [
        file_digest(out / f"{n}_example.png") != file_digest(tmp_path / "c" / f"{n}_example.png")
        for n in other.name
    ]
    assert all(differ)


@pytest.mark.parametrize("size", [256, 512])
def test_sample_other_sizes(tmp_path, size):
    df = samples.make_sample(tmp_path, n_per_type=6, size=size, seed=0)
    assert (df["size"] == size).all()
    frac = df.protected_pixels / size**2
    assert frac.between(0.01, 0.5).all(), frac.tolist()
    x, m = data.read_pair(tmp_path / "logo_00_example.png")
    assert x.shape == (size, size, 3) and m.shape == (size, size)


def test_sample_faces_are_ellipses_on_the_face(sample):
    """The astronaut face mask sits on skin: reddish, brighter than the dark suit collar."""
    out, df = sample
    row = df[(df.content == "face") & (df.source == "astronaut")].iloc[0]
    x, m = data.read_pair(out / f"{row['name']}_example.png")
    skin = x[m].mean(axis=0)
    assert skin[0] > skin[2] + 0.1 and skin.mean() > 0.4


@pytest.mark.parametrize(
    "kwargs", [dict(n_per_type=0), dict(size=32), dict(seed=-1), dict(n_per_type=1.5)]
)
def test_sample_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        samples.make_sample(tmp_path, **kwargs)


# --- training pool ------------------------------------------------------------------------------


def test_training_and_sample_sources_are_disjoint():
    assert not set(samples.SAMPLE_SOURCES) & set(samples.TRAINING_SOURCES)
    assert not set(samples.UNUSED_SOURCES) & (
        set(samples.SAMPLE_SOURCES) | set(samples.TRAINING_SOURCES)
    )

    def digest(name):
        return hashlib.sha256(samples.load_source(name).tobytes()).hexdigest()

    sample = {digest(n) for n in samples.SAMPLE_SOURCES}
    training = {digest(n) for n in samples.TRAINING_SOURCES}
    assert not sample & training
    # 'cat' is the same photo as 'chelsea', so it must stay off the training side.
    assert digest("cat") in sample


def test_training_images():
    imgs = samples.training_images(64, seed=0, n=30)
    assert len(imgs) == 30
    for x in imgs:
        assert x.shape == (64, 64, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
    again = samples.training_images(64, seed=0, n=30)
    assert all(np.array_equal(a, b) for a, b in zip(imgs, again, strict=True))
    other = samples.training_images(64, seed=1, n=30)
    assert not all(np.array_equal(a, b) for a, b in zip(imgs, other, strict=True))
    assert len({x.tobytes() for x in imgs}) == 30
    it = samples.iter_training_images(32, seed=0, n=None)
    assert next(it).shape == (32, 32, 3)


# --- reading images -----------------------------------------------------------------------------


def test_write_then_read_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    p = data.write_png(tmp_path / "x.png", u8.astype(np.float32) / 255)
    x = data.read_image(p)
    assert x.dtype == np.float32 and x.shape == (9, 11, 3)
    assert np.array_equal(np.round(x * 255).astype(np.uint8), u8)


def test_read_grey_bilevel_and_palette(tmp_path):
    g = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(g).save(tmp_path / "g.png")
    x = data.read_image(tmp_path / "g.png")
    assert np.allclose(x[..., 0], g / 255) and np.array_equal(x[..., 0], x[..., 2])
    Image.fromarray(g > 100).save(tmp_path / "b.png")
    assert np.array_equal(data.read_image(tmp_path / "b.png")[..., 1], (g > 100).astype(np.float32))
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    rgb[2:] = (0, 0, 255)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert np.allclose(data.read_image(tmp_path / "p.png"), rgb / 255)


def test_read_16bit(tmp_path):
    g16 = np.array([[0, 32768, 65535, 300]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    x = data.read_image(tmp_path / "g16.png")
    assert np.allclose(x[0, :, 0], g16[0] / 65535, atol=1e-7)
    rgb16 = np.array([[[65535, 0, 32768], [1000, 2000, 3000]]], dtype=np.uint16)
    write_png16_rgb(tmp_path / "rgb16.png", rgb16)
    with pytest.warns(UserWarning, match="8-bit precision"):
        y = data.read_image(tmp_path / "rgb16.png")
    assert np.allclose(y, rgb16 / 65535, atol=1 / 255 + 1e-6)


def test_read_rgba_drops_alpha_with_warning(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    x = data.read_image(tmp_path / "opaque.png")  # opaque: no warning (pytest -W error would fail)
    assert np.allclose(x[..., 0], 200 / 255)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    with pytest.warns(UserWarning, match=r"holes\.png: alpha channel dropped \(6\.2% "):
        x = data.read_image(tmp_path / "holes.png")
    assert np.allclose(x[0, 0], (200 / 255, 0, 0))  # stored colour, not composited


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.read_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"junk\.png: cannot read image"):
        data.read_image(tmp_path / "junk.png")
    with pytest.raises(ValueError, match=r"junk\.png: cannot read mask"):
        data.read_mask(tmp_path / "junk.png")
    Image.fromarray(np.zeros((3, 3), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"f\.tiff"):
        data.read_image(tmp_path / "f.tiff")


# --- reading masks ------------------------------------------------------------------------------


def save_grey(path, a):
    Image.fromarray(np.asarray(a, np.uint8)).save(path)
    return path


def test_read_mask_binary(tmp_path):
    a = np.zeros((6, 8), np.uint8)
    a[1:3, 2:5] = 255
    m = data.read_mask(save_grey(tmp_path / "m.png", a))
    assert m.dtype == bool and np.array_equal(m, a == 255)
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "m16.png")
    assert np.array_equal(data.read_mask(tmp_path / "m16.png"), m)
    Image.fromarray(np.dstack([a] * 3)).save(tmp_path / "rgb.png")
    assert np.array_equal(data.read_mask(tmp_path / "rgb.png"), m)


def test_read_mask_non_binary_is_thresholded_with_warning(tmp_path):
    a = np.zeros((4, 4), np.uint8)
    a[0, :] = 255
    a[1, :2] = 127
    a[1, 2:] = 128
    p = save_grey(tmp_path / "soft.png", a)
    with pytest.warns(UserWarning, match=r"soft\.png: mask is not binary \(25\.00% .*50%"):
        m = data.read_mask(p)
    assert m[0].all() and not m[1, :2].any() and m[1, 2:].all() and not m[2:].any()


@pytest.mark.parametrize("fill, match", [(0, "mask is empty"), (255, "covers the whole image")])
def test_read_mask_rejects_empty_and_full(tmp_path, fill, match):
    p = save_grey(tmp_path / "m.png", np.full((5, 5), fill))
    with pytest.raises(ValueError, match=match):
        data.read_mask(p)


def test_read_mask_rejects_colour_and_transparency(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    a[0, 0] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"c\.png: mask has colour"):
        data.read_mask(tmp_path / "c.png")
    la = np.zeros((4, 4, 2), np.uint8)
    la[0, 0] = (255, 255)
    Image.fromarray(la, mode="LA").save(tmp_path / "t.png")
    with pytest.raises(ValueError, match="transparent"):
        data.read_mask(tmp_path / "t.png")
    with pytest.raises(ValueError, match="threshold"):
        data.read_mask(tmp_path / "c.png", threshold=0)


def test_read_pair_checks_sizes(tmp_path):
    data.write_png(tmp_path / "a_example.png", np.zeros((10, 12, 3), np.float32))
    m = np.zeros((10, 10), bool)
    m[2:4, 2:4] = True
    data.write_png(tmp_path / "a_example_mask.png", m)
    with pytest.raises(ValueError, match=r"a_example_mask\.png is 10x10 .*a_example\.png is 12x10"):
        data.read_pair(tmp_path / "a_example.png")


def test_list_pairs_requires_masks(tmp_path):
    with pytest.raises(FileNotFoundError, match="no '"):
        data.list_pairs(tmp_path)
    data.write_png(tmp_path / "a_example.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="a_example_mask.png"):
        data.list_pairs(tmp_path)
    with pytest.raises(ValueError, match="_example.png"):
        data.mask_path_for(tmp_path / "a.png")


def test_scan_pairs_reports_every_incomplete_pair_in_one_line(tmp_path):
    px = np.zeros((4, 4, 3), np.float32)
    for name in ("a_example.png", "a_example_mask.png", "b_example.png", "c_example_mask.png"):
        data.write_png(tmp_path / name, px if "mask" not in name else px[..., 0])
    pairs, problems = data.scan_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["a"] and [p[0] for p in problems] == ["b", "c"]
    assert "no mask next to it" in problems[0][1] and "without its image" in problems[1][1]
    assert data.scan_pairs(tmp_path, orphans=False)[1] == problems[:1]
    with pytest.raises(FileNotFoundError, match="b_example_mask.png"):
        data.list_pairs(tmp_path)  # strict: the first image without its mask


# --- writing ------------------------------------------------------------------------------------


def test_write_png_refuses_to_overwrite(tmp_path):
    p = data.write_png(tmp_path / "orig.png", np.full((4, 4, 3), 0.5))
    before = file_digest(p)
    with pytest.raises(FileExistsError, match="orig.png"):
        data.write_png(p, np.zeros((4, 4, 3)))
    assert file_digest(p) == before
    data.write_png(p, np.zeros((4, 4, 3)), overwrite=True)
    assert file_digest(p) != before
    assert [f.name for f in tmp_path.iterdir()] == ["orig.png"]


def test_write_png_values_and_validation(tmp_path):
    x = np.array([[[0.0, 0.4, 1.0]]])
    data.write_png(tmp_path / "v.png", x)
    assert load(tmp_path / "v.png")[2].tolist() == [[[0, 102, 255]]]
    data.write_png(tmp_path / "b.png", np.eye(3, dtype=bool))
    assert load(tmp_path / "b.png")[2].max() == 255
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        data.write_png(tmp_path / "r.png", x + 0.5)
    with pytest.raises(ValueError, match="permute"):
        data.write_png(tmp_path / "chw.png", np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=".png"):
        data.write_png(tmp_path / "x.jpg", x)
    assert not (tmp_path / "r.png").exists()


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = data.write_png(tmp_path / "x.png", np.zeros((4, 4, 3)))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
