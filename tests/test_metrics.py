import numpy as np
import pytest
import scipy.linalg
import torch

from runtime_backdoor import feature_metrics, metrics


def img(value=0.5, h=16, w=20):
    return np.full((h, w, 3), value, dtype=np.float64)


def noisy(seed, sigma, h=32, w=32):
    rng = np.random.default_rng(seed)
    base = np.linspace(0.2, 0.8, h * w * 3).reshape(h, w, 3)
    return base, np.clip(base + rng.normal(0, sigma, base.shape), 0, 1)


# --- per-image metrics --------------------------------------------------------------------------


def test_psnr_of_known_mse():
    a, b = img(0.5), img(0.6)  # MSE 0.01 -> 20 dB
    assert metrics.psnr(a, b) == pytest.approx(20.0, abs=1e-9)
    assert metrics.psnr(a, a) == float("inf")
    mask = np.zeros(a.shape[:2], bool)
    mask[:4] = True
    c = a.copy()
    c[:4] += 0.01  # MSE 1e-4 inside the mask -> 40 dB; 0 outside
    assert metrics.psnr(a, c, mask) == pytest.approx(40.0, abs=1e-9)
    assert metrics.psnr(a, c) == pytest.approx(40.0 + 10 * np.log10(16 / 4), abs=1e-9)


def test_torch_channels_first_equals_numpy():
    a, b = noisy(0, 0.05)
    ta, tb = (torch.from_numpy(x).permute(2, 0, 1).float() for x in (a, b))
    assert metrics.psnr(ta, tb[None]) == pytest.approx(metrics.psnr(a, b), abs=1e-4)
    m = torch.zeros(1, 1, 32, 32)
    m[..., :8, :8] = 1
    assert metrics.masked_mse(ta, tb, m) == pytest.approx(
        metrics.masked_mse(a, b, m[0, 0].numpy() > 0), rel=1e-5
    )


def test_ssim():
    a, b = noisy(0, 0.05)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    s1, s2 = metrics.ssim(a, b), metrics.ssim(a, noisy(0, 0.2)[1])
    assert 0 < s2 < s1 < 1
    # Masked: noise only in the left half; SSIM over a mask at least 4 px (> 7x7 window
    # half-width) away from it is exactly 1.
    c = a.copy()
    c[:, :12] = b[:, :12]
    mask = np.zeros((32, 32), bool)
    mask[:, 16:] = True
    assert metrics.ssim(a, c, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(a, c, ~mask) < 1
    with pytest.raises(ValueError, match="7 x 7"):
        metrics.ssim(img(h=5, w=5), img(h=5, w=5))


def test_masked_mse():
    a, b = img(0.2), img(0.2)
    b[0, 0] = (0.5, 0.2, 0.2)  # one channel off by 0.3 in one pixel
    mask = np.zeros(a.shape[:2], bool)
    mask[0, :2] = True
    assert metrics.masked_mse(a, b, mask) == pytest.approx(0.09 / 6, abs=1e-12)
    with pytest.raises(ValueError, match="empty"):
        metrics.masked_mse(a, b, np.zeros_like(mask))
    with pytest.raises(ValueError, match="does not match"):
        metrics.masked_mse(a, b, mask[:, :3])
    with pytest.raises(ValueError, match="binary"):
        metrics.masked_mse(a, b, mask * 0.5)


def test_target_hit_fraction():
    green = np.array([0.0, 1.0, 0.0])
    edited = img(0.5, 10, 10)
    mask = np.zeros((10, 10), bool)
    mask[:5] = True  # 50 mask pixels
    edited[:1] = green  # 10 exact hits
    edited[1, :5] = green + (0.09, -0.09, 0.09)  # 5 hits within tol
    edited[1, 5:] = green + (0.0, -0.11, 0.0)  # 5 misses: one channel out of tol
    edited[2] = (0.05, 0.95, 0.5)  # 10 misses: blue channel far
    edited[5:] = green  # hits outside the mask do not count
    assert metrics.target_hit_fraction(edited, green, mask) == pytest.approx(15 / 50)
    target_img = np.broadcast_to(green, edited.shape)
    assert metrics.target_hit_fraction(edited, target_img, mask) == pytest.approx(15 / 50)
    assert metrics.target_hit_fraction(edited, green, mask, tol=0.3) == pytest.approx(20 / 50)
    assert metrics.target_hit(edited, green, mask, min_fraction=0.3)
    assert not metrics.target_hit(edited, green, mask)
    with pytest.raises(ValueError, match="target colour"):
        metrics.target_hit_fraction(edited, (0, 255, 0), mask)


def test_linf():
    a = img(0.5)
    b = a.copy()
    b[3, 4, 1] += 6 / 255
    b[0, 0, 0] -= 2 / 255
    assert metrics.linf(a, b) == pytest.approx(6 / 255, abs=1e-12)
    assert metrics.linf_8bit(a, b) == pytest.approx(6.0, abs=1e-9)
    mask = np.zeros(a.shape[:2], bool)
    mask[0, 0] = True
    assert metrics.linf_8bit(a, b, mask) == pytest.approx(2.0, abs=1e-9)


def test_input_validation():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        metrics.psnr(img(0.5), img(1.5))
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(np.zeros((4, 4, 3), np.uint8), img(0.5, 4, 4))
    with pytest.raises(ValueError, match="differ"):
        metrics.psnr(img(h=4), img(h=5))
    with pytest.raises(ValueError, match="H x W x 3"):
        metrics.ssim(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.linf(img() * np.nan, img())


# --- Fréchet distance ---------------------------------------------------------------------------


def fd_scipy(f1, f2):
    """The common sqrtm form (pytorch-fid), with its eps fallback for singular products."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


@pytest.mark.parametrize("n, d", [(400, 8), (60, 32), (10, 64)])
def test_frechet_distance_matches_sqrtm_form(n, d):
    rng = np.random.default_rng(d)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    f1 = rng.normal(size=(n, d)) @ mix
    f2 = rng.normal(size=(n, d)) @ (mix + 0.3 * np.eye(d)) + 0.5
    assert metrics.fid_from_features(f1, f2) == pytest.approx(fd_scipy(f1, f2), rel=1e-6)
    # Identical sets: 0, also when n <= d makes the covariance singular.
    assert metrics.fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_gaussians():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 over standard deviations.
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 2.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 3.0])
    exact = float(((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum())  # 1.25 + 5.25 = 6.5
    got = metrics.frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2))
    assert got == pytest.approx(exact, abs=1e-10)
    # Equal covariances: only the means count, whatever the covariance.
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    s = a @ a.T
    assert metrics.frechet_distance(mu1[:1].repeat(5), s, np.zeros(5), s) == pytest.approx(0.0)
    # Sampled: within 3% of the closed form at n = 20000.
    rng = np.random.default_rng(1)
    f1 = mu1 + sd1 * rng.normal(size=(20000, 4))
    f2 = mu2 + sd2 * rng.normal(size=(20000, 4))
    assert metrics.fid_from_features(f1, f2) == pytest.approx(exact, rel=0.03)


def test_frechet_distance_validation():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- CLIP loading -------------------------------------------------------------------------------


@pytest.fixture
def no_default_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv(metrics.CLIP_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(feature_metrics, "DEFAULT_CLIP_DIR", tmp_path / "models" / "clip")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_load_clip_without_weights_says_where_to_put_them(no_default_weights):
    where = str(
        no_default_weights
        / "models"
        / "clip"
        / "ViT-B-32-quickgelu"
        / "open_clip_model.safetensors"
    )
    with pytest.raises(metrics.ClipUnavailable) as e:
        metrics.load_clip()
    msg = str(e.value)
    assert where in msg and metrics.CLIP_WEIGHTS_ENV in msg
    assert "not in the local Hugging Face cache" in msg
    model, reason = metrics.try_load_clip()
    assert model is None and where in reason
    with pytest.raises(metrics.ClipUnavailable, match="no pretrained"):
        metrics.clip_fid([img()] * 2, [img()] * 2)


def test_load_clip_errors(no_default_weights, tmp_path):
    with pytest.raises(
        metrics.ClipUnavailable, match=r"weights file not found: .*nope\.safetensors"
    ):
        metrics.load_clip(tmp_path / "nope.safetensors")
    with pytest.raises(metrics.ClipUnavailable, match="not a pretrained tag"):
        metrics.load_clip("no_such_tag")
    with pytest.raises(metrics.ClipUnavailable, match="timm/vit_base_patch32_clip_224.openai"):
        metrics.load_clip("openai")
    with pytest.raises(metrics.ClipUnavailable, match="CLIP-ViT-B-32-laion2B-s34B-b79K"):
        metrics.load_clip("laion2b_s34b_b79k", model_name="ViT-B-32")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        metrics.ClipUnavailable, match=r"cannot load ViT-B-32-quickgelu weights from .*junk\.pt"
    ):
        metrics.load_clip(tmp_path / "junk.pt")


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.target),))


def test_load_clip_never_unpickles_code(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(metrics.ClipUnavailable, match="cannot load"):
        metrics.load_clip(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    """A randomly initialised ViT-B-32 through the file-loading path (tests the code, not CLIP)."""
    import open_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "random_vit_b_32.pt"
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.save(model.state_dict(), path)
    ref = model.visual.conv1.weight.detach().clone()
    del model
    loaded = metrics.load_clip(path)
    path.unlink()  # 600 MB
    return loaded, ref


def test_random_clip_loads_from_file_and_gives_512_features(random_clip):
    model, ref = random_clip
    assert torch.equal(model.model.visual.conv1.weight, ref)
    assert model.dim == 512 and "random_vit_b_32.pt" in model.weights
    rng = np.random.default_rng(0)
    images = [rng.random((40, 40, 3)), rng.random((48, 64, 3)), torch.rand(3, 30, 30)]
    f = metrics.clip_features(images, model, batch_size=2)
    assert f.shape == (3, 512) and np.isfinite(f).all()
    # Batching does not change features.
    assert np.allclose(metrics.clip_features(images[:1], model), f[:1], atol=1e-4)


def test_clip_preprocess_normalises_constant_images(random_clip):
    model, _ = random_clip
    x = torch.full((1, 3, 50, 70), 77 / 255)  # 8-bit values, as every evaluated PNG holds
    y = model.preprocess(x)
    assert y.shape == (1, 3, 224, 224)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    assert torch.allclose(y, ((77 / 255 - mean) / std).expand_as(y), atol=1e-5)


@pytest.fixture
def cleanfid_clip(monkeypatch):
    """clean-fid's own CLIP preprocessing; its module imports OpenAI's ``clip`` package at
    import time (only to load the model, which these tests do not), so a stand-in is given."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "clip", types.ModuleType("clip"))
    from cleanfid import clip_features

    return clip_features


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.mark.parametrize("size", [(256, 256), (512, 384), (128, 200), (100, 100)])
def test_clip_preprocessing_is_clean_fids_bit_for_bit(random_clip, cleanfid_clip, size):
    """The CLIP encoder's input equals clean-fid's clip_vit_b_32 input on real photos."""
    import skimage.data
    from PIL import Image
    from torchvision import transforms

    model, _ = random_clip
    for name in PHOTOS:
        photo = (
            Image.fromarray(getattr(skimage.data, name)())
            .convert("RGB")
            .resize(size[::-1], Image.BICUBIC)
        )
        uint8 = np.asarray(photo)
        theirs = cleanfid_clip.img_preprocess_clip(uint8)
        assert np.array_equal(model.resize_uint8(uint8), theirs)
        # Then CLIP_fx: ToTensor()*255 (ResizeDataset), /255, CLIP's Normalize.
        t = transforms.ToTensor()(np.array(theirs)) * 255
        norm = transforms.Normalize(
            (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        )
        expected = norm(t / 255.0)[None]
        ours = model.preprocess(torch.from_numpy(uint8 / 255.0).permute(2, 0, 1)[None].float())
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_frechet_distance_matches_clean_fids():
    from cleanfid.fid import frechet_distance as theirs

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 8)), rng.normal(0.3, 1.2, size=(50, 8))
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = theirs(mu_a, s_a, mu_b, s_b)
    assert metrics.frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(ref, rel=1e-6)
    assert metrics.fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)


def test_clip_fid_on_features(random_clip):
    model, _ = random_clip
    rng = np.random.default_rng(1)
    a = [rng.random((32, 32, 3)) for _ in range(2)]
    b = [np.clip(x * 0.3, 0, 1) for x in a]
    same = metrics.clip_fid(a, a, model)
    assert same.value == pytest.approx(0.0, abs=1e-6)
    assert (same.n_a, same.n_b, same.dim) == (2, 2, 512) and same.rank_deficient
    diff = metrics.clip_fid(a, b, model)
    assert float(diff) > 0 and "ViT-B-32" in diff.features
    with pytest.raises(ValueError, match="at least 2"):
        metrics.clip_fid(a[:1], b, model)


def test_batched_ssim_is_the_metrics_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 30, 27, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    m = torch.zeros(2, 1, 30, 27)
    m[..., 3:20, 0:9] = 1
    for i in range(2):
        assert abs(float(metrics.ssim_batch(a, b)[i]) - metrics.ssim(a[i], b[i])) < 1e-9
        assert (
            abs(float(metrics.ssim_batch(a, b, m)[i]) - metrics.ssim(a[i], b[i], m[i, 0] > 0))
            < 1e-9
        )


def test_load_clip_without_open_clip_is_unavailable_not_a_crash(no_default_weights, monkeypatch):
    """The GPU machine has no open_clip: CLIP-FID is then skipped with its reason."""
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(metrics.ClipUnavailable, match="open_clip is not installed"):
        metrics.load_clip(no_default_weights / "w.safetensors")
    with pytest.raises(metrics.ClipUnavailable, match="open_clip is not installed"):
        metrics.load_clip()


def test_lpips_is_the_packages_on_the_given_backbone(random_alexnet):
    import lpips
    import torchvision

    model = metrics.load_lpips("alex", random_alexnet)
    # The reference: the lpips package's own network with the same backbone copied in by
    # parameter name order (slices keep torchvision's layer indices).
    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    tv = torchvision.models.alexnet(weights=None)
    tv.load_state_dict(torch.load(random_alexnet, weights_only=True))
    ours_backbone = [p for _, p in sorted(model.net.named_parameters())]
    tv_convs = [m for m in tv.features if isinstance(m, torch.nn.Conv2d)]
    assert len(ours_backbone) == 2 * len(tv_convs)
    for k in range(1, 6):
        for name, layer in getattr(ref.net, f"slice{k}").named_children():
            layer.load_state_dict(tv.features[int(name)].state_dict())
    rng = np.random.default_rng(0)
    a, b = rng.random((64, 64, 3)), rng.random((64, 64, 3))
    with torch.no_grad():
        expected = float(ref(torch.from_numpy(a.transpose(2, 0, 1))[None].float() * 2 - 1,
                             torch.from_numpy(b.transpose(2, 0, 1))[None].float() * 2 - 1))  # fmt: skip
    assert metrics.lpips_distance(a, b, model) == pytest.approx(expected, rel=1e-5)
    assert metrics.lpips_distance(a, a, model) == pytest.approx(0, abs=1e-7)
    assert metrics.lpips_distance(a, b, model) == pytest.approx(
        metrics.lpips_distance(b, a, model), rel=1e-5
    )
    region = np.zeros((64, 64), bool)
    region[:32] = True
    inside = metrics.lpips_distance(a, b, model, region)
    assert inside > 0 and np.isnan(metrics.lpips_distance(a, b, model, np.zeros((64, 64), bool)))


def test_lpips_batch_equals_the_image_by_image_distance(random_alexnet):
    model = metrics.load_lpips("alex", random_alexnet)
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 48, 40, generator=g), torch.rand(3, 3, 48, 40, generator=g)
    mask = torch.zeros(3, 1, 48, 40)
    mask[0, :, :20] = 1
    mask[1, :, 10:30, 5:25] = 1  # image 2: empty mask
    whole = metrics.lpips_batch(a, b, model)
    region = metrics.lpips_batch(a, b, model, mask)

    def hwc(t):
        return t.permute(1, 2, 0).numpy()

    for i in range(3):
        assert float(whole[i]) == pytest.approx(
            metrics.lpips_distance(hwc(a[i]), hwc(b[i]), model), rel=1e-5
        )
        expected = metrics.lpips_distance(hwc(a[i]), hwc(b[i]), model, mask[i, 0].numpy() > 0.5)
        if i < 2:
            assert float(region[i]) == pytest.approx(expected, rel=1e-5)
    assert np.isnan(float(region[2]))  # fmt: skip


def test_lpips_without_a_backbone_is_unavailable_with_the_fetch_command(tmp_path):
    with pytest.raises(metrics.LpipsUnavailable, match="weights fetch lpips-alex"):
        metrics.load_lpips("alex", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(metrics.LpipsUnavailable, match="not a torchvision alex state dict"):
        metrics.load_lpips("alex", tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="lpips net"):
        metrics.load_lpips("squeeze-me")


# ------------------------------------------------------------ batched hit and PSNR vs reference


def _random_edits(seed: int, dtype=torch.float64):
    """Edits near a solid target (so that some pixels are on target and some are not), on the
    8-bit grid and off it, with 0/1 regions."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(4, 3, 16, 16, dtype=dtype)
    target[:, 1] = 1.0
    edited = (target + (torch.rand(4, 3, 16, 16, generator=g, dtype=dtype) - 0.5) * 0.4).clamp(0, 1)
    edited[2] = torch.round(edited[2] * 255) / 255
    region = (torch.rand(4, 1, 16, 16, generator=g) > 0.6).to(dtype)
    return edited, target, region


@pytest.mark.parametrize("seed", range(5))
def test_hit_fraction_batch_is_the_reference_bit_for_bit_in_float64(seed):
    edited, target, region = _random_edits(seed)
    for tol in (0.05, 0.1, 0.2):
        got = metrics.hit_fraction_batch(edited, target, region, tol)
        hits = metrics.hits_batch(edited, target, region, tol, 0.3)
        for i in range(4):
            ref = metrics.target_hit_fraction(edited[i], target[i], region[i, 0] > 0, tol)
            assert float(got[i]) == ref  # tolerance: none (float64)
            assert bool(hits[i]) == metrics.target_hit(
                edited[i], target[i], region[i, 0] > 0, tol, 0.3
            )


def test_hit_fraction_batch_in_float32_matches_the_former_stage_copies():
    """beyond and purify counted ``<= tol + 1e-9`` in float32: for tol = 0.1 the same threshold
    once rounded to float32, so the same hits; fractions agree with the reference to float32
    rounding (1e-6)."""
    edited, target, region = _random_edits(7, torch.float32)
    old = ((edited - target).abs().amax(1, keepdim=True) <= 0.1 + 1e-9).float()
    old = (old * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
    got = metrics.hit_fraction_batch(edited, target, region, 0.1)
    assert torch.equal(got, old)
    for i in range(4):
        ref = metrics.target_hit_fraction(edited[i], target[i], region[i, 0] > 0, 0.1)
        assert abs(float(got[i]) - ref) < 1e-6


def test_psnr_batch_matches_the_reference_and_caps():
    edited, target, _ = _random_edits(3)
    got = metrics.psnr_batch(edited, target)
    for i in range(4):
        assert abs(float(got[i]) - metrics.psnr(edited[i], target[i])) < 1e-9  # dB
    same = metrics.psnr_batch(target, target, cap=100.0)
    assert torch.all(same == 100.0) and metrics.psnr(target[0], target[0]) == float("inf")
    assert torch.all(metrics.psnr_batch(edited, target, cap=5.0) <= 5.0)


def test_ssim_map_with_a_shared_reference_is_bit_for_bit_the_same(rng):
    from runtime_backdoor.metrics import ssim_map, ssim_reference

    clean = torch.rand(3, 3, 40, 33, generator=rng)
    ref = ssim_reference(clean)
    for _ in range(2):  # one reference, several protected edits
        edit = (clean + 0.1 * torch.randn(clean.shape, generator=rng)).clamp(0, 1)
        assert torch.equal(ssim_map(edit, clean), ssim_map(edit, reference=ref))
