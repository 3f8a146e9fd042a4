"""The MAT editor: exact to the official generator (fixture), seeded dropout, resizing, safe loading.

Real MAT forwards cost tens of seconds on one CPU thread, so the editor's plumbing is
tested with a stand-in generator that has MAT's call signature and dropout; the real
generator runs in the few tests marked ``slow``.
"""

import json
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime_backdoor.editors import build_editor
from runtime_backdoor.editors import mat as mat_module
from runtime_backdoor.editors.mat import (
    MatEditor,
    MissingExtraError,
    build_generator,
    convert_mat_weights,
    init_weights_,
    load_mat,
    read_mat_weights,
)

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "mat_generator.json").read_text())
NOISE_KEYS = [k for k in FIXTURE["state_dict"] if k.endswith((".noise_strength", ".noise_const"))]


def reference_input():
    """Same input as tests/fixtures/derive_mat_generator.py: ``(image in [-1, 1], known)``."""
    coarse = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    image = F.interpolate(coarse, (512, 512), mode="bicubic") * 2 - 1
    known = torch.ones(1, 1, 512, 512)
    known[..., 160:352, 128:320] = 0
    return image.clamp(-1, 1), known


# ---------------------------------------------------------------- a stand-in for the plumbing


class StandInGenerator(nn.Module):
    """MAT's interface (mapping, synthesis, img_resolution) with MAT-like dropout, 32 px."""

    img_resolution = 32

    def __init__(self):
        super().__init__()
        self.mapping = nn.Linear(512, 512)
        self.synthesis = StandInSynthesis()


class StandInSynthesis(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images_in, masks_in, ws, noise_mode="random"):
        self.calls.append((images_in.detach().clone(), masks_in.clone(), noise_mode))
        keep = F.dropout(torch.ones_like(images_in) * 0.5, training=True)  # as networks/mat.py
        fill = torch.tanh(images_in.mean(dim=(2, 3), keepdim=True) + keep + ws[:, :3, None, None])
        return fill * (1 - masks_in) + images_in * masks_in


class StandInMapping(nn.Module):
    def forward(self, z, c, **kwargs):
        return z.to(torch.float32)  # as the official mapping: float32 whatever the module's dtype


@pytest.fixture
def stand_in():
    generator = StandInGenerator()
    generator.mapping = StandInMapping()
    return generator


def test_official_mode_draws_anew_reproducibly_and_leaves_the_global_rng(stand_in):
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    editor = MatEditor(stand_in, dropout="official", dropout_seed=3)
    state = torch.get_rng_state()
    first, second = editor(image, mask), editor(image, mask)
    assert torch.equal(torch.get_rng_state(), state)
    assert (first - second).abs().max() > 0.01  # a new dropout draw per forward
    again = MatEditor(stand_in, dropout="official", dropout_seed=3)
    assert torch.equal(again(image, mask), first) and torch.equal(again(image, mask), second)
    other = MatEditor(stand_in, dropout="official", dropout_seed=4)
    assert not torch.equal(other(image, mask), first)


def test_fixed_mode_repeats_its_draw(stand_in):
    image, mask = torch.rand(2, 3, 32, 32), torch.ones(2, 1, 32, 32)
    editor = MatEditor(stand_in, dropout="fixed", dropout_seed=5)
    assert torch.equal(editor(image, mask), editor(image, mask))
    assert editor.next_dropout_seed() == 5 and editor.draws == 0
    with pytest.raises(ValueError, match="dropout"):
        MatEditor(stand_in, dropout="eot")


def test_official_call_semantics_at_native_size(stand_in):
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 4:12, 6:30] = 1
    editor = MatEditor(stand_in, dropout="fixed")
    out = editor(image, mask)
    img_in, known, noise_mode = stand_in.synthesis.calls[-1]
    torch.testing.assert_close(img_in, image * 2 - 1, rtol=0, atol=0)  # [0, 1] -> [-1, 1]
    assert torch.equal(known, 1 - mask) and noise_mode == "const"  # MAT: 1 = known
    torch.testing.assert_close(out * (1 - mask), image * (1 - mask), rtol=0, atol=0)
    raw = editor.generate(image * 2 - 1, 1 - mask, 0)
    expected = mask * ((raw + 1) / 2).clamp(0, 1) + (1 - mask) * image
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    torch.manual_seed(240)  # the official attack scripts' z
    assert torch.equal(editor.z, torch.randn(1, 512))


def test_other_sizes_are_resized_there_and_back_differentiably(stand_in):
    image = torch.rand(1, 3, 20, 26, requires_grad=True)
    mask = torch.zeros(1, 1, 20, 26)
    mask[..., 5:9, 3:7] = 1
    editor = MatEditor(stand_in, dropout="fixed")
    out = editor(image, mask)
    assert out.shape == image.shape
    torch.testing.assert_close(out * (1 - mask), image.detach() * (1 - mask), rtol=0, atol=0)
    img_in, known, _ = stand_in.synthesis.calls[-1]
    assert img_in.shape[-2:] == (32, 32) and set(known.unique().tolist()) == {0.0, 1.0}
    # every hole pixel of the original lies in the resized hole (area resize, any coverage)
    back = F.interpolate(1 - known, (20, 26), mode="area")
    assert (back[mask > 0] > 0).all()
    (out * mask).sum().backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_generate_refuses_other_sizes(stand_in):
    with pytest.raises(ValueError, match="32 px"):
        MatEditor(stand_in).generate(torch.zeros(1, 3, 16, 16), torch.ones(1, 1, 16, 16), 0)


# ---------------------------------------------------------------- the real generator: structure


@pytest.fixture(scope="module")
def generator():
    return init_weights_(build_generator(), seed=0)


def test_state_dict_equals_official_fixture(generator):
    ours = {k: [list(v.shape), str(v.dtype)[6:]] for k, v in generator.state_dict().items()}
    assert len(ours) == 487 and ours == FIXTURE["state_dict"]
    official = {
        k: torch.zeros(shape, dtype=getattr(torch, dtype))
        for k, (shape, dtype) in FIXTURE["state_dict"].items()
    }
    result = build_generator().load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(NOISE_KEYS) == 22


def test_spandrel_defects_are_corrected_at_build_time(generator):
    arch = mat_module._spandrel_mat_module()
    shipped = arch.Generator(512, 0, 512, 512, 3)  # as spandrel-extra-arches builds it
    shipped_keys = set(shipped.state_dict())
    assert set(FIXTURE["state_dict"]) - shipped_keys == set(NOISE_KEYS)  # no decoder noise
    channels_last = [n for n, p in shipped.named_parameters() if not p.is_contiguous()]
    assert len(channels_last) == 13 and all(".first_stage." in n for n in channels_last)
    assert all(p.is_contiguous() for p in generator.parameters())
    noise_free = build_generator(decoder_noise=False).state_dict()
    assert set(FIXTURE["state_dict"]) - set(noise_free) == set(NOISE_KEYS)


def test_init_weights_depends_only_on_names_and_seed(generator):
    state = generator.state_dict()
    noise = [state[k].item() for k in NOISE_KEYS if k.endswith("noise_strength")]
    assert all(0.05 < v < 0.15 for v in noise)  # non-zero: the noise term matters
    other = init_weights_(build_generator(), seed=0).state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)


# ---------------------------------------------------------------- weight files


@pytest.fixture(scope="module")
def files(generator, tmp_path_factory):
    """Random-weight files of each format, and the state they hold."""
    d = tmp_path_factory.mktemp("mat")
    state = generator.state_dict()
    torch.save(state, d / "G.pth")
    torch.save(
        {k: v for k, v in state.items() if k not in NOISE_KEYS}, d / "G_no_noise.pth"
    )  # IOPaint's layout
    torch.save(state, d / "G_legacy.pth", _use_new_zipfile_serialization=False)
    convert_mat_weights(d / "G.pth", d / "G.safetensors")
    sentinel = d / "embedded_code_ran"
    write_stylegan_pickle(generator, d / "Places_512_FullData.pkl", sentinel)
    return d, state, sentinel


def write_stylegan_pickle(generator, path, sentinel):
    """A pickle laid out like the official snapshots: persistence-wrapped modules with source.

    The embedded "module source" writes ``sentinel``: a normal ``pickle.load`` runs it.
    Modules of torch itself are pickled as plain objects, as in the official files.
    """
    package, persistence = (
        types.ModuleType("torch_utils"),
        types.ModuleType("torch_utils.persistence"),
    )

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})  # what torch_utils.persistence does with the source
        return meta["state"]

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = persistence
    source = f"open({str(sentinel)!r}, 'w').write('ran')"

    class Persistent:
        def __init__(self, module):
            self.module = module

        def __reduce__(self):
            state = dict(vars(self.module))
            state["_modules"] = OrderedDict(
                (k, v if type(v).__module__.startswith("torch.") else Persistent(v))
                for k, v in state["_modules"].items()
            )
            meta = {"type": "class", "version": 6, "module_src": source,
                    "class_name": type(self.module).__name__, "state": state}  # fmt: skip
            return _reconstruct_persistent_obj, (meta,)

    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": package, "torch_utils.persistence": persistence})
    try:
        snapshot = {"G": Persistent(generator), "D": None, "G_ema": Persistent(generator),
                    "augment_pipe": None, "training_set_kwargs": {"resolution": 512}}  # fmt: skip
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)
        return _reconstruct_persistent_obj
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.mark.parametrize(
    "name", ["G.pth", "G_legacy.pth", "G.safetensors", "Places_512_FullData.pkl"]
)
def test_every_format_reads_the_same_weights(files, name):
    d, state, sentinel = files
    read, source = read_mat_weights(d / name)
    assert list(read) == list(state) and all(torch.equal(read[k], state[k]) for k in state)
    assert (
        source
        == {"pth": "state-dict", "safetensors": "safetensors", "pkl": "stylegan-pickle"}[
            name.rsplit(".", 1)[1]
        ]
    )
    assert not sentinel.exists()  # the pickle's embedded code never ran


def test_a_normal_unpickle_would_run_the_embedded_code(files, generator, tmp_path):
    sentinel = tmp_path / "ran"
    reconstruct = write_stylegan_pickle(generator.mapping, tmp_path / "small.pkl", sentinel)
    module = types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = reconstruct
    sys.modules.update(
        {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": module}
    )
    try:
        with open(tmp_path / "small.pkl", "rb") as f:
            pickle.load(f)
    finally:
        sys.modules.pop("torch_utils.persistence")
        sys.modules.pop("torch_utils")
    assert sentinel.exists()  # this is what read_mat_weights avoids


def test_noise_free_state_dict_builds_a_noise_free_decoder(files):
    d, state, _ = files
    read, _ = read_mat_weights(d / "G_no_noise.pth")
    assert len(read) == 487 - 22
    editor = load_mat(d / "G_no_noise.pth", dropout="fixed")
    assert not editor.decoder_noise and editor.record["decoder_noise"] is False
    assert editor.record["weights_format"] == "state-dict"
    full = load_mat(d / "G.pth")
    assert full.decoder_noise and full.record["dropout"] == "official"
    assert all(torch.equal(v, state[k]) for k, v in full.generator.state_dict().items())


def test_other_mismatches_are_refused_in_one_line(files, tmp_path):
    d, state, _ = files
    cases = {
        "some_noise.pth": {k: v for k, v in state.items() if k not in NOISE_KEYS[:21]},
        "no_mapping.pth": {k: v for k, v in state.items() if k != "mapping.fc0.weight"},
        "extra.pth": {**state, "synthesis.extra": torch.zeros(1)},
        "shape.pth": {**state, "mapping.fc0.bias": torch.zeros(3)},
        "lama.pth": {"model.1.ffc.convl2l.weight": torch.zeros(1)},
    }
    for name, content in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError) as err:
            read_mat_weights(tmp_path / name)
        message = str(err.value)
        assert name in message and "\n" not in message, message
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    sentinel = tmp_path / "system_ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    (tmp_path / "exploit.pkl").write_bytes(pickle.dumps({"G_ema": Exploit()}))
    for name in ("corrupt.pth", "list.pkl", "list.pth", "exploit.pkl"):
        with pytest.raises(ValueError, match=name) as err:
            read_mat_weights(tmp_path / name)
        assert "\n" not in str(err.value)
    assert not sentinel.exists()
    with pytest.raises(FileNotFoundError, match="Places_512_FullData_G.pth"):
        read_mat_weights(tmp_path / "missing.pth")


def test_registry_builds_mat_and_asks_for_weights(files):
    d, _, _ = files
    editor = build_editor("mat", weights=d / "G.safetensors", dropout="fixed")
    assert isinstance(editor, MatEditor) and not any(p.requires_grad for p in editor.parameters())
    with pytest.raises(ValueError, match="needs its weights"):
        build_editor("mat")


def test_missing_extra_gives_the_install_command(monkeypatch, files, capsys):
    real = mat_module.importlib.import_module

    def without_spandrel(name, *args):
        if name.startswith("spandrel"):
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}", name="spandrel")
        return real(name, *args)

    monkeypatch.setattr(mat_module.importlib, "import_module", without_spandrel)
    monkeypatch.setattr(mat_module, "_EXPECTED", {})
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[mat\]'"):
        build_editor("mat", weights=files[0] / "G.pth")
    from PIL import Image

    from runtime_backdoor.cli import main

    d = files[0]
    Image.new("RGB", (16, 16)).save(d / "photo.png")
    Image.new("L", (16, 16), 255).save(d / "mask.png")
    code = main(["check", str(d / "photo.png"), "--mask", str(d / "mask.png"), "--editor", "mat",
                 "--weights", str(d / "G.pth")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1


def test_editors_command_lists_mat_as_available(capsys):
    from runtime_backdoor.cli import main

    assert main(["editors"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("mat "))
    assert "not implemented" not in line and "512" in line


# ---------------------------------------------------------------- the real generator: numbers


@pytest.mark.slow
def test_output_equals_official_generator_and_gradients_are_finite(generator):
    """One 512 px forward and backward (about 30 s on one CPU thread)."""
    editor = MatEditor(generator, dropout="fixed", dropout_seed=FIXTURE["dropout_seed"])
    image, known = reference_input()
    image.requires_grad_(True)
    y = editor.generate(image, known, FIXTURE["dropout_seed"])
    expected = FIXTURE["output"]
    hole = y[..., 160:352, 128:320]
    # float32 through ~60 layers: BLAS paths differ in the last bits; outputs are O(10-30)
    torch.testing.assert_close(
        y[0, :, 250:254, 220:224].flatten(), torch.tensor(expected["slice"]), rtol=1e-4, atol=2e-3
    )
    for value, key in ((y.mean(), "mean"), (y.std(), "std"), (hole.mean(), "hole_mean"),
                       (hole.std(), "hole_std")):  # fmt: skip
        assert value.item() == pytest.approx(expected[key], rel=1e-4, abs=1e-4), key
    hole.sum().backward()
    grad = image.grad
    assert torch.isfinite(grad).all()
    assert grad[..., :160, :].abs().sum() > 0  # the fill depends on the known pixels


@pytest.mark.slow
def test_gradient_matches_float64_finite_differences():
    """Autograd vs central differences through MAT's code, float64, dropout draw fixed.

    Runs the same design at 256 px (the CelebA-HQ-256 configuration): 4x cheaper than 512
    and the same modules; the 512 px generator is checked against the fixture above.
    """
    generator = init_weights_(build_generator(resolution=256), seed=0)
    editor = MatEditor(generator, dropout="fixed", dropout_seed=1).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    image = (torch.rand((1, 3, 256, 256), generator=g, dtype=torch.float64) * 2 - 1) * 0.5
    known = torch.ones(1, 1, 256, 256, dtype=torch.float64)
    known[..., 96:160, 96:160] = 0
    weights = torch.randn((1, 3, 64, 64), generator=g, dtype=torch.float64)

    def loss(x):
        return (editor.generate(x, known, 1)[..., 96:160, 96:160] * weights).sum()

    x = image.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(x), x)
    assert torch.isfinite(grad).all()
    direction = torch.zeros_like(image)  # a small patch of known pixels at the hole's edge
    direction[..., 88:96, 100:108] = torch.randn((1, 3, 8, 8), generator=g, dtype=torch.float64)
    # MAT's leaky ReLUs are piecewise linear: kinks crossed within ±h bias central differences
    # by O(h) (measured relative error 3e-4 at h = 1e-5, 7e-5 at 1e-6, 1.4e-6 at 1e-7);
    # float64 rounding at h = 1e-7 is ~1e-16 * |loss ~ 2e3| / h ~ 2e-6 absolute
    h = 1e-7
    with torch.no_grad():
        numeric = (loss(image + h * direction) - loss(image - h * direction)) / (2 * h)
    analytic = (grad * direction).sum()
    assert analytic.abs() > 1e-3  # the patch matters
    assert analytic.item() == pytest.approx(numeric.item(), rel=2e-5)


@pytest.mark.slow
def test_cli_check_and_protect_on_every_format(tmp_path, capsys):
    """The command on random-weight files of each format (256 px layout: 4x cheaper than 512)."""
    from PIL import Image

    from runtime_backdoor.cli import main

    generator = init_weights_(build_generator(resolution=256), seed=0)
    state = generator.state_dict()
    torch.save({k: v for k, v in state.items() if k not in _noise_keys(state)}, tmp_path / "G.pth")
    torch.save(state, tmp_path / "G_full.pth")
    convert_mat_weights(tmp_path / "G_full.pth", tmp_path / "G.safetensors")
    write_stylegan_pickle(generator, tmp_path / "G.pkl", tmp_path / "ran")
    rgb = (torch.rand(24, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte()
    Image.fromarray(rgb.numpy()).save(tmp_path / "photo.png")
    mask = torch.zeros(24, 32, dtype=torch.uint8)
    mask[6:18, 8:20] = 255
    Image.fromarray(mask.numpy()).save(tmp_path / "mask.png")
    common = ["--mask", tmp_path / "mask.png", "--editor", "mat", "--eps", "0.05"]
    for name in ("G.pth", "G.safetensors", "G.pkl"):
        code = main([str(a) for a in ("check", tmp_path / "photo.png", *common, "--weights",
                                      tmp_path / name)])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        report = json.loads(out)
        assert report["editor"] == "mat" and report["gain"] >= 0 and report["needed"] > 0
    out_png = tmp_path / "protected.png"
    code = main([str(a) for a in ("protect", tmp_path / "photo.png", *common, "--weights",
                                  tmp_path / "G.pkl", "--steps", 1, "--quiet", "--out", out_png)])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    protected = torch.from_numpy(np.array(Image.open(out_png))).int()
    assert (protected - rgb.int()).abs().max() <= 13  # ceil(0.05 * 255)
    assert not (tmp_path / "ran").exists()


def _noise_keys(state):
    return [k for k in state if k.endswith((".noise_strength", ".noise_const"))]


# ---------------------------------------------------------------- benchmark rows


def test_benchmark_rows_count_mat_and_reach_the_gpu_script():
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "benchmark_protection.py"
    spec = importlib.util.spec_from_file_location("benchmark_protection", script)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(bench)
        flops = bench.count_flops(bench.CASES["mat-512"])
        # one 512 px forward is ~0.57 TFLOP; a 3-image forward+backward about 3 x 3.9 forwards
        assert 4e11 < flops.clean_flops < 8e11
        assert 9 < flops.pass_flops / flops.clean_flops < 13
        budget = bench.Budget(repeats=1, max_seconds=1.0)
        row = bench.run_case(bench.CASES["mat-512"], torch.device("cpu"), {"fp32": 1e11}, budget)
        assert row.status == "skipped: needs a GPU" and row.seconds_at_peak > 100
    finally:
        sys.modules.pop(spec.name, None)
    gpu_script = (script.parent / "gpu_check.sh").read_text()
    for name in ("mat-512", "mat-512-bf16", "mat-512-separate"):
        assert f" {name} " in gpu_script and "gpu" in bench.CASES[name].groups


# ---------------------------------------------------------------- the pipeline, end to end


@pytest.mark.slow
def test_dvc_exp_run_with_mat_on_a_tiny_setting(tmp_path):
    """`dvc exp run -S editor.name=mat -S editor.weights=...` in a copy of the project.

    The weight file is a random-weight MAT at 256 px (the CelebA-HQ-256 layout, read by the
    same loader): the 64 px images are resized to 256 inside the editor, 4x cheaper than 512.
    """
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[2]
    committed = {p: p.read_bytes() for p in (root / "reports").glob("*.json")}
    project = tmp_path / "project"
    from runtime_backdoor.runs import copy_project

    copy_project(root, project, ("dvc.yaml", "params.yaml", "data.dvc", ".dvc/config", ".dvcignore",
                                 ".gitignore", "data/.gitignore", "notebooks", "src", "dvc-store"))  # fmt: skip
    weights = tmp_path / "mat-256-random.safetensors"
    state = init_weights_(build_generator(resolution=256), seed=0).state_dict()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    tiny = {
        "device": "cpu",
        "prepare.size": 64,
        "prepare.limit": 1,
        "implant.steps": 1,
        "implant.batch_size": 1,
        "evaluate.clip_weights": "",
        "figures.rows_per_grid": 1,
        "eps_sweep.eps_8bit": "32",
        "eps_sweep.editors": "pipeline",
        "beyond.editors": "pipeline",
        "beyond.transfer_editors": "control-s1:global-mix(gain:800,reach:8,seed:1)",
        "beyond.methods": "backdoor",
        "beyond.subset": 1,
        "beyond.transforms": "none",
        "beyond.robust_scenarios": "mask",
    }
    p = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in tiny.items():
        section, _, name = key.rpartition(".")
        (p[section] if section else p)[name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # fmt: skip

    def run(*args):
        r = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        return r.stdout

    run("git", "init", "-q")
    run(str(bin_dir / "dvc"), "pull", "-q", "data.dvc")
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    sets = ["-S", "editor.name=mat", "-S", f"editor.weights={weights}"]
    run(str(bin_dir / "dvc"), "exp", "run", *sets)
    record = json.loads((project / "models/editor/editor.json").read_text())
    assert record["name"] == "mat" and record["weights"] == str(weights)
    settings = json.loads((project / "models/editor/summary.json").read_text())["settings"]
    assert settings["decoder_noise"] is True and settings["resolution"] == 256
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["n_images"] == 1
    assert {p: p.read_bytes() for p in (root / "reports").glob("*.json")} == committed
