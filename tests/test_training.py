import numpy as np
import pytest
import torch

from runtime_backdoor.editors.lama import LamaConfig, LamaEditor
from runtime_backdoor.editors.mini import load_miniature, save_miniature
from runtime_backdoor.training import DEFAULT_RECIPE, random_mask, train_miniature

TINY = LamaConfig(ngf=4, n_downsampling=1, n_blocks=1)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # smooth random images: something a tiny generator can learn to continue
    base = rng.random((6, 4, 4, 3)).astype(np.float32)
    return [np.kron(b, np.ones((8, 8, 1), np.float32)) for b in base]


def _train(images, steps, **kw):
    options = dict(
        config=TINY,
        steps=steps,
        batch_size=4,
        size=16,
        lr=3e-3,
        seed=3,
        progress=False,
        adversarial=0.0,
        feature_matching=0.0,
    )
    return train_miniature(images, **{**options, **kw})


def test_training_reduces_loss_and_is_deterministic(images):
    ed1, hist = _train(images, 30, l1_hole=10.0)
    first, last = np.mean(hist["loss"][:5]), np.mean(hist["loss"][-5:])
    assert last < first
    ed2, _ = _train(images, 30, l1_hole=10.0)
    s1, s2 = ed1.generator.state_dict(), ed2.generator.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert hist["meta"]["steps"] == 30 and hist["meta"]["seed"] == 3


def test_discriminator_losses_run_and_are_deterministic(images):
    ed1, hist = _train(images, 3, adversarial=10.0, feature_matching=100.0)
    assert len(hist["adversarial"]) == 3 and np.isfinite(hist["loss"]).all()
    ed2, _ = _train(images, 3, adversarial=10.0, feature_matching=100.0)
    s1, s2 = ed1.generator.state_dict(), ed2.generator.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_callback_does_not_freeze_training(images):
    calls = []
    ed, hist = _train(
        images, 4, callback=lambda s, e: calls.append(s) or {"x": s}, callback_every=2
    )
    assert calls == [0, 2, 4] and [e["x"] for e in hist["evals"]] == [0, 2, 4]
    assert len(hist["loss"]) == 4 and hist["loss"][-1] != hist["loss"][-2]


def test_save_load_round_trip_and_interface(images, tmp_path):
    ed, hist = _train(images, 3)
    path = save_miniature(ed, tmp_path / "mini.safetensors", meta=hist["meta"])
    loaded = load_miniature(path)
    assert isinstance(loaded, LamaEditor) and loaded.generator.config == TINY
    x = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(2, 1, 20, 20)
    m[:, :, 5:12, 6:15] = 1
    out = loaded(x, m)
    assert torch.equal(out, ed(x, m))
    assert torch.equal(out * (1 - m), x * (1 - m))  # known pixels unchanged
    assert out.min() >= 0 and out.max() <= 1
    assert (tmp_path / "mini.json").is_file()


def test_missing_file_names_path_and_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*dvc repro editor"):
        load_miniature(tmp_path / "nope.safetensors")


def test_random_mask_is_deterministic_and_partial():
    a = [random_mask(32, np.random.default_rng(k)) for k in range(20)]
    b = [random_mask(32, np.random.default_rng(k)) for k in range(20)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(0 < m.mean() < 1 for m in a)


def test_bad_arguments(images):
    with pytest.raises(ValueError, match="multiple"):
        _train(images, 1, size=15)
    with pytest.raises(ValueError, match="not all zero"):
        _train(images, 1, l1_known=0, perceptual=0)
    assert DEFAULT_RECIPE.config().n_downsampling == DEFAULT_RECIPE.n_downsampling


def test_saved_weights_load_with_load_lama(images, tmp_path):
    from runtime_backdoor.editors.lama import load_lama

    ed, _ = _train(images, 2)
    path = save_miniature(ed, tmp_path / "mini.safetensors")
    other = load_lama(path, preset=TINY)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m = torch.zeros(1, 1, 16, 16)
    m[..., 4:9, 4:9] = 1
    assert torch.equal(other(x, m), ed(x, m))


def test_default_recipe_is_the_mini_preset():
    from runtime_backdoor.editors.lama import PRESETS

    assert DEFAULT_RECIPE.config() == PRESETS["mini"]
