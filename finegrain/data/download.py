"""Download, verify and safely unpack the official CUB-200-2011 archive.

Downloads stream into `<dest>.part` and resume with an HTTP Range request, so a dropped connection on the
1.1 GB archive costs only the missing bytes. Archives are unpacked into a scratch folder and moved into place
only when complete, so a `CUB_200_2011/images.txt` on disk always means a whole extraction.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import ssl
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from finegrain.errors import FinegrainError

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_FOLDER = "CUB_200_2011"

# What a flaky connection can raise while opening or reading; disk errors (plain OSError) are not among them.
_NETWORK_ERRORS = (
    urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError,
)  # fmt: skip
# What a damaged or truncated .tgz raises while being read.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)

log = logging.getLogger(__name__)


def md5sum(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Raise FinegrainError unless the file's MD5 digest is `expected` (any letter case)."""
    actual = md5sum(path)
    if actual != expected.lower():
        raise FinegrainError(
            f"{path} is damaged or not the expected file: its MD5 is {actual}, expected {expected.lower()}. "
            "Delete it and run again (without `--archive`) to download a fresh copy, or pass a good copy "
            "with `--archive PATH`."
        )


def download(url: str, dest: Path, md5: str | None = None, chunk_size: int = 1 << 20, timeout: float = 30.0,
             progress: bool = True) -> Path:  # fmt: skip
    """Download `url` to `dest`, resuming a partial `<dest>.part`; verify `md5` if given; return `dest`.

    An existing `dest` is not fetched again (only verified), because it is only ever written whole.
    """
    dest = Path(dest)
    if dest.is_file():
        log.info("%s is already downloaded", dest)
        if md5 is not None:
            verify_md5(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        _fetch(url, part, chunk_size, timeout, progress)
    except _NETWORK_ERRORS as e:
        raise FinegrainError(
            f"could not download {url} ({e}). The partial file {part} is kept: run the same command again to "
            "resume, or fetch the archive another way and pass it with `--archive PATH`."
        ) from None
    if md5 is not None and (actual := md5sum(part, chunk_size)) != md5.lower():
        # Resuming cannot repair bad bytes, so the next run must start over.
        part.unlink()
        raise FinegrainError(
            f"the download of {url} is damaged: its MD5 is {actual}, expected {md5.lower()}. The bad file "
            "was deleted; run the same command again, or pass a good local copy with `--archive PATH`."
        )
    part.replace(dest)
    return dest


def _fetch(url: str, part: Path, chunk_size: int, timeout: float, progress: bool) -> None:
    """Stream `url` into `part`, appending to the bytes it already holds when the server honours Range."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        if e.headers.get("Content-Range") == f"bytes */{offset}":
            return  # an earlier run received every byte but stopped before verifying
        log.info("%s is longer than %s; downloading from the start", part, url)
        part.unlink()
        _fetch(url, part, chunk_size, timeout, progress)
        return
    with response:
        if offset and response.status != 206:
            log.info("%s does not support resuming; downloading from the start", url)
            offset = 0
        total = _total_size(response, offset)
        with part.open("ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name,
            disable=not progress,
        ) as bar:  # fmt: skip
            while chunk := response.read(chunk_size):
                out.write(chunk)
                bar.update(len(chunk))
    # http.client returns a short body without complaint when the connection drops.
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Whole file size from Content-Range (206) or Content-Length (200); None if the server omits it."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range)
        if match is None or int(match[1]) != offset:
            raise ConnectionError(f"asked for bytes from {offset}, the server sent range {content_range!r}")
        return None if match[2] == "*" else int(match[2])
    length = response.headers.get("Content-Length")
    return int(length) if length else None


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a (gzipped) tar into `dest` with tarfile's "data" filter, which refuses members that would land
    outside it, links that point outside it and device files. Beyond the filter, every member is checked
    before anything is written, and absolute names are refused rather than made relative."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                if os.path.isabs(member.name):
                    raise _refusal(archive, member.name, "absolute path")
                tarfile.data_filter(member, str(dest))  # raises the FilterError that extraction would
            # The filter runs again while extracting, where it also follows the links extracted before.
            tar.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as e:
        raise _refusal(archive, e.tarinfo.name, str(e)) from None
    except _ARCHIVE_ERRORS as e:
        raise FinegrainError(
            f"{archive} could not be unpacked ({e}): it is damaged, incomplete or not a tar archive. "
            "Delete it and download it again."
        ) from None


def _refusal(archive: Path, name: str, reason: str) -> FinegrainError:
    return FinegrainError(
        f"refusing to extract {archive}: member {name!r} is unsafe ({reason}). "
        "Use an archive from a trusted source, such as the official download."
    )


def prepare_cub(dest_dir: str | Path, archive: str | Path | None = None, url: str = CUB_URL,
                md5: str | None = CUB_MD5) -> Path:  # fmt: skip
    """Make `dest_dir/CUB_200_2011` from a local `archive` or by downloading `url`; return that folder.

    The archive is checked against `md5` (skipped when None). Nothing is done if the folder already holds
    images.txt. The dataset check is left to the caller.
    """
    dest_dir = Path(dest_dir)
    root = dest_dir / CUB_FOLDER
    if (root / "images.txt").is_file():
        log.info("%s is already unpacked (images.txt present); skipping download and extraction", root)
        return root
    if archive is None:
        archive = download(url, dest_dir / f"{CUB_FOLDER}.tgz", md5=md5)
    else:
        archive = Path(archive)
        if not archive.is_file():
            raise FinegrainError(
                f"archive {archive} does not exist: pass the path of a downloaded {CUB_FOLDER}.tgz, "
                "or leave out `--archive` to download it."
            )
        if md5 is not None:
            verify_md5(archive, md5)
    log.info("unpacking %s into %s", archive, dest_dir)
    _unpack_cub(archive, dest_dir)
    return root


def _unpack_cub(archive: Path, dest_dir: Path) -> None:
    """Extract into a scratch folder beside the result, then move the top-level entries into `dest_dir` only
    once the archive is known to be CUB and nothing would be overwritten."""
    scratch = dest_dir / f".{CUB_FOLDER}.unpacking"
    shutil.rmtree(scratch, ignore_errors=True)  # left over by an interrupted run
    try:
        safe_extract(archive, scratch)
        if not (scratch / CUB_FOLDER / "images.txt").is_file():
            raise FinegrainError(
                f"archive {archive} does not contain {CUB_FOLDER}/images.txt: it is not the CUB-200-2011 "
                f"archive. Download the official one from {CUB_URL}."
            )
        entries = sorted(scratch.iterdir())
        for entry in entries:
            if os.path.lexists(dest_dir / entry.name):
                raise FinegrainError(
                    f"cannot unpack {archive}: {dest_dir / entry.name} already exists (left by an earlier, "
                    "incomplete run?). Move it away or delete it, then run again."
                )
        for entry in entries:
            entry.rename(dest_dir / entry.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
