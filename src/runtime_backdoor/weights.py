"""Model weights the study can use: a registry, hash-checked downloads and verification.

    runtime-backdoor weights list
    runtime-backdoor weights fetch big-lama clip-vit-b-32
    runtime-backdoor weights verify

Plain URLs are streamed to a temporary file next to the destination, hash-checked, then
renamed (a partial file never has the final name; a stall, or more bytes than the registered
size, stops the download: :func:`_download`) and
hub repositories with ``huggingface_hub`` (which lands files the same way). What was
fetched, with its SHA-256 and, for hub repositories, the resolved commit, is recorded
in ``models/weights.json``; files without a published checksum are verified against
the SHA-256 recorded on their first fetch.

``RUNTIME_BACKDOOR_WEIGHTS_MIRROR`` replaces the source of every plain URL by
``MIRROR/<file name>`` (a local mirror, or a test server); ``HF_ENDPOINT`` does the
same for the hub. ``RUNTIME_BACKDOOR_MODELS`` moves the ``models/`` folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

MIRROR_ENV = "RUNTIME_BACKDOOR_WEIGHTS_MIRROR"
MODELS_ENV = "RUNTIME_BACKDOOR_MODELS"
RECORD_NAME = "weights.json"
DEFAULT_SET = ("big-lama", "clip-vit-b-32")  # what `make weights` fetches


@dataclass(frozen=True)
class WeightFile:
    """One known download. ``dest`` is relative to the models folder."""

    name: str
    description: str
    kind: str  # file | zip (unzipped into dest) | hub (diffusers folder or single hub file)
    source: str  # URL, or hub repo id
    dest: str
    licence: str
    checksum: str | None = None  # "md5:..." / "sha256:..."; None: none published
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
            "Stable Diffusion 1.5 text-to-image, diffusers folder: DiffPure and GrIDPure "
            "(purifiers.load_img2img, purify stage)",
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
        ),
        WeightFile(
            "lpips-vgg",
            "torchvision VGG-16 (ImageNet), the backbone of LPIPS-vgg",
            "file",
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            "lpips/vgg16-397923af.pth",
            "BSD-3-Clause (torchvision)",
        ),
    )
}


class WeightsError(Exception):
    """A fetch or verification problem, said in one line."""


# --------------------------------------------------------------------------- places


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or "models")


def destination(spec: WeightFile, root: Path | None = None) -> Path:
    """Where the file (``file``), the extracted folder (``zip``) or the folder (``hub``) goes."""
    return (root or models_dir()) / spec.dest


def primary_path(spec: WeightFile, root: Path | None = None) -> Path:
    """The single path a config points at (``editor.weights``, ``evaluate.clip_weights``)."""
    dest = destination(spec, root)
    if spec.kind == "hub" and len(spec.hub_files) == 1 and "*" not in spec.hub_files[0]:
        return dest / spec.hub_files[0]
    return dest


def source_url(spec: WeightFile) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    if spec.kind == "hub" or not mirror:
        return spec.source
    return f"{mirror.rstrip('/')}/{spec.source.rsplit('/', 1)[-1]}"


def _hash(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_record(root: Path) -> dict:
    path = root / RECORD_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path} is not valid JSON ({err}); delete it and fetch again") from None


def _write_record(root: Path, name: str, entry: dict) -> None:
    from .data import temp_file_for

    record = _read_record(root)
    record[name] = entry
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_for(root / RECORD_NAME)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, root / RECORD_NAME)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- fetch


def fetch(
    name: str, root: Path | None = None, *, retries: int = 2, progress: bool = True
) -> tuple[Path, str]:
    """Download ``name`` unless a good copy is there; return (path, what happened)."""
    spec = _spec(name)
    root = root or models_dir()
    if spec.kind == "file":
        return _fetch_file(spec, root, retries, progress)
    if spec.kind == "zip":
        return _fetch_zip(spec, root, retries, progress)
    return _fetch_hub(spec, root, os.environ.get("HF_ENDPOINT") or None)


def _spec(name: str) -> WeightFile:
    if name not in REGISTRY:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


#: a download that receives no data for this long is given up (one attempt; then retried)
STALL_SECONDS = 30.0
#: ... and so is one that receives less than this in any STALL_SECONDS (a trickle)
STALL_MIN_BYTES = 16 << 10
#: bytes accepted beyond a registered size: max(SIZE_MARGIN, 1 %)
SIZE_MARGIN = 64 << 10
#: the cap of an entry without a registered size
MAX_UNREGISTERED_BYTES = 4 << 30


class _Failed(Exception):
    """One attempt failed; ``retry``: whether another attempt may help."""

    def __init__(self, reason: str, retry: bool = True):
        super().__init__(reason)
        self.retry = retry


def size_limit(spec: WeightFile) -> int:
    """The most bytes a download of ``spec`` may bring: its registered size plus a margin."""
    if not spec.size:
        return MAX_UNREGISTERED_BYTES
    return spec.size + max(SIZE_MARGIN, spec.size // 100)


def _connect_reason(err) -> str:
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(err))
    return f"could not connect: {found.group(1).strip()}" if found else "could not connect"


def _stalled(got: int, of: str) -> _Failed:
    return _Failed(f"stalled: no data for {STALL_SECONDS:g} s after {got:,}{of} bytes")


def _stream(url: str, out, limit: int, algorithm: str, progress: bool, label: str) -> str:
    """One attempt: ``url`` into the open file ``out``; returns the hex digest. Gives up on a
    stall (no data, or under STALL_MIN_BYTES, for STALL_SECONDS), a short body and more than
    ``limit`` bytes, each as a :class:`_Failed` that says so."""
    import time

    import requests
    from tqdm.auto import tqdm

    try:
        response = requests.get(url, stream=True, timeout=(STALL_SECONDS, STALL_SECONDS))
    except requests.ConnectTimeout:
        raise _Failed(f"no answer within {STALL_SECONDS:g} s") from None
    except requests.ReadTimeout:
        raise _Failed(f"stalled: no response within {STALL_SECONDS:g} s") from None
    except requests.ConnectionError as err:
        raise _Failed(_connect_reason(err)) from None
    with response:
        if response.status_code >= 400:
            raise _Failed(f"HTTP {response.status_code}", retry=response.status_code >= 500)
        declared = response.headers.get("Content-Length")
        declared = int(declared) if declared and declared.isdigit() else None
        if declared is not None and declared > limit:
            raise _Failed(
                f"it announced {declared:,} bytes, more than the {limit:,} expected "
                "(registered size plus margin); nothing was downloaded",
                retry=False,
            )
        digest, got = hashlib.new(algorithm), 0
        of = f" of {declared:,}" if declared is not None else ""
        read1 = getattr(response.raw, "read1", None)
        chunks = (
            iter(lambda: read1(1 << 16, decode_content=True), b"")
            if read1 is not None
            else response.iter_content(1 << 16)
        )
        window, in_window = time.monotonic(), 0
        bar = tqdm(total=declared, unit="B", unit_scale=True, desc=label, disable=not progress)
        try:
            for block in chunks:
                got += len(block)
                if got > limit:
                    raise _Failed(
                        f"it sent more than {limit:,} bytes (registered size plus margin); "
                        "stopped there",
                        retry=False,
                    )
                out.write(block)
                digest.update(block)
                bar.update(len(block))
                in_window += len(block)
                if time.monotonic() - window >= STALL_SECONDS:
                    if in_window < STALL_MIN_BYTES:
                        raise _Failed(
                            f"stalled: {in_window:,} bytes in {STALL_SECONDS:g} s after "
                            f"{got:,}{of} bytes"
                        )
                    window, in_window = time.monotonic(), 0
        except _Failed:
            raise
        except Exception as err:  # requests or urllib3 errors of a broken or silent transfer
            chain = f"{type(err).__name__} {err} {type(err.__context__).__name__}".lower()
            if "timed out" in chain or "timeout" in chain:
                raise _stalled(got, of) from None
            raise _Failed(f"the connection broke after {got:,}{of} bytes") from None
        finally:
            bar.close()
        if declared is not None and got < declared:
            raise _Failed(f"the connection closed after {got:,}{of} bytes")
    return digest.hexdigest()


def _download(spec: WeightFile, url: str, target: Path, known_hash, retries, progress) -> None:
    """Stream ``url`` to a temporary file next to ``target``, hash-checked, then renamed.

    Each of the ``1 + retries`` attempts gives up on a stall within :data:`STALL_SECONDS`,
    and no attempt brings more than :func:`size_limit` bytes. Every failure is one
    :class:`WeightsError` line naming the cause; no partial file keeps the final name.
    """
    from .data import temp_file_for

    algorithm, _, expected = (known_hash or "sha256:").partition(":")
    limit = size_limit(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        fd, tmp = temp_file_for(target, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                found = _stream(url, out, limit, algorithm, progress, spec.name)
            if expected and found != expected:
                raise WeightsError(
                    f"{spec.name}: checksum mismatch for {url}: expected {known_hash}, found "
                    f"{algorithm}:{found}; the download was deleted ({target} not written)"
                )
            os.replace(tmp, target)
            return
        except _Failed as err:
            if err.retry and attempt < retries:
                continue
            reason = str(err)
            if reason.startswith("HTTP "):
                raise WeightsError(
                    f"{spec.name}: {url} answered {reason}; {_by_hand(spec, target)}"
                ) from None
            raise WeightsError(
                f"{spec.name}: cannot download {url} ({reason}); {_by_hand(spec, target)}"
            ) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _by_hand(spec: WeightFile, target: Path) -> str:
    return (
        f"download it elsewhere, copy it to {target} by hand, then run "
        f"`runtime-backdoor weights verify {spec.name}`"
    )


def _fetch_file(spec, root, retries, progress) -> tuple[Path, str]:
    target = destination(spec, root)
    if target.is_file() and _matches(target, spec.checksum):
        return target, "present, checksum ok"
    url = source_url(spec)
    _download(spec, url, target, spec.checksum, retries, progress)
    _write_record(
        root,
        spec.name,
        {
            "url": url,
            "path": str(target),
            "size": target.stat().st_size,
            "sha256": _hash(target),
            "checksum": spec.checksum,
            "fetched": _now(),
        },
    )
    return target, f"downloaded, {spec.checksum} ok"


def _matches(path: Path, checksum: str | None) -> bool:
    algorithm, _, value = checksum.partition(":")
    return _hash(path, algorithm) == value


def _fetch_zip(spec, root, retries, progress) -> tuple[Path, str]:
    folder = destination(spec, root)
    recorded = _read_record(root).get(spec.name, {})
    inside = folder / spec.check
    if inside.is_file() and recorded.get("check_sha256") == _hash(inside):
        return folder, "present, matches the SHA-256 recorded on its first fetch"
    url = source_url(spec)
    archive = root / f".{spec.name}.zip"
    _download(spec, url, archive, None, retries, progress)
    try:
        zip_sha256 = _hash(archive)
        _extract(archive, folder, spec.check)
    finally:
        archive.unlink(missing_ok=True)
    check_sha256 = _hash(inside)
    _write_record(
        root,
        spec.name,
        {
            "url": url,
            "path": str(folder),
            "zip_sha256": zip_sha256,
            "check": spec.check,
            "check_sha256": check_sha256,
            "fetched": _now(),
            "note": "no published checksum: SHA-256 computed on this first fetch",
        },
    )
    return folder, (
        f"downloaded and unzipped; no published checksum, so the SHA-256 computed now "
        f"(zip {zip_sha256}, {spec.check} {check_sha256}) is recorded in "
        f"{root / RECORD_NAME} and later verifies compare against it"
    )


def _extract(archive: Path, folder: Path, check: str) -> None:
    """Unzip ``archive``'s top folder to ``folder`` (a temporary folder renamed at the end)."""
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        tops = {n.split("/", 1)[0] for n in names}
        prefix = f"{tops.pop()}/" if len(tops) == 1 and all("/" in n for n in names) else ""
        if f"{prefix}{check}" not in names:
            raise WeightsError(f"{archive.name} holds no {check} (found {len(names)} files)")
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's owner-only mode would outlive the rename
        try:
            for n in names:
                relative = Path(n[len(prefix) :])
                if relative.is_absolute() or ".." in relative.parts:
                    raise WeightsError(f"{archive.name}: unsafe member path {n!r}")
                out = tmp / relative
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(n) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _fetch_hub(spec, root, endpoint: str | None = None) -> tuple[Path, str]:
    import fnmatch

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = destination(spec, root)
    recorded = _read_record(root).get(spec.name, {})
    if recorded.get("files") and _hub_files_ok(folder, recorded["files"]) == []:
        return folder, f"present, commit {recorded.get('commit')}, SHA-256 ok"
    api = HfApi(endpoint=endpoint)
    try:
        info = api.model_info(spec.source, files_metadata=True)
        wanted = {
            s.rfilename: s
            for s in info.siblings or []
            if any(fnmatch.fnmatch(s.rfilename, p) for p in spec.hub_files)
        }
        absent = [p for p in spec.hub_files if not any(fnmatch.fnmatch(f, p) for f in wanted)]
        if absent:
            raise WeightsError(f"{spec.name}: {spec.source}@{info.sha} has no {', '.join(absent)}")
        snapshot_download(
            spec.source,
            revision=info.sha,
            allow_patterns=sorted(wanted),
            local_dir=folder,
            endpoint=endpoint,
        )
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, *_http_client_errors()) as err:
        if isinstance(err, OfflineModeIsEnabled):
            reason = "HF_HUB_OFFLINE is set: unset it to download, as `make weights` does"
        else:
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise WeightsError(
            f"{spec.name}: cannot download {spec.source} from the hub ({reason}); on a machine "
            f"with internet run `hf download {spec.source} {' '.join(spec.hub_files)} "
            f"--local-dir {folder}`, copy that folder to {folder} here by hand, then run "
            f"`runtime-backdoor weights verify {spec.name}`"
        ) from None
    files = {}
    for fname, sibling in sorted(wanted.items()):
        sha256 = _hash(folder / fname)
        expected = sibling.lfs.sha256 if sibling.lfs is not None else None
        if expected is not None and sha256 != expected:
            (folder / fname).unlink()
            raise WeightsError(
                f"{spec.name}: checksum mismatch for {spec.source}/{fname}: expected "
                f"sha256:{expected}, found sha256:{sha256}; the file was deleted"
            )
        files[fname] = {"size": (folder / fname).stat().st_size, "sha256": sha256}
    _write_record(
        root,
        spec.name,
        {
            "repo": spec.source,
            "endpoint": api.endpoint,
            "commit": info.sha,
            "path": str(folder),
            "files": files,
            "fetched": _now(),
        },
    )
    return folder, f"downloaded {len(files)} files at commit {info.sha}"


def _http_client_errors() -> tuple[type[Exception], ...]:
    """Connection errors of the HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    errors = []
    for module, name in (
        ("httpx2", "HTTPError"),
        ("httpx", "HTTPError"),
        ("requests", "RequestException"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_files_ok(folder: Path, files: dict) -> list[str]:
    """The problems of a hub folder against its record (empty: all files match)."""
    problems = []
    for fname, meta in files.items():
        path = folder / fname
        if not path.is_file():
            problems.append(f"{fname} missing")
        elif path.stat().st_size != meta["size"] or _hash(path) != meta["sha256"]:
            problems.append(f"{fname} differs from the recorded SHA-256")
    return problems


# --------------------------------------------------------------------------- verify


def verify(name: str, root: Path | None = None) -> tuple[bool, str]:
    """(ok, one line) for the local copy of ``name``; never downloads."""
    spec = _spec(name)
    root = root or models_dir()
    dest = destination(spec, root)
    fetch_hint = f"run `runtime-backdoor weights fetch {name}`"
    if spec.kind == "file":
        if not dest.is_file():
            return False, f"missing: {dest} ({fetch_hint})"
        algorithm, _, expected = spec.checksum.partition(":")
        found = _hash(dest, algorithm)
        if found != expected:
            return False, (
                f"checksum mismatch: {dest}: expected {algorithm}:{expected}, found "
                f"{algorithm}:{found} (delete it and {fetch_hint})"
            )
        return True, f"ok: {dest} ({spec.checksum})"
    recorded = _read_record(root).get(name)
    if spec.kind == "zip":
        inside = dest / spec.check
        if not inside.is_file():
            return False, f"missing: {inside} ({fetch_hint})"
        found = _hash(inside)
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
    problems = _hub_files_ok(dest, recorded["files"])
    if problems:
        return False, f"{dest}: {'; '.join(problems)} ({fetch_hint})"
    return True, f"ok: {dest} (commit {recorded['commit']}, {len(recorded['files'])} files)"


# --------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``weights list | fetch NAME... | verify [NAME...]`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "weights", help="list, download and verify model weights (into models/)"
    )
    actions = parser.add_subparsers(dest="weights_command", required=True)
    actions.add_parser("list", help="every known file: size, checksum, licence, destination")
    fetch_parser = actions.add_parser("fetch", help="download (skipped when a good copy is there)")
    fetch_parser.add_argument("names", nargs="+", metavar="NAME", help=", ".join(REGISTRY))
    verify_parser = actions.add_parser("verify", help="check local copies (all when no NAME)")
    verify_parser.add_argument("names", nargs="*", metavar="NAME")
    return parser


def run(args) -> int:
    """Handle ``runtime-backdoor weights ...``; errors print one line and return 2."""
    try:
        if args.weights_command == "list":
            print(listing())
            return 0
        for name in args.names:
            _spec(name)
        if args.weights_command == "fetch":
            for name in args.names:
                path, what = fetch(name)
                print(f"{name}: {what} -> {path}")
            return 0
        # no NAME: check what is there; files never fetched are listed, not failed
        names = args.names or [n for n in REGISTRY if _present(REGISTRY[n])]
        results = [(name, *verify(name)) for name in names]
        for name, _, line in results:
            print(f"{name}: {line}")
        for name in [n for n in REGISTRY if n not in names]:
            print(f"{name}: not fetched (`runtime-backdoor weights fetch {name}`)")
        return 0 if all(ok for _, ok, _ in results) else 1
    except WeightsError as err:
        print(f"runtime-backdoor weights: error: {err}", file=sys.stderr)
        return 2


def _present(spec: WeightFile) -> bool:
    return primary_path(spec).exists() or spec.name in _read_record(models_dir())


def listing(root: Path | None = None) -> str:
    lines = []
    for spec in REGISTRY.values():
        size = f"{spec.size:,} bytes" if spec.size else "size not published"
        checksum = spec.checksum or (
            "per-file SHA-256 from the hub, commit recorded"
            if spec.kind == "hub"
            else "none published: SHA-256 recorded on first fetch"
        )
        default = "  [make weights]" if spec.name in DEFAULT_SET else ""
        lines += [
            f"{spec.name}{default}: {spec.description}",
            f"    source   {spec.source}" + (" (hub)" if spec.kind == "hub" else ""),
            f"    size     {size}",
            f"    checksum {checksum}",
            f"    licence  {spec.licence}",
            f"    goes to  {primary_path(spec, root)}",
        ]
    return "\n".join(lines)
