"""Archive download (resume, restart, failures) from a loopback HTTP server, and safe CUB extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest

from finegrain.data.download import download, md5sum, prepare_cub, safe_extract, verify_md5
from finegrain.errors import FinegrainError

PAYLOAD = bytes(range(256)) * 400  # 100 KiB, enough for many small chunks
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
CUB_FILES = {
    "CUB_200_2011/images.txt": b"1 001.Alpha/a.jpg\n2 001.Alpha/b.jpg\n",
    "CUB_200_2011/classes.txt": b"1 001.Alpha\n",
    "CUB_200_2011/images/001.Alpha/a.jpg": b"\xff\xd8\xff\xe0fake-jpeg-a",
    "CUB_200_2011/images/001.Alpha/b.jpg": b"\xff\xd8\xff\xe0fake-jpeg-b",
    "attributes.txt": b"1 has_bill_shape::curved\n",
}


def make_tgz(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    """A gzipped tar holding `files` (name -> bytes) and the bare `extra` members (links, devices)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.fixture
def cub_tgz(tmp_path) -> Path:
    return make_tgz(tmp_path / "CUB_200_2011.tgz", CUB_FILES)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.payload`; honours Range unless `server.honour_range` is False; after sending
    `server.cut_after` bytes of one response it drops the connection (then serves normally again)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server, body = self.server, self.server.payload
        server.ranges.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range") and server.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut, server.cut_after = server.cut_after, None
        self.wfile.write(body[start:] if cut is None else body[start : start + cut])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A loopback HTTP server on an ephemeral port, in a thread; shut down after the test."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.payload, httpd.honour_range, httpd.cut_after, httpd.ranges = PAYLOAD, True, None, []
    httpd.url = f"http://127.0.0.1:{httpd.server_port}/CUB_200_2011.tgz"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.tgz"


def test_md5sum_and_verify(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert md5sum(path, chunk_size=1000) == PAYLOAD_MD5
    verify_md5(path, PAYLOAD_MD5.upper())
    with pytest.raises(FinegrainError, match=f"{PAYLOAD_MD5}.*expected 0+") as err:
        verify_md5(path, "0" * 32)
    assert str(path) in str(err.value)


def test_download_fresh(server, tmp_path):
    dest = tmp_path / "sub" / "a.tgz"
    assert download(server.url, dest, md5=PAYLOAD_MD5, chunk_size=4096) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "a.tgz.part").exists()
    assert server.ranges == [None]


def test_download_resumes_partial_file(server, tmp_path):
    dest = tmp_path / "a.tgz"
    (tmp_path / "a.tgz.part").write_bytes(PAYLOAD[:30_000])
    download(server.url, dest, md5=PAYLOAD_MD5, chunk_size=4096, progress=False)
    assert server.ranges == ["bytes=30000-"]
    assert md5sum(dest) == PAYLOAD_MD5


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "a.tgz"
    (tmp_path / "a.tgz.part").write_bytes(b"stale bytes that must not be kept")
    download(server.url, dest, md5=PAYLOAD_MD5, progress=False)
    assert server.ranges == ["bytes=33-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_finishes_whole_part_file_without_refetching(server, tmp_path):
    # A run stopped after the last byte but before verifying: the server answers 416 with the full size.
    dest = tmp_path / "a.tgz"
    (tmp_path / "a.tgz.part").write_bytes(PAYLOAD)
    download(server.url, dest, md5=PAYLOAD_MD5, progress=False)
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_dropped_connection_keeps_part_then_resumes(server, tmp_path):
    server.cut_after = 10_000
    dest = tmp_path / "a.tgz"
    with pytest.raises(FinegrainError, match="10000 of 102400 bytes.*kept.*--archive PATH"):
        download(server.url, dest, md5=PAYLOAD_MD5, progress=False)
    assert (tmp_path / "a.tgz.part").read_bytes() == PAYLOAD[:10_000]
    download(server.url, dest, md5=PAYLOAD_MD5, progress=False)
    assert server.ranges == [None, "bytes=10000-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_wrong_md5_deletes_bad_file(server, tmp_path):
    dest = tmp_path / "a.tgz"
    with pytest.raises(FinegrainError, match=f"MD5 is {PAYLOAD_MD5}, expected f+"):
        download(server.url, dest, md5="f" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_unreachable_url_fails_fast_and_keeps_part(tmp_path):
    url = closed_port_url()
    part = tmp_path / "a.tgz.part"
    part.write_bytes(b"partial")
    start = time.monotonic()
    with pytest.raises(FinegrainError, match="could not download .*kept.*--archive PATH") as err:
        download(url, tmp_path / "a.tgz", timeout=2.0, progress=False)
    assert time.monotonic() - start < 5
    assert url in str(err.value)
    assert part.read_bytes() == b"partial"


def test_download_skips_existing_file_but_verifies_it(tmp_path):
    dest = tmp_path / "a.tgz"
    dest.write_bytes(PAYLOAD)
    assert download(closed_port_url(), dest, md5=PAYLOAD_MD5) == dest  # no request is made
    with pytest.raises(FinegrainError, match="expected 0+"):
        download(closed_port_url(), dest, md5="0" * 32)


def test_prepare_cub_from_archive(cub_tgz, tmp_path):
    dest = tmp_path / "data"
    root = prepare_cub(dest, archive=cub_tgz, md5=md5sum(cub_tgz))
    assert root == dest / "CUB_200_2011"
    for name, data in CUB_FILES.items():
        assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in dest.iterdir()) == ["CUB_200_2011", "attributes.txt"]  # no scratch left


def test_prepare_cub_wrong_md5_extracts_nothing(cub_tgz, tmp_path):
    with pytest.raises(FinegrainError, match=f"MD5 is {md5sum(cub_tgz)}, expected 0+"):
        prepare_cub(tmp_path / "data", archive=cub_tgz, md5="0" * 32)
    assert not (tmp_path / "data").exists()


def test_prepare_cub_skips_complete_folder(cub_tgz, tmp_path, caplog):
    dest = tmp_path / "data"
    prepare_cub(dest, archive=cub_tgz, md5=None)
    with caplog.at_level(logging.INFO, logger="finegrain.data.download"):
        root = prepare_cub(dest, archive=tmp_path / "missing.tgz", md5=None)
    assert root == dest / "CUB_200_2011"
    assert "skipping download and extraction" in caplog.text


def test_prepare_cub_downloads_then_extracts(cub_tgz, server, tmp_path):
    server.payload = cub_tgz.read_bytes()
    root = prepare_cub(tmp_path / "data", url=server.url, md5=md5sum(cub_tgz))
    for name, data in CUB_FILES.items():
        assert (tmp_path / "data" / name).read_bytes() == data
    assert root == tmp_path / "data" / "CUB_200_2011"
    assert (tmp_path / "data" / "CUB_200_2011.tgz").is_file()


def test_prepare_cub_missing_archive(tmp_path):
    with pytest.raises(FinegrainError, match="missing.tgz does not exist"):
        prepare_cub(tmp_path / "data", archive=tmp_path / "missing.tgz")


def test_prepare_cub_rejects_archive_without_images_txt(tmp_path):
    archive = make_tgz(tmp_path / "other.tgz", {"CUB_200_2011/classes.txt": b"1 001.Alpha\n"})
    with pytest.raises(FinegrainError, match="does not contain CUB_200_2011/images.txt"):
        prepare_cub(tmp_path / "data", archive=archive, md5=None)
    assert list((tmp_path / "data").iterdir()) == []


def test_prepare_cub_does_not_overwrite_incomplete_folder(cub_tgz, tmp_path):
    mine = tmp_path / "data" / "CUB_200_2011" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    with pytest.raises(FinegrainError, match="CUB_200_2011 already exists.*Move it away"):
        prepare_cub(tmp_path / "data", archive=cub_tgz, md5=None)
    assert mine.read_text() == "keep me"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["CUB_200_2011"]


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (tar_member("../evil"), "which is outside the destination"),
        (tar_member("CUB_200_2011/../../evil"), "which is outside the destination"),
        (tar_member("/abs/evil"), "(absolute path)"),
        (tar_member("CUB_200_2011/etc", tarfile.SYMTYPE, "/etc"), "is a link to an absolute path"),
        (tar_member("CUB_200_2011/up", tarfile.SYMTYPE, "../../.."), "would link to"),
        (tar_member("CUB_200_2011/hard", tarfile.LNKTYPE, "../evil"), "would link to"),
        (tar_member("CUB_200_2011/tty", tarfile.CHRTYPE), "is a special file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-abs", "symlink-rel", "hardlink", "device"],
)
def test_safe_extract_refuses_unsafe_member(tmp_path, member, reason):
    archive = make_tgz(tmp_path / "bad.tgz", CUB_FILES, extra=[member])
    dest = tmp_path / "out" / "dest"
    with pytest.raises(FinegrainError, match="unsafe") as err:
        safe_extract(archive, dest)
    assert repr(member.name) in str(err.value) and reason in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.tgz", "dest", "out"]  # nothing written
    with pytest.raises(FinegrainError, match="unsafe"):
        prepare_cub(tmp_path / "data", archive=archive, md5=None)
    assert list((tmp_path / "data").iterdir()) == []


def test_safe_extract_follows_links_extracted_before(tmp_path):
    # Checked alone, the second member stays inside; once the link exists it leads out: the filter that runs
    # while extracting refuses it.
    link, through = tar_member("CUB_200_2011/here", tarfile.SYMTYPE, "."), tar_member("CUB_200_2011/here/../../evil")
    archive = make_tgz(tmp_path / "bad.tgz", CUB_FILES, extra=[link, through])
    with pytest.raises(FinegrainError, match="unsafe .*which is outside the destination") as err:
        safe_extract(archive, tmp_path / "out" / "dest")
    assert repr(through.name) in str(err.value)
    assert not (tmp_path / "out" / "evil").exists()


def test_safe_extract_allows_links_inside(tmp_path):
    link = tar_member("CUB_200_2011/same.txt", tarfile.SYMTYPE, "images.txt")
    safe_extract(make_tgz(tmp_path / "ok.tgz", CUB_FILES, extra=[link]), tmp_path / "out")
    same = tmp_path / "out" / "CUB_200_2011" / "same.txt"
    assert same.is_symlink() and same.read_bytes() == CUB_FILES["CUB_200_2011/images.txt"]


def test_safe_extract_damaged_archive(cub_tgz, tmp_path):
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(cub_tgz.read_bytes()[:-60])
    with pytest.raises(FinegrainError, match="could not be unpacked.*download it again"):
        safe_extract(cut, tmp_path / "out")
