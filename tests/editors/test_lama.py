import json
import pickle
import sys
import types
import typing
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from runtime_backdoor.editors.lama import (
    PRESETS,
    FFCResNetGenerator,
    LamaEditor,
    convert_lama_weights,
    fold_batchnorm,
    init_weights_,
    load_lama,
    read_lama_weights,
)

FIXTURE = json.loads(
    (Path(__file__).parents[1] / "fixtures" / "big_lama_generator.json").read_text()
)


def reference_input() -> torch.Tensor:
    """Same input as tests/fixtures/derive_big_lama_generator.py (64x64, seeded image, box hole)."""
    image = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 20:44] = 1
    return torch.cat([image * (1 - mask), mask], dim=1)


def image_and_mask(h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((2, 3, h, w), generator=g)
    mask = torch.zeros(2, 1, h, w)
    mask[..., h // 4 : h // 2, w // 3 : 2 * w // 3] = 1
    return image, mask


@pytest.fixture(scope="module")
def mini():
    return load_lama(None, preset="mini", seed=3)


# ---------------------------------------------------------------- architecture vs official code


@pytest.mark.parametrize("preset", ["big-lama", "mini"])
def test_state_dict_equals_official_fixture(preset):
    with torch.device("meta"):  # names and shapes only: no memory for Big-LaMa's 51M weights
        generator = FFCResNetGenerator(PRESETS[preset])
    ours = {k: [list(v.shape), str(v.dtype)[6:]] for k, v in generator.state_dict().items()}
    assert ours == FIXTURE["presets"][preset]["state_dict"]
    official = {
        k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        for k, (shape, dtype) in FIXTURE["presets"][preset]["state_dict"].items()
    }
    generator.load_state_dict(official, strict=True, assign=True)


def test_big_lama_fixture_describes_big_lama():
    spec = FIXTURE["presets"]["big-lama"]["state_dict"]
    assert spec["model.1.ffc.convl2l.weight"][0] == [64, 4, 7, 7]  # RGB + mask in, ngf 64
    assert spec["model.22.conv2.ffc.convg2g.fu.conv_layer.weight"][0] == [384, 384, 1, 1]
    assert "model.23.weight" not in spec  # 18 resnet blocks (5..22), then the branch concat
    assert spec["model.34.weight"][0] == [3, 64, 7, 7]
    n_params = sum(torch.Size(s).numel() for k, (s, _) in spec.items() if "running" not in k)
    assert 50e6 < n_params < 52e6  # Big-LaMa: 51M


@pytest.mark.parametrize("preset", ["big-lama", "mini"])
def test_outputs_equal_official_generator(preset):
    """The official generator with the same seeded weights gave the fixture's values."""
    generator = init_weights_(FFCResNetGenerator(PRESETS[preset]).eval(), seed=0)
    with torch.no_grad():
        y = generator(reference_input())
    ref = FIXTURE["presets"][preset]["output"]
    got = y[0, :, 24:28, 28:32].flatten()
    torch.testing.assert_close(got, torch.tensor(ref["slice"]), atol=1e-5, rtol=0)
    assert y.mean().item() == pytest.approx(ref["mean"], abs=1e-5)
    assert y.std().item() == pytest.approx(ref["std"], abs=1e-5)
    assert got.std() > 0.005  # not saturated: the comparison can fail


def test_init_weights_depends_only_on_seed():
    a = init_weights_(FFCResNetGenerator(PRESETS["mini"]), seed=1).state_dict()
    b = init_weights_(FFCResNetGenerator(PRESETS["mini"]), seed=1).state_dict()
    c = init_weights_(FFCResNetGenerator(PRESETS["mini"]), seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.1.ffc.convl2l.weight"], c["model.1.ffc.convl2l.weight"])
    assert (a["model.2.bn_l.running_var"] > 0).all()


# ---------------------------------------------------------------- editor behaviour


def test_editor_output_shape_range_and_known_pixels(mini):
    image, mask = image_and_mask(37, 45)  # not multiples of 8
    calls = []
    runs = mini.inference_generator(image.device)  # the module predict runs
    handle = runs.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        with torch.no_grad():
            out = mini(image, mask)
    finally:
        handle.remove()
    assert calls == [torch.Size([2, 4, 40, 48])]  # padded to the next multiples of 8
    assert out.shape == image.shape
    assert out.min() >= 0 and out.max() <= 1
    known = mask.expand_as(image) == 0
    assert torch.equal(out[known], image[known])
    assert (out - image)[~known].abs().mean() > 0.01  # the hole is actually filled


def test_editor_ignores_pixels_inside_the_hole(mini):
    image, mask = image_and_mask()
    scrambled = torch.where(mask.bool(), torch.rand_like(image), image)
    with torch.no_grad():
        assert torch.equal(mini(image, mask), mini(scrambled, mask))


def test_gradient_flows_to_known_pixels_only(mini):
    image, mask = image_and_mask()
    image = image.clone().requires_grad_(True)
    out = mini(image, mask)
    (out * mask).sum().backward()
    grad = image.grad.abs()
    hole = mask.expand_as(image).bool()
    assert grad[~hole].sum() > 0
    assert grad[hole].sum() == 0  # hole pixels are blanked before the generator


def test_editor_is_frozen(mini):
    assert not any(p.requires_grad for p in mini.parameters())
    assert not mini.training and not any(m.training for m in mini.modules())
    mini.train()
    assert not any(m.training for m in mini.modules())  # BatchNorm keeps running statistics
    assert isinstance(mini, LamaEditor) and mini.name == "lama" and mini.size_multiple == 8


def test_dtype_argument():
    image, mask = image_and_mask()
    ref = load_lama(None, preset="mini", seed=0)
    bf16 = load_lama(None, preset="mini", seed=0, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ref(image, mask)
        got = bf16(image.bfloat16(), mask.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("preset", ["mini", "lama-fourier"])
def test_folded_batchnorm_computes_the_same_function(preset):
    generator = init_weights_(FFCResNetGenerator(PRESETS[preset]).eval(), seed=0)
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    folded = fold_batchnorm(generator)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in generator.modules())
    assert n_bn == (30 if preset == "mini" else 80)  # the original keeps its layout
    assert all(torch.equal(v, before[k]) for k, v in generator.state_dict().items())
    x1 = reference_input().requires_grad_(True)
    x2 = reference_input().requires_grad_(True)
    y1, y2 = generator(x1), folded(x2)
    weight = torch.randn(y1.shape, generator=torch.Generator().manual_seed(0))
    (y1 * weight).sum().backward()
    (y2 * weight).sum().backward()
    # the comparison can fail: the same weights without BatchNorm compute something else
    stripped = FFCResNetGenerator(PRESETS[preset]).eval()
    stripped.load_state_dict(generator.state_dict())
    for module in list(stripped.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(module, name, torch.nn.Identity())
    with torch.no_grad():
        assert (stripped(reference_input()) - y1).abs().max() > 1e-2
    torch.testing.assert_close(y2, y1, atol=2e-6, rtol=0)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5 * x1.grad.abs().max().item(), rtol=0)


def test_fast_editor_follows_weight_changes_and_gradient_mode():
    image, mask = image_and_mask()
    editor = load_lama(None, preset="mini", seed=0)
    slow = LamaEditor(editor.generator, fast=False)  # same weights, official module
    with torch.no_grad():
        torch.testing.assert_close(editor(image, mask), slow(image, mask), atol=2e-6, rtol=0)
        other = init_weights_(FFCResNetGenerator(PRESETS["mini"]), seed=5).state_dict()
        editor.generator.load_state_dict(other)  # in place: the folded copy must be rebuilt
        torch.testing.assert_close(editor(image, mask), slow(image, mask), atol=2e-6, rtol=0)
    assert editor.inference_generator(image.device) is not editor.generator
    assert slow.inference_generator(image.device) is slow.generator
    editor.generator.requires_grad_(True)  # training through the editor: no frozen copy
    assert editor.inference_generator(image.device) is editor.generator


# ---------------------------------------------------------------- weight files


def outputs(editor):
    image, mask = image_and_mask(seed=1)
    with torch.no_grad():
        return editor(image, mask)


def fake_global(monkeypatch, module, name, log):
    """A class that pickles as ``module.name`` and logs any use of its code."""

    def record(self, *args, **kwargs):
        log.append(name)

    cls = type(name, (), {"__module__": module, "__setstate__": record, "__call__": record})
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    monkeypatch.setattr(sys.modules[module], name, cls, raising=False)
    return cls


def lightning_checkpoint(monkeypatch, generator_state, log):
    """A checkpoint laid out like big-lama/models/best.ckpt (PyTorch Lightning 1.2.9)."""
    dict_config = fake_global(monkeypatch, "omegaconf.dictconfig", "DictConfig", log)
    metadata = fake_global(monkeypatch, "omegaconf.base", "ContainerMetadata", log)
    any_node = fake_global(monkeypatch, "omegaconf.nodes", "AnyNode", log)
    checkpoint_cb = fake_global(
        monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", log
    )
    meta = metadata()
    meta.__dict__.update(
        ref_type=typing.Any, object_type=dict, resolver_cache=defaultdict(dict, a={})
    )
    hparams = dict_config()
    hparams.__dict__.update(_metadata=meta, _content={"generator": any_node()})
    state = {f"generator.{k}": v for k, v in generator_state.items()}
    state["discriminator.model0.0.weight"] = torch.zeros(64, 3, 4, 4)
    state["val_evaluator.scores.fid.model.weight"] = torch.zeros(8)
    return {
        "epoch": 40,
        "global_step": 1_000_000,
        "pytorch-lightning_version": "1.2.9",
        "state_dict": state,
        "callbacks": {checkpoint_cb: {"best_model_score": torch.tensor(0.9), "dirpath": "/x"}},
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "hparams_type": dict_config,
    }


def test_lightning_checkpoint_loads_and_ignores_the_rest(mini, tmp_path, monkeypatch):
    log = []
    path = tmp_path / "big-lama" / "models" / "best.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(lightning_checkpoint(monkeypatch, mini.generator.state_dict(), log), path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert {"omegaconf.dictconfig.DictConfig", "typing.Any", "builtins.dict"} <= set(unsafe)

    loaded = load_lama(path, preset="mini")
    assert torch.equal(outputs(loaded), outputs(mini))
    assert torch.equal(outputs(load_lama(tmp_path / "big-lama", preset="mini")), outputs(mini))
    assert log == []  # metadata objects were read as inert placeholders, never built


def test_checkpoint_with_foreign_globals_is_refused(mini, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return print, ("payload ran",)

    path = tmp_path / "evil.ckpt"
    state = {f"generator.{k}": v for k, v in mini.generator.state_dict().items()}
    torch.save({"state_dict": state, "extra": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.print"):
        load_lama(path, preset="mini")
    assert "payload ran" not in capsys.readouterr().out


def test_state_dict_and_safetensors_files(mini, tmp_path):
    plain = tmp_path / "generator.pth"
    torch.save(mini.generator.state_dict(), plain)
    assert torch.equal(outputs(load_lama(plain, preset="mini")), outputs(mini))

    converted = convert_lama_weights(plain, tmp_path / "lama.safetensors", preset="mini")
    assert torch.equal(outputs(load_lama(converted, preset="mini")), outputs(mini))

    direct = tmp_path / "direct.safetensors"
    save_file(mini.generator.state_dict(), str(direct))
    assert torch.equal(outputs(load_lama(direct, preset="mini")), outputs(mini))


class _JITWrapper(torch.nn.Module):
    """Same module tree and I/O as the official bin/to_jit.py export (big-lama.pt)."""

    def __init__(self, generator):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.generator = generator

    def forward(self, image, mask):
        pred = self.model.generator(torch.cat([image * (1 - mask), mask], dim=1))
        return mask * pred + (1 - mask) * image


def test_torchscript_export_is_read_without_running_it(mini, tmp_path, monkeypatch):
    image, mask = image_and_mask()
    # torch.jit.trace is deprecated, but big-lama.pt files are TorchScript archives
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(_JITWrapper(mini.generator), (image, mask), check_trace=False)
    path = tmp_path / "big-lama.pt"
    traced.save(str(path))

    def refuse(*args, **kwargs):
        raise AssertionError("the TorchScript program must not be loaded")

    monkeypatch.setattr(torch.jit, "load", refuse)
    state = read_lama_weights(path, preset="mini")
    expected = mini.generator.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert torch.equal(outputs(load_lama(path, preset="mini")), outputs(mini))
    with torch.no_grad():  # and the export's own output is our editor's output
        assert torch.allclose(traced(image, mask), mini(image, mask), atol=1e-6)


# ---------------------------------------------------------------- errors


def test_missing_file_says_where_to_get_big_lama(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"big-lama\.zip.*models/big-lama/models/best\.ckpt"
    ):
        load_lama(tmp_path / "models" / "big-lama" / "models" / "best.ckpt")
    with pytest.raises(FileNotFoundError, match="best.ckpt"):
        load_lama(tmp_path)  # a folder without models/best.ckpt


def test_wrong_preset_lists_mismatched_keys(mini, tmp_path):
    path = tmp_path / "mini.pth"
    torch.save(mini.generator.state_dict(), path)
    with pytest.raises(ValueError, match=r"missing \(\d+\): model\.\d+.*preset"):
        load_lama(path, preset="big-lama")


def test_unexpected_and_unknown_keys(mini, tmp_path):
    state = dict(mini.generator.state_dict())
    state["model.99.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected \(1\): model\.99\.weight"):
        load_lama(path, preset="mini")

    torch.save({"net.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="cannot locate a LaMa generator.*net.conv.weight"):
        load_lama(path, preset="mini")


def test_random_weights_only_on_request(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        load_lama(None, preset="mini")
    with pytest.raises(ValueError, match="seed only applies"):
        load_lama(tmp_path / "x.ckpt", preset="mini", seed=0)
    with pytest.raises(ValueError, match="unknown LaMa preset"):
        load_lama(None, preset="tiny", seed=0)
