"""Data access: lookup order, verified atomic downloads from a local HTTP server, safe extraction."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
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
    assert leftovers(tmp_path / "toy") == []


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
    assert leftovers(tmp_path / "data") in ([], ["toy"])


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
