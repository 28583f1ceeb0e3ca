"""Data access: lookup order, verified atomic downloads from a local HTTP server, safe extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import urllib.error
import zipfile
from pathlib import Path

import pytest

from common.data import (
    ChecksumError,
    DataNotFoundError,
    RemoteFile,
    fetch,
    fetch_extracted,
    safe_extract,
)
from common.errors import CS330Error


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


GOOD_ZIP = make_zip({"toy/u.data": b"1\t2\t3\t4\n", "toy/README": b"toy data"})


@pytest.fixture(scope="module")
def server():
    """A local HTTP server on 127.0.0.1 serving a few in-memory files (404 for anything else)."""
    files = {"/toy.zip": GOOD_ZIP, "/evil.zip": make_zip({"../escaped.txt": b"x"})}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CS330_DATA_MIRROR", raising=False)
    monkeypatch.delenv("CS330_DATA_DIR", raising=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_good_download_is_verified_and_placed(server, tmp_path):
    remote = RemoteFile("toy/toy.zip", f"{server}/toy.zip", hashlib.md5(GOOD_ZIP).hexdigest())
    path = fetch(remote, tmp_path)
    assert path == tmp_path / "toy" / "toy.zip"
    assert path.read_bytes() == GOOD_ZIP
    assert leftovers(tmp_path / "toy") == ["toy.zip"]  # no temporary .part file left


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    remote = RemoteFile("toy/toy.zip", f"{server}/toy.zip", "0" * 32)
    with pytest.raises(ChecksumError, match="expected 0000"):
        fetch(remote, tmp_path)
    assert not (tmp_path / "toy").exists()  # neither a .part file nor the folder made for it


def test_missing_file_error_lists_every_place(server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    monkeypatch.setenv("CS330_DATA_MIRROR", str(mirror))
    remote = RemoteFile("toy/absent.zip", f"{server}/absent.zip", "0" * 32)
    with pytest.raises(DataNotFoundError) as info:
        fetch(remote, tmp_path / "data")
    message = str(info.value)
    assert str(tmp_path / "data" / "toy" / "absent.zip") in message
    assert str(mirror / "toy" / "absent.zip") in message
    assert f"{server}/absent.zip" in message and "404" in message
    assert "To fix" in message
    assert not (tmp_path / "data").exists()  # no empty folders left by the failed download


def test_lookup_order_data_dir_then_mirror(tmp_path, monkeypatch):
    mirror, data = tmp_path / "mirror", tmp_path / "data"
    (mirror / "toy").mkdir(parents=True)
    (mirror / "toy" / "f.zip").write_bytes(b"mirror copy")
    monkeypatch.setenv("CS330_DATA_MIRROR", str(mirror))
    remote = RemoteFile("toy/f.zip", "http://127.0.0.1:9/never-used", None)
    assert fetch(remote, data).read_bytes() == b"mirror copy"
    (data / "toy").mkdir(parents=True)
    (data / "toy" / "f.zip").write_bytes(b"local copy")
    assert fetch(remote, data).read_bytes() == b"local copy"


def test_data_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "f.zip").write_bytes(b"env copy")
    monkeypatch.setenv("CS330_DATA_DIR", str(tmp_path))
    assert fetch(RemoteFile("toy/f.zip", "http://127.0.0.1:9/x")).read_bytes() == b"env copy"


def test_path_traversal_archive_is_refused(server, tmp_path):
    archive = fetch(RemoteFile("evil/evil.zip", f"{server}/evil.zip", None), tmp_path)
    with pytest.raises(CS330Error, match="outside"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]  # no temporary folder left


def test_fetch_extracted_downloads_and_extracts_into_data_dir(server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("CS330_DATA_MIRROR", str(mirror))
    remote = RemoteFile("toy.zip", f"{server}/toy.zip", hashlib.md5(GOOD_ZIP).hexdigest())
    folder = fetch_extracted(remote, "toy", "u.data", tmp_path / "data")
    assert folder == tmp_path / "data" / "toy"
    assert (folder / "u.data").read_bytes() == b"1\t2\t3\t4\n"
    assert list(mirror.iterdir()) == []  # nothing written to the mirror
    # An extracted copy in the mirror wins over downloading.
    (mirror / "other").mkdir()
    (mirror / "other" / "u.data").write_text("mirror")
    assert fetch_extracted(RemoteFile("other.zip", "http://127.0.0.1:9/x"), "other", "u.data",
                           tmp_path / "data") == mirror / "other"


def test_failed_download_removes_only_the_folders_it_made(server, tmp_path):
    (tmp_path / "data" / "kept").mkdir(parents=True)
    for relpath in ("a/b/c/absent.zip", "kept/deeper/absent.zip"):
        with pytest.raises(DataNotFoundError, match="404"):
            fetch(RemoteFile(relpath, f"{server}/absent.zip"), tmp_path / "data")
    assert leftovers(tmp_path / "data") == ["kept"]


def test_failed_download_keeps_a_folder_another_process_wrote_to(server, tmp_path, monkeypatch):
    import common.data

    def fail_after_a_sibling_appears(url, dest, md5, timeout):
        (dest.parent / "other.zip").write_bytes(b"written meanwhile")
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(common.data, "_download_to", fail_after_a_sibling_appears)
    with pytest.raises(DataNotFoundError, match="connection refused"):
        fetch(RemoteFile("toy/toy.zip", f"{server}/toy.zip"), tmp_path / "data")
    assert leftovers(tmp_path / "data") == ["other.zip", "toy"]


def test_interrupted_download_leftovers_are_never_reused(server, tmp_path):
    # A killed run can leave its temporary file (or a hand-made toy.zip.part): neither is taken for
    # the file, appended to or removed; a fresh verified download is placed beside them.
    folder = tmp_path / "toy"
    folder.mkdir()
    stale = [folder / ".toy.zip.abc123.part", folder / "toy.zip.part", folder / ".toy.zip.def456.tmp"]
    for path in stale:
        path.write_bytes(GOOD_ZIP[:10])
    remote = RemoteFile("toy/toy.zip", f"{server}/toy.zip", hashlib.md5(GOOD_ZIP).hexdigest())
    assert fetch(remote, tmp_path).read_bytes() == GOOD_ZIP
    assert all(path.read_bytes() == GOOD_ZIP[:10] for path in stale)
    assert leftovers(folder) == sorted([p.name for p in stale] + ["toy.zip"])


def test_full_disk_during_a_download_or_an_extraction_is_one_line(server, tmp_path, monkeypatch):
    """Issue 28: a full data disk was reported as 'could not find' (download) or a traceback (extraction)."""
    import errno

    remote = RemoteFile("toy/toy.zip", f"{server}/toy.zip", hashlib.md5(GOOD_ZIP).hexdigest())
    real_open = __import__("os").fdopen

    class FullFile:
        def __init__(self, fd, mode):
            self.file = real_open(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("common.data.os.fdopen", FullFile)
    with pytest.raises(CS330Error, match=r"^no space left on .*toy: the download of toy.zip was not written") as info:
        fetch(remote, tmp_path / "data")
    assert "\n" not in str(info.value) and not (tmp_path / "data").exists()
    monkeypatch.undo()
    archive = fetch(remote, tmp_path / "data")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", full)
    with pytest.raises(CS330Error, match=r"^no space left on .*: the extraction of toy.zip was not written"):
        safe_extract(archive, tmp_path / "out" / "toy")
    assert leftovers(tmp_path / "out") == []
