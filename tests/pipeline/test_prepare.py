"""Stage ``prepare`` (runtime_backdoor.pipeline.prepare)."""

import json
import shutil

import pytest
from PIL import Image

from runtime_backdoor.data import read_image, read_mask
from runtime_backdoor.pipeline import prepare


def test_prepare_validates_and_writes_squares(raw, tmp_path):
    df = prepare.prepare(raw, tmp_path / "prepared", size=48, limit=2)
    assert len(df) == 2 and set(df["content"]) <= {"watermark", "logo", "face"}
    img = read_image(tmp_path / "prepared" / f"{df['name'][0]}.png")
    assert img.shape == (48, 48, 3)
    mask = read_mask(tmp_path / "prepared" / f"{df['name'][0]}_mask.png")
    assert 0 < mask.mean() < 1 and abs(mask.mean() - df["protected_fraction"][0]) < 1e-9
    assert (raw / f"{df['name'][0]}_example.png").is_file()  # originals untouched


def test_prepare_names_the_bad_file(raw, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(raw, bad)
    first = sorted(bad.glob("*_example_mask.png"))[0]
    Image.new("L", (10, 10)).save(first)
    with pytest.raises(ValueError, match=first.name):
        prepare.prepare(bad, tmp_path / "out", size=48)


def test_stage_records_its_summary(raw, tmp_path):
    result = prepare.run(raw, tmp_path / "prepared", size=32, limit=0)
    written = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert written == result["summary"] == {"n_images": 3, "size": 32}
