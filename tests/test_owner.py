"""The owner's functions the command and the demo share: the verdict, its figure, the limits."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from runtime_backdoor import owner

ROOT = Path(__file__).resolve().parents[1]
NOT_SIDE = "not protected, with a side effect on benign edits"


def numbers(hit=1.0, hit_clean=0.0, ring_psnr=40.0, ring_hit=0.0, ring_hit_clean=0.0) -> dict:
    return {
        "hit_fraction": hit,
        "hit_fraction_original": hit_clean,
        "ring_psnr_vs_original_edit": ring_psnr,
        "ring_hit_fraction": ring_hit,
        "ring_hit_fraction_original": ring_hit_clean,
    }


def test_the_hit_is_the_pipelines():
    evaluate = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]
    assert owner.HIT_TOL == evaluate["hit_tol"] == 0.1
    assert owner.HIT_MIN_FRACTION == evaluate["hit_min_fraction"] == 0.5
    assert owner.SIDE_EFFECT_PSNR_DB == 30


@pytest.mark.parametrize(
    "given, verdict",
    [
        ({}, "protected"),
        ({"hit": 0.5}, "protected"),  # exactly half the region: a hit
        ({"hit": 0.4999}, "not protected"),
        ({"hit_clean": 0.6}, "not protected"),  # the original's edit hits too
        ({"ring_psnr": 29.99}, "protected, with a side effect on benign edits"),
        ({"ring_psnr": 30.0}, "protected"),
        ({"ring_psnr": math.inf}, "protected"),  # identical ring edits
        ({"ring_hit": 0.5}, "protected, with a side effect on benign edits"),
        ({"ring_hit": 0.5, "ring_hit_clean": 0.5}, "protected"),  # it hit on the original too
        ({"hit": 0.0, "ring_psnr": 5.0, "ring_hit": 1.0}, NOT_SIDE),
        # not protected, and benign edits disturbed all the same: the same side-effect test
        ({"hit": 0.0, "ring_psnr": 29.99}, NOT_SIDE),
        ({"hit": 0.0, "ring_psnr": 30.0}, "not protected"),
        ({"hit": 0.4999, "ring_hit": 0.5}, NOT_SIDE),
        ({"hit": 0.0, "ring_hit": 0.5, "ring_hit_clean": 0.5}, "not protected"),
        ({"hit_clean": 0.6, "ring_psnr": 12.0}, NOT_SIDE),  # hits on the original, ring apart
    ],
)
def test_the_verdict_rule(given, verdict):
    keys = {"hit", "hit_clean", "ring_psnr", "ring_hit", "ring_hit_clean"}
    assert set(given) <= keys
    got, detail = owner.verdict_of(numbers(**given))
    assert got == verdict and got in owner.VERDICTS
    assert "a hit needs 50% within 0.1" in detail and "below 30 dB" in detail


def test_the_benign_edit_is_said_apart_from_the_threshold():
    """The PSNR is the benign edit's closeness to the original's; the threshold is said as
    such, so that 37.3 dB does not read as the size of a side effect."""
    _, detail = owner.verdict_of(numbers(ring_psnr=37.34))
    assert (
        "; the benign edit of the ring is 37.3 dB PSNR from the original's ring edit (no side "
        "effect: a side effect is below 30 dB) and puts 0% of the ring on the target colour "
        "(the original's: 0%)" in detail
    )
    verdict, detail = owner.verdict_of(numbers(ring_psnr=25.04))
    assert verdict == owner.SIDE_EFFECT
    assert "is 25.0 dB PSNR from the original's ring edit (a side effect: below 30 dB)" in detail
    verdict, detail = owner.verdict_of(numbers(hit=0.1, ring_psnr=25.04))
    assert verdict == owner.NOT_PROTECTED_SIDE_EFFECT == NOT_SIDE
    assert "(a side effect: below 30 dB)" in detail
    verdict, detail = owner.verdict_of(numbers(ring_hit=0.6))
    assert verdict == owner.SIDE_EFFECT and "no side effect: a side effect is below 30 dB" in detail
    assert "puts 60% of the ring on the target colour (the original's: 0%; a side effect: the original's does not hit)" in detail  # fmt: skip
    _, detail = owner.verdict_of(numbers(ring_psnr=math.inf))
    assert "the benign edit of the ring is identical to the original's ring edit (no side" in detail  # fmt: skip


def test_the_threshold_in_the_words_is_the_constant(monkeypatch):
    monkeypatch.setattr(owner, "SIDE_EFFECT_PSNR_DB", 40.0)
    verdict, detail = owner.verdict_of(numbers(ring_psnr=37.34))
    assert verdict == owner.SIDE_EFFECT
    assert "37.3 dB PSNR from the original's ring edit (a side effect: below 40 dB)" in detail
    assert owner.verdict_of(numbers(hit=0.0, ring_psnr=37.34))[0] == NOT_SIDE
    verdict, detail = owner.verdict_of(numbers(ring_psnr=41.0))
    assert verdict == owner.PROTECTED and "(no side effect: a side effect is below 40 dB)" in detail


def test_the_verdicts_and_rules_name_the_new_verdict():
    assert owner.VERDICTS == (
        "protected",
        "protected, with a side effect on benign edits",
        "not protected",
        NOT_SIDE,
    )
    assert f"'{NOT_SIDE}' when it does not protect but benign edits are disturbed" in owner.VERDICT_RULE  # fmt: skip
    assert f"'{NOT_SIDE}' when not protected against at least one with a side effect" in owner.ENSEMBLE_RULE  # fmt: skip


@pytest.mark.parametrize(
    "verdicts, expected, held",
    [
        (("protected", "protected"), "protected", 2),
        (("protected", owner.SIDE_EFFECT), owner.SIDE_EFFECT, 2),
        (("protected", "not protected"), "not protected", 1),
        ((owner.SIDE_EFFECT, "not protected"), NOT_SIDE, 1),  # protected by one, disturbed
        (("protected", NOT_SIDE), NOT_SIDE, 1),
        (("not protected", "not protected"), "not protected", 0),
    ],
)
def test_an_ensembles_verdict(verdicts, expected, held):
    got, detail = owner.ensemble_verdict(dict(zip(("a", "b"), verdicts, strict=True)))
    assert got == expected
    assert detail.startswith(f"protected against {held} of 2 editors (a: {verdicts[0]}; b: ")
    assert ("with a side effect when any editor's benign edits are disturbed" in detail) == (
        "side effect" in expected
    )


def test_the_verdict_says_why():
    _, detail = owner.verdict_of(numbers(hit=0.97, hit_clean=0.0, ring_psnr=41.24))
    assert detail.startswith("the malicious edit puts 97% of the region on the target colour")
    assert "(the original's: 0%;" in detail
    assert "the benign edit of the ring is 41.2 dB PSNR from the original's ring edit" in detail
    _, detail = owner.verdict_of(numbers(hit_clean=1.0))
    assert detail.startswith("the editor fills the region with the target colour on the original")
    got, detail = owner.verdict_of(numbers() | {"ring_psnr_vs_original_edit": None})
    assert got == "protected" and "no ring to edit" in detail


class Constant(torch.nn.Module):
    """Fills the hole with one colour whatever the input (a hit when it is the target)."""

    def __init__(self, colour):
        super().__init__()
        self.colour = torch.tensor(colour).view(1, 3, 1, 1)

    def forward(self, image, mask):
        return image * (1 - mask) + self.colour * mask


def _inputs(h=40, w=48):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, h, w, generator=gen) * 0.6 + 0.2
    m = torch.zeros(1, 1, h, w)
    m[..., 10:25, 12:30] = 1
    return x, m


def test_compare_edits_measures_both_edits_against_the_target():
    x, m = _inputs()
    target = owner.eight_bit(__import__("runtime_backdoor.targets").targets.make_target(x))
    colour = tuple(float(v) for v in target[0, 0])
    n, edits = owner.compare_edits(Constant(colour), x, x, m, "solid", torch.device("cpu"))
    # the editor always fills the target colour: a hit on the original too, so not protected
    assert n["hit_fraction"] == n["hit_fraction_original"] == 1.0
    assert n["verdict"] == "not protected" and n["expand"] == 3
    assert n["ring_psnr_vs_original_edit"] == math.inf and n["ring_hit_fraction"] == 1.0
    assert set(edits) >= {"malicious_original", "benign_protected", "target"}
    n, _ = owner.compare_edits(Constant((0.5, 0.5, 0.5)), x, x, m, "solid", torch.device("cpu"))
    assert n["hit_fraction"] == 0 and n["verdict"] == "not protected"
    n, edits = owner.compare_edits(Constant((0.5, 0.5, 0.5)), x, x, m, "solid", "cpu", expand=1)
    assert n["ring_psnr_vs_original_edit"] is None and "benign_original" not in edits


def test_the_figure_enlarges_small_and_shrinks_large_images():
    x, m = _inputs()
    n, edits = owner.compare_edits(Constant((0.5, 0.5, 0.5)), x, x, m, "solid", "cpu")
    figure, boxes = owner.compare_figure(edits, n, owner.colour_name(edits["target"]))
    assert figure.dtype == np.uint8 and boxes["malicious_original"][2:] == (160, 192)
    assert set(boxes) == {f"{e}_{p}" for e in ("malicious", "benign") for p in ("original", "protected", "difference")} | {"target"}  # fmt: skip
    big = {k: np.repeat(np.repeat(v, 30, 0), 30, 1) for k, v in edits.items()}  # 1200 x 1440
    figure, boxes = owner.compare_figure(big, n, None)  # not a solid colour name: the image
    assert boxes["malicious_original"][2:] == (853, 1024) and boxes["target"][2:] == (853, 1024)
    n, edits = owner.compare_edits(Constant((0.5, 0.5, 0.5)), x, x, m, "solid", "cpu", expand=1)
    figure, boxes = owner.compare_figure(edits, n, None)  # no ring: said in place of the panels
    assert "benign_original" not in boxes and figure.shape[0] > 2 * 160


def test_colour_names():
    blue = np.zeros((4, 4, 3))
    blue[..., 2] = 1
    assert owner.colour_name(blue) == "blue (0, 0, 255)"
    assert owner.colour_name(np.random.default_rng(0).random((4, 4, 3))) is None


def test_the_pixel_limit_reads_only_the_header(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    path = tmp_path / "huge.png"
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 900 MP: beyond Pillow's own
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    assert owner.image_size(path) == (30000, 30000)
    with pytest.raises(owner.CliError, match=r"30000×30000 px \(900\.0 megapixels\): too large"):
        owner.check_pixels(path, "image")
    owner.check_pixels(path, "image", max_pixels=900_000_000)  # raised: accepted
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard is back in place
    assert owner.image_size(tmp_path / "missing.png") is None
    (tmp_path / "junk.png").write_bytes(b"junk")
    owner.check_pixels(tmp_path / "junk.png", "image")  # the reader says what is wrong


def test_check_reports_the_measured_reliability():
    x, m = _inputs()
    from runtime_backdoor.editors import build_editor

    report = owner.check_image(build_editor("blur-fill"), x, m, "solid", "cpu", eps=0.025)
    r = owner.CHECK_RELIABILITY
    assert report["verdict"].startswith("unlikely")
    assert report["measured"].startswith("measured: when check said unlikely, protection did not")
    assert f"{r['npv']} of {r['npv_cases']} cases" in report["measured"]
    assert "not measured on real editors" in report["measured"]


def test_the_printed_reliability_is_the_benchmarks():
    path = ROOT / "reports" / "check_reliability.json"
    s = json.loads(path.read_text())
    r = owner.CHECK_RELIABILITY
    assert r["cases"] == s["cases"] and r["images"] == s["images"]
    assert r["editors"] == s["editors"] and r["budgets_8bit"] == s["budgets_8bit"]
    assert (r["agreement"], r["ppv"], r["npv"]) == (
        s["agreement"]["text"],
        s["ppv"]["text"],
        s["npv"]["text"],
    )
    assert (r["ppv_cases"], r["npv_cases"]) == (s["ppv"]["cases"], s["npv"]["cases"])
    c = s["confusion"]
    assert sum(c.values()) == s["cases"] == len(s["rows"])
    assert c["likely_worked"] + c["likely_not"] == s["ppv"]["cases"]


def test_the_benchmark_runs_on_two_images(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_reliability", ROOT / "benchmarks" / "check_reliability.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if not (ROOT / "data" / "raw" / "manifest.csv").is_file():
        pytest.skip("data/raw is not there (`dvc pull data.dvc`)")
    argv = ["--images", "2", "--budgets", "16", "--no-miniature", "--out", str(tmp_path), "--quiet"]
    assert bench.main(argv) == 0
    s = json.loads((tmp_path / "check_reliability.json").read_text())
    assert s["cases"] == 2 * 5 and s["budgets_8bit"] == [16.0] and "mini-lama" not in s["editors"]
    for row in s["rows"]:
        assert row["predicted"] == (row["gain"] >= row["needed"])
        assert row["worked"] == (not row["verdict"].startswith("not protected"))
    assert (
        "| check said | worked | did not work |" in (tmp_path / "check_reliability.md").read_text()
    )
