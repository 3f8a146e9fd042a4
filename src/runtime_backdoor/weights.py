"""Model weights the study can use: the registry, where each file goes, and verification.

    runtime-backdoor weights list
    runtime-backdoor weights verify

Downloading lives in :mod:`runtime_backdoor.downloads` (``weights fetch``): pipeline stages
read only this module (where weights lie, whether they match), so a change to how files are
downloaded never invalidates a stage's results.

What was fetched, with its SHA-256 and, for hub repositories, the resolved commit, is
recorded in ``models/weights.json``; files without a published checksum are verified
against the SHA-256 recorded on their first fetch. ``RUNTIME_BACKDOOR_MODELS`` moves the
``models/`` folder; ``RUNTIME_BACKDOOR_WEIGHTS_MIRROR`` replaces the source of every plain
URL by ``MIRROR/<file name>`` (a local mirror, or a test server).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .model_paths import MODELS_ENV, models_dir  # noqa: F401 (re-exported)

MIRROR_ENV = "RUNTIME_BACKDOOR_WEIGHTS_MIRROR"
RECORD_NAME = "weights.json"


@dataclass(frozen=True)
class WeightFile:
    """One known download. ``dest`` is relative to the models folder."""

    name: str
    description: str
    kind: str  # file | zip (unzipped into dest) | hub (diffusers folder or single hub file)
    source: str  # URL, or hub repo id
    dest: str
    licence: str
    checksum: str | None = None  # "md5:..." / "sha256:..."; shorter: a prefix; None: none published
    size: int | None = None  # bytes, where known
    hub_files: tuple[str, ...] = ()  # hub: the files (glob patterns) the editor needs
    check: str = ""  # zip: the extracted file that must exist and is verified
    extra: dict = field(default_factory=dict)


def _sd_files() -> tuple[str, ...]:
    # What editors/diffusion.load_sd_inpainting reads: the UNet, the VAE, the scheduler
    # config and, to embed prompts, the tokenizer and text encoder. Only the plain
    # safetensors: diffusers does not pick up the fp16 variant files without variant="fp16",
    # which the editor does not pass (it casts to its own dtype after loading).
    return (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/*",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    )


REGISTRY: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            "big-lama",
            "Big-LaMa generator, TorchScript export of lama-cleaner/IOPaint (editor.name: lama)",
            "file",
            "https://github.com/Sanster/models/releases/download/add_big_lama/big-lama.pt",
            "big-lama.pt",
            "Apache-2.0 (LaMa, Suvorov et al., WACV 2022: the authors' weights)",
            checksum="md5:e3aa4aaa15225a33ec84f9f4bc47e500",
            size=205_669_692,
        ),
        WeightFile(
            "big-lama-ckpt",
            "Big-LaMa, the authors' big-lama.zip (Lightning best.ckpt + config.yaml)",
            "zip",
            "https://huggingface.co/smartywu/big-lama/resolve/main/big-lama.zip",
            "big-lama",
            "Apache-2.0 (LaMa, Suvorov et al., WACV 2022)",
            check="models/best.ckpt",
        ),
        WeightFile(
            "mat-places512",
            "MAT generator trained on Places at 512 px (editor.name: mat)",
            "file",
            "https://github.com/Sanster/models/releases/download/add_mat/Places_512_FullData_G.pth",
            "mat/Places_512_FullData_G.pth",
            "MAT (Li et al., CVPR 2022): github.com/fenglinglwb/MAT LICENSE, which has read "
            "CC BY-NC 4.0 and MIT at different times: check it before non-research use",
            checksum="md5:8ca927835fa3f5e21d65ffcb165377ed",
        ),
        WeightFile(
            "sd15-inpainting",
            "Stable Diffusion 1.5 inpainting, diffusers folder (editor.name: sd-inpainting)",
            "hub",
            "stable-diffusion-v1-5/stable-diffusion-inpainting",
            "sd15-inpainting",
            "CreativeML OpenRAIL-M (RunwayML / Stability AI)",
            hub_files=_sd_files(),
        ),
        WeightFile(
            "sd2-inpainting",
            "Stable Diffusion 2 inpainting, diffusers folder (editor.name: sd-inpainting)",
            "hub",
            "stabilityai/stable-diffusion-2-inpainting",
            "sd2-inpainting",
            "CreativeML OpenRAIL++-M (Stability AI)",
            hub_files=_sd_files(),
        ),
        WeightFile(
            "clip-vit-b-32",
            "OpenAI CLIP ViT-B/32 (QuickGELU), the network of clean-fid's clip_vit_b_32 "
            "CLIP-FID, as open_clip's `openai` tag (evaluate.clip_weights)",
            "hub",
            "timm/vit_base_patch32_clip_224.openai",
            "clip/ViT-B-32-quickgelu",
            "MIT (OpenAI CLIP)",
            hub_files=("open_clip_pytorch_model.bin",),
        ),
        WeightFile(
            "sd15",
            "Stable Diffusion 1.5 text-to-image, diffusers folder: DiffPure, GrIDPure, "
            "img2img-denoise and vae-roundtrip (purifiers.load_img2img, purify stage)",
            "hub",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "sd15",
            "CreativeML OpenRAIL-M (RunwayML / Stability AI)",
            hub_files=_sd_files(),
        ),
        WeightFile(
            "sd-x4-upscaler",
            "Stable Diffusion x4 upscaler, diffusers folder: noisy upscaling "
            "(purifiers.load_upscaler, purify stage)",
            "hub",
            "stabilityai/stable-diffusion-x4-upscaler",
            "sd-x4-upscaler",
            "CreativeML OpenRAIL++-M (Stability AI)",
            hub_files=(*_sd_files(), "low_res_scheduler/scheduler_config.json"),
        ),
        # LPIPS: the package ships its calibrated linear layers; the ImageNet backbones are
        # torchvision's (file names carry the first 8 hex digits of their SHA-256).
        WeightFile(
            "lpips-alex",
            "torchvision AlexNet (ImageNet), the backbone of LPIPS-alex (evaluate.lpips_backbone)",
            "file",
            "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
            "lpips/alexnet-owt-7be5be79.pth",
            "BSD-3-Clause (torchvision)",
            checksum="sha256:7be5be79",  # torchvision publishes the SHA-256's first 8 digits
        ),
        WeightFile(
            "lpips-vgg",
            "torchvision VGG-16 (ImageNet), the backbone of LPIPS-vgg",
            "file",
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            "lpips/vgg16-397923af.pth",
            "BSD-3-Clause (torchvision)",
            checksum="sha256:397923af",
        ),
    )
}


class WeightsError(Exception):
    """A fetch or verification problem, said in one line."""


# --------------------------------------------------------------------------- places


def destination(spec: WeightFile, root: Path | None = None) -> Path:
    """Where the file (``file``), the extracted folder (``zip``) or the folder (``hub``) goes."""
    return (root or models_dir()) / spec.dest


def primary_path(spec: WeightFile, root: Path | None = None) -> Path:
    """The single path a config points at (``editor.weights``, ``evaluate.clip_weights``)."""
    dest = destination(spec, root)
    if spec.kind == "hub" and len(spec.hub_files) == 1 and "*" not in spec.hub_files[0]:
        return dest / spec.hub_files[0]
    return dest


def file_hash(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(root: Path) -> dict:
    path = root / RECORD_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path} is not valid JSON ({err}); delete it and fetch again") from None


def entry(name: str) -> WeightFile:
    if name not in REGISTRY:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def hub_problems(folder: Path, files: dict) -> list[str]:
    """The problems of a hub folder against its record (empty: all files match)."""
    problems = []
    for fname, meta in files.items():
        path = folder / fname
        if not path.is_file():
            problems.append(f"{fname} missing")
        elif path.stat().st_size != meta["size"] or file_hash(path) != meta["sha256"]:
            problems.append(f"{fname} differs from the recorded SHA-256")
    return problems


# --------------------------------------------------------------------------- verify


def digest_matches(found: str, expected: str) -> bool:
    """A hex digest against a published one, or against the prefix of one that a publisher
    puts in the file name (torchvision's ``alexnet-owt-7be5be79.pth``)."""
    return found == expected or (8 <= len(expected) < len(found) and found.startswith(expected))


def verify(name: str, root: Path | None = None) -> tuple[bool, str]:
    """(ok, one line) for the local copy of ``name``; never downloads."""
    spec = entry(name)
    root = root or models_dir()
    dest = destination(spec, root)
    fetch_hint = f"run `runtime-backdoor weights fetch {name}`"
    if spec.kind == "file":
        if not dest.is_file():
            return False, f"missing: {dest} ({fetch_hint})"
        algorithm, _, expected = spec.checksum.partition(":")
        found = file_hash(dest, algorithm)
        if not digest_matches(found, expected):
            return False, (
                f"checksum mismatch: {dest}: expected {algorithm}:{expected}, found "
                f"{algorithm}:{found} (delete it and {fetch_hint})"
            )
        return True, f"ok: {dest} ({spec.checksum})"
    recorded = read_record(root).get(name)
    if spec.kind == "zip":
        inside = dest / spec.check
        if not inside.is_file():
            return False, f"missing: {inside} ({fetch_hint})"
        found = file_hash(inside)
        if recorded is None:
            return True, (
                f"present, unverified: {inside} has no published checksum and no record of a "
                f"first fetch (SHA-256 {found})"
            )
        if found != recorded["check_sha256"]:
            return False, (
                f"checksum mismatch: {inside}: expected sha256:{recorded['check_sha256']} "
                f"(recorded on its first fetch), found sha256:{found}"
            )
        return True, f"ok: {inside} (SHA-256 recorded on first fetch)"
    if recorded is None or not recorded.get("files"):
        missing = [p for p in spec.hub_files if "*" not in p and not (dest / p).is_file()]
        if missing:
            return False, f"missing: {dest / missing[0]} ({fetch_hint})"
        return True, f"present, unverified: {dest} has no fetch record"
    problems = hub_problems(dest, recorded["files"])
    if problems:
        return False, f"{dest}: {'; '.join(problems)} ({fetch_hint})"
    return True, f"ok: {dest} (commit {recorded['commit']}, {len(recorded['files'])} files)"


# Where an editor's weights lie: here, not in runtime_backdoor.editors, so that no stage imports
# the registry (tests/test_contract.py).


def weight_paths(name: str, models: str | Path | None = None) -> list[tuple[str, Path]]:
    """``(weights entry, path)`` of every weight file or folder the editor ``name`` reads,
    default first, where ``runtime-backdoor weights fetch`` (or the pipeline) puts it under
    ``models``. The entry is ``""`` for weights no :data:`REGISTRY` entry fetches (the
    miniature)."""
    from .editors import EDITORS

    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known editors: {', '.join(EDITORS)}")
    entry = EDITORS[name]
    root = Path(models) if models is not None else models_dir()
    paths = [(key, primary_path(REGISTRY[key], root)) for key in entry.weights]
    if entry.default_path is not None:
        paths.append(("", root / entry.default_path))
    return paths


def default_weights(name: str, models: str | Path | None = None) -> Path | None:
    """Where the editor ``name``'s default weights lie under ``models`` (``None``: none)."""
    paths = weight_paths(name, models)
    return paths[0][1] if paths else None
