"""Downloads of the weights registry (:mod:`runtime_backdoor.weights`) and the
``runtime-backdoor weights`` command.

    runtime-backdoor weights fetch big-lama clip-vit-b-32

Every file, plain URL or hub repository file alike, is streamed to a hidden ``.NAME.part``
file next to its destination, hash-checked, then renamed: a partial file never has the final
name. A fetch that was killed leaves its ``.part``; the next fetch of the same file resumes it
with an HTTP Range request (when the file has a published hash to verify the whole against and
the server honours Range; otherwise it starts over), and ``.part`` files of other names older
than :data:`PART_MAX_AGE` are removed. An attempt gives up when the server stalls (:data:`STALL_SECONDS`), a download stops at the
registered size plus a small margin, and no file spends more than :data:`GIVE_UP_SECONDS`
failing in all. ``huggingface_hub`` resolves the hub commit and each file's size and
SHA-256 (it has no stall or size bound of its own, so its downloader is not used);
``HF_ENDPOINT`` replaces the hub, ``RUNTIME_BACKDOOR_WEIGHTS_MIRROR`` every plain URL.

The module is just over 600 lines and ``_stream`` near 100 because resuming, the stall and size
bounds and the lock on the ``.part`` file have to act on the same open response and file handle;
split apart, each would need the others' state passed back and forth.
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
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from .weights import (
    MIRROR_ENV,
    RECORD_NAME,
    REGISTRY,
    WeightFile,
    WeightsError,
    destination,
    digest_matches,
    entry,
    file_hash,
    hub_problems,
    models_dir,
    primary_path,
    read_record,
    verify,
)

#: what `make weights` fetches: Big-LaMa, CLIP-FID's CLIP and LPIPS-alex's backbone
DEFAULT_SET = ("big-lama", "clip-vit-b-32", "lpips-alex")


def source_url(spec: WeightFile) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    if spec.kind == "hub" or not mirror:
        return spec.source
    return f"{mirror.rstrip('/')}/{spec.source.rsplit('/', 1)[-1]}"


def _write_record(root: Path, name: str, entry: dict) -> None:
    from .data import temp_file_for

    record = read_record(root)
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
    spec = entry(name)
    root = root or models_dir()
    if spec.kind == "file":
        return _fetch_file(spec, root, retries, progress)
    if spec.kind == "zip":
        return _fetch_zip(spec, root, retries, progress)
    return _fetch_hub(spec, root, os.environ.get("HF_ENDPOINT") or None, retries, progress)


#: a download that receives no data for this long is given up (one attempt; then retried)
STALL_SECONDS = 30.0
#: ... and so is one that receives less than this in any STALL_SECONDS (a trickle)
STALL_MIN_BYTES = 16 << 10
#: bytes accepted beyond a registered size: max(SIZE_MARGIN, 1 %)
SIZE_MARGIN = 64 << 10
#: the cap of an entry without a registered size
MAX_UNREGISTERED_BYTES = 4 << 30
#: ``.part`` files of other downloads left this long (a killed fetch never resumed) are removed
PART_MAX_AGE = 24 * 3600.0
#: no file spends longer than this failing: a stalled attempt is retried only if another
#: whole stall still fits (with 30 s stalls: two attempts, about 62 s)
GIVE_UP_SECONDS = 90.0


class _Failed(Exception):
    """One attempt failed; ``retry``: whether another attempt may help."""

    def __init__(self, reason: str, retry: bool = True):
        super().__init__(reason)
        self.retry = retry


def size_limit(spec: WeightFile) -> int:
    """The most bytes a download of ``spec`` may bring: its registered size plus a margin."""
    return _limit_for(spec.size)


def _limit_for(size: int | None) -> int:
    if not size:
        return MAX_UNREGISTERED_BYTES
    return size + max(SIZE_MARGIN, size // 100)


def _connect_reason(err) -> str:
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(err))
    return f"could not connect: {found.group(1).strip()}" if found else "could not connect"


def _stalled(got: int, of: str) -> _Failed:
    return _Failed(f"stalled: no data for {STALL_SECONDS:g} s after {got:,}{of} bytes")


def _stream(
    url: str, out, limit: int, algorithm: str, progress: bool, label: str, headers=None,
    offset: int = 0,
) -> tuple[str, int]:  # fmt: skip
    """One attempt: ``url`` into the open file ``out`` (``r+b``); returns the hex digest of the
    whole file and the offset it resumed from. With ``offset``, the bytes ``out`` already holds
    up to there are kept when the server answers the Range request for the rest (206); on any
    other answer ``out`` is emptied and filled from the start. Gives up on a stall (no data,
    or under STALL_MIN_BYTES, for STALL_SECONDS), a short body and more than ``limit`` bytes,
    each as a :class:`_Failed` that says so."""
    import requests
    from tqdm.auto import tqdm

    if offset:
        headers = {**(headers or {}), "Range": f"bytes={offset}-"}
    try:
        response = requests.get(
            url, stream=True, timeout=(STALL_SECONDS, STALL_SECONDS), headers=headers
        )
    except requests.ConnectTimeout:
        raise _Failed(f"no answer within {STALL_SECONDS:g} s") from None
    except requests.ReadTimeout:
        raise _Failed(f"stalled: no response within {STALL_SECONDS:g} s") from None
    except requests.ConnectionError as err:
        raise _Failed(_connect_reason(err)) from None
    with response:
        if offset and not _resumes(response, offset):
            if response.status_code == 416 or response.status_code == 206:
                response.close()  # the range does not fit this file: from the start instead
                out.seek(0)
                out.truncate()
                return _stream(url, out, limit, algorithm, progress, label, headers={
                    k: v for k, v in headers.items() if k != "Range"}, offset=0)  # fmt: skip
            offset = 0  # the server ignored the Range request: the whole file comes
        if response.status_code >= 400:
            raise _Failed(f"HTTP {response.status_code}", retry=response.status_code >= 500)
        declared = response.headers.get("Content-Length")
        declared = offset + int(declared) if declared and declared.isdigit() else None
        if declared is not None and declared > limit:
            raise _Failed(
                f"it announced {declared:,} bytes, more than the {limit:,} expected "
                "(registered size plus margin); nothing was downloaded",
                retry=False,
            )
        digest, got = hashlib.new(algorithm), offset
        out.seek(0)
        if offset:  # the bytes already there count towards the hash
            left = offset
            while left:
                block = out.read(min(left, 1 << 20))
                digest.update(block)
                left -= len(block)
        out.truncate(offset)
        out.seek(offset)
        of = f" of {declared:,}" if declared is not None else ""
        read1 = getattr(response.raw, "read1", None)
        chunks = (
            iter(lambda: read1(1 << 16, decode_content=True), b"")
            if read1 is not None
            else response.iter_content(1 << 16)
        )
        window, in_window = time.monotonic(), 0
        bar = tqdm(
            total=declared, initial=offset, unit="B", unit_scale=True, desc=label,
            disable=not progress,
        )  # fmt: skip
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
    out.flush()
    return digest.hexdigest(), offset


def _resumes(response, offset: int) -> bool:
    """Whether ``response`` is the rest of the file from ``offset`` (206 with a Content-Range
    that starts there)."""
    if response.status_code != 206:
        return False
    found = re.fullmatch(
        r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip()
    )
    return found is not None and int(found.group(1)) == offset


def part_path(target: Path) -> Path:
    """The one ``.part`` file a download of ``target`` writes (the same name every time, so a
    fetch that was killed is found, and resumed, by the next)."""
    return target.with_name(f".{target.name}.part")


def _lock(path: Path, create: bool = True) -> int | None:
    """An open descriptor of ``path`` (``r+``) holding an exclusive lock, or None when another
    process holds it (a fetch of the same file under way) or ``path`` is gone."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:  # renamed or removed meanwhile
            raise BlockingIOError
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_parts(folder: Path, keep: Path | None = None, max_age: float = PART_MAX_AGE):
    """Remove the ``.part`` files in ``folder`` that no fetch is writing (unlocked) and that
    are older than ``max_age`` seconds, or, whatever their age, that are earlier partial copies
    of ``keep``'s target under another name; ``keep`` itself stays (it is resumed)."""
    # earlier versions named them .TARGET.XXXXXXXX.part (a random infix), one per attempt
    legacy = (
        re.compile(re.escape(f".{keep.name[1 : -len('.part')]}.") + r"[A-Za-z0-9_]{8}\.part")
        if keep is not None
        else None
    )
    now = time.time()
    for path in folder.glob(".*.part") if folder.is_dir() else []:
        if path == keep or not path.is_file():
            continue
        try:
            old = now - path.stat().st_mtime > max_age
        except FileNotFoundError:
            continue
        if not (old or (legacy is not None and legacy.fullmatch(path.name))):
            continue
        fd = _lock(path, create=False)
        if fd is not None:
            try:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)


def _download(
    spec: WeightFile, url: str, target: Path, known_hash, retries, progress, *, limit=None,
    headers=None, by_hand: str | None = None,
) -> None:  # fmt: skip
    """Stream ``url`` to :func:`part_path` next to ``target``, hash-checked, then renamed.

    A ``.part`` left by a fetch that was killed is resumed (Range request) when there is a
    hash to verify the whole file against; a resumed file whose hash does not match is
    downloaded again from the start before the mismatch counts. Each of the ``1 + retries``
    attempts gives up on a stall within :data:`STALL_SECONDS`, resuming where the last one
    stopped, a stalled attempt is retried only while :data:`GIVE_UP_SECONDS` leaves room for
    another stall, and no attempt brings more than ``limit`` bytes (default
    :func:`size_limit`). Every failure is one :class:`WeightsError` line naming the cause and
    removes the ``.part``; no partial file keeps the final name.
    """
    algorithm, _, expected = (known_hash or "sha256:").partition(":")
    limit = size_limit(spec) if limit is None else limit
    by_hand = by_hand or _by_hand(spec, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(target)
    remove_stale_parts(target.parent, keep=part)
    fd = _lock(part)
    if fd is None:
        raise WeightsError(
            f"{spec.name}: another fetch is writing {part}; wait for it to end, then fetch again"
        )
    start, done, interrupted = time.monotonic(), False, False
    try:
        with os.fdopen(fd, "r+b") as out:
            for attempt in range(retries + 1):
                # resume only what a hash will check; without one, start over
                offset = out.seek(0, os.SEEK_END) if expected else 0
                try:
                    found, resumed = _stream(
                        url, out, limit, algorithm, progress, spec.name, headers, offset
                    )
                    if expected and resumed and not digest_matches(found, expected):
                        found, _ = _stream(url, out, limit, algorithm, progress, spec.name, headers)  # fmt: skip
                    if expected and not digest_matches(found, expected):
                        raise WeightsError(
                            f"{spec.name}: checksum mismatch for {url}: expected {known_hash}, "
                            f"found {algorithm}:{found}; the download was deleted ({target} not "
                            "written)"
                        )
                    os.replace(part, target)
                    done = True
                    return
                except _Failed as err:
                    room = time.monotonic() - start + STALL_SECONDS <= GIVE_UP_SECONDS
                    if err.retry and attempt < retries and room:
                        continue
                    reason = str(err)
                    if reason.startswith("HTTP "):
                        raise WeightsError(f"{spec.name}: {url} answered {reason}; {by_hand}") from None  # fmt: skip
                    raise WeightsError(
                        f"{spec.name}: cannot download {url} ({reason}); {by_hand}"
                    ) from None
    except (KeyboardInterrupt, SystemExit):
        interrupted = True  # stopped by hand: the next fetch resumes the .part
        raise
    finally:
        if not done and not (interrupted and expected):
            part.unlink(missing_ok=True)


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
            "sha256": file_hash(target),
            "checksum": spec.checksum,
            "fetched": _now(),
        },
    )
    return target, f"downloaded, {spec.checksum} ok"


def _matches(path: Path, checksum: str | None) -> bool:
    algorithm, _, value = checksum.partition(":")
    return digest_matches(file_hash(path, algorithm), value)


def _fetch_zip(spec, root, retries, progress) -> tuple[Path, str]:
    folder = destination(spec, root)
    recorded = read_record(root).get(spec.name, {})
    inside = folder / spec.check
    if inside.is_file() and recorded.get("check_sha256") == file_hash(inside):
        return folder, "present, matches the SHA-256 recorded on its first fetch"
    url = source_url(spec)
    archive = root / f".{spec.name}.zip"
    _download(spec, url, archive, None, retries, progress)
    try:
        zip_sha256 = file_hash(archive)
        _extract(archive, folder, spec.check)
    finally:
        archive.unlink(missing_ok=True)
    check_sha256 = file_hash(inside)
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


def _fetch_hub(spec, root, endpoint: str | None = None, retries=2, progress=True):
    """The hub files ``spec`` needs at the repository's current commit, each streamed like a
    plain URL (stall and size bounds, SHA-256 from the hub's file metadata checked)."""
    import fnmatch

    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers

    folder = destination(spec, root)
    recorded = read_record(root).get(spec.name, {})
    if recorded.get("files") and hub_problems(folder, recorded["files"]) == []:
        return folder, f"present, commit {recorded.get('commit')}, SHA-256 ok"
    api = HfApi(endpoint=endpoint)
    hand = (
        f"on a machine with internet run `hf download {spec.source} {' '.join(spec.hub_files)} "
        f"--local-dir {folder}`, copy that folder to {folder} here by hand, then run "
        f"`runtime-backdoor weights verify {spec.name}`"
    )
    try:
        info = api.model_info(spec.source, files_metadata=True)
        headers = build_hf_headers()
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError, *_http_client_errors()) as err:
        if isinstance(err, OfflineModeIsEnabled):
            reason = "HF_HUB_OFFLINE is set: unset it to download, as `make weights` does"
        else:
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise WeightsError(
            f"{spec.name}: cannot download {spec.source} from the hub ({reason}); {hand}"
        ) from None
    wanted = {
        s.rfilename: s
        for s in info.siblings or []
        if any(fnmatch.fnmatch(s.rfilename, p) for p in spec.hub_files)
    }
    absent = [p for p in spec.hub_files if not any(fnmatch.fnmatch(f, p) for f in wanted)]
    if absent:
        raise WeightsError(f"{spec.name}: {spec.source}@{info.sha} has no {', '.join(absent)}")
    files = {}
    for fname, sibling in sorted(wanted.items()):
        url = hf_hub_url(spec.source, fname, revision=info.sha, endpoint=api.endpoint)
        sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
        target = folder / fname
        if not (target.is_file() and sha256 and file_hash(target) == sha256):
            _download(
                spec, url, target, f"sha256:{sha256}" if sha256 else None, retries, progress,
                limit=_limit_for(sibling.size), headers=headers, by_hand=hand,
            )  # fmt: skip
        files[fname] = {"size": target.stat().st_size, "sha256": file_hash(target)}
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
            entry(name)
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
    return primary_path(spec).exists() or spec.name in read_record(models_dir())


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
