"""Verified data access shared by every homework.

A file is looked up, in order, in the data directory (``--data_dir``, else ``$CS330_DATA_DIR``,
else ``data/`` at the repository root), in the read-only mirror named by ``$CS330_DATA_MIRROR``,
and finally downloaded from its official URL. Downloads are checked against the official md5
and renamed into place only after the check passes, so an interrupted or corrupted download
never leaves a file that looks valid. Derived files (extractions, caches) always go to the data
directory, never to the mirror.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common.errors import CS330Error, disk_full_error, is_disk_full

REPO_ROOT = Path(__file__).resolve().parents[1]


class DataNotFoundError(CS330Error):
    """No usable copy of a data file could be found or downloaded."""


class ChecksumError(CS330Error):
    """A downloaded file does not have the expected checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """A data file with its official source.

    ``relpath`` is where it lives under the data directory (and under the mirror), e.g.
    ``omniglot/images_background.zip``; ``md5`` is the official checksum of the download.
    """

    relpath: str
    url: str
    md5: str | None = None

    @property
    def name(self) -> str:
        return Path(self.relpath).name


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The writable data directory: the argument, else ``$CS330_DATA_DIR``, else ``<repo>/data``."""
    chosen = data_dir or os.environ.get("CS330_DATA_DIR") or REPO_ROOT / "data"
    return Path(chosen).expanduser().resolve()


def mirror_root() -> Path | None:
    """The read-only mirror folder named by ``$CS330_DATA_MIRROR``, if set."""
    mirror = os.environ.get("CS330_DATA_MIRROR")
    return Path(mirror).expanduser().resolve() if mirror else None


def candidate_paths(relpath: str, data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Every place a file is looked for, with a description of where the place comes from."""
    places = [(data_root(data_dir) / relpath, "data directory (--data_dir / CS330_DATA_DIR)")]
    mirror = mirror_root()
    if mirror is not None:
        places.append((mirror / relpath, "read-only mirror (CS330_DATA_MIRROR)"))
    return places


def find_local(relpath: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first existing local copy of ``relpath`` (data directory, then mirror), or None."""
    for path, _ in candidate_paths(relpath, data_dir):
        if path.exists():
            return path
    return None


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first."""
    missing = []
    for parent in (folder, *folder.parents):
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: one that another process has
    written into since is kept, and so are its parents."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def download(url: str, dest: Path, md5: str | None = None, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying ``md5`` before the file appears. A failed
    download leaves nothing behind: no partial file, and no empty folders made for it."""
    created = _missing_folders(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return _download_to(url, dest, md5, timeout)
    except BaseException:  # KeyboardInterrupt too: an interrupted download is a failed one
        _remove_empty(created)
        raise


def _download_to(url: str, dest: Path, md5: str | None, timeout: float) -> Path:
    # A fresh, uniquely named temporary file (mkstemp, O_EXCL): a ``.part`` left by a killed run is
    # never appended to or mistaken for the file, which only appears by rename after the md5 check.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if md5 is not None and digest.hexdigest() != md5:
            raise ChecksumError(
                f"{url} downloaded with md5 {digest.hexdigest()}, expected {md5}; the file was discarded. "
                "The server may have sent an error page or a changed file: try again, or fetch it by hand."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(remote: RemoteFile, data_dir: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Path to a usable copy of ``remote``: local copy, mirror copy, or a verified download."""
    local = find_local(remote.relpath, data_dir)
    if local is not None:
        return local
    dest = data_root(data_dir) / remote.relpath
    failure = "download disabled"
    if allow_download:
        try:
            return download(remote.url, dest, remote.md5)
        except ChecksumError:
            raise
        except (urllib.error.URLError, OSError, ValueError) as err:
            if is_disk_full(err):  # no other copy helps: the data directory itself is full
                raise disk_full_error(dest.parent, f"the download of {remote.name}") from None
            reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
            failure = f"download failed: {reason}"
    looked = "\n".join(f"  - {path}  [{why}]" for path, why in candidate_paths(remote.relpath, data_dir))
    raise DataNotFoundError(
        f"could not find {remote.name}.\nLooked in:\n{looked}\n"
        f"Tried {remote.url}: {failure}.\n"
        f"To fix: download it by hand and save it as {dest}, pass --data_dir to a folder holding "
        f"{remote.relpath}, or set CS330_DATA_MIRROR to a folder that holds {remote.relpath}."
    )


def _check_inside(root: Path, member: str) -> None:
    target = (root / member).resolve()
    if not target.is_relative_to(root):
        raise CS330Error(f"refusing to extract {member!r}: it would be written outside {root}")


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a zip or tar archive into ``dest``, refusing members that would escape it.

    Every member is checked before anything is written, and extraction goes to a temporary
    sibling folder that is renamed into place, so a refused or interrupted extraction leaves
    nothing behind.
    """
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent)).resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _check_inside(tmp, name)
                zf.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _check_inside(tmp, member.name)
                    if member.issym() or member.islnk():
                        raise CS330Error(f"refusing to extract link {member.name!r} from {archive}")
                tf.extractall(tmp, filter="data")
        else:
            raise CS330Error(f"{archive} is neither a zip nor a tar archive; delete it and fetch it again")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(dest.parent, f"the extraction of {archive.name}") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def fetch_extracted(
    remote: RemoteFile, folder: str, marker: str, data_dir: str | os.PathLike | None = None
) -> Path:
    """An extracted data folder: ``folder`` (relative to the data directory or mirror) holding
    ``marker``; if no local copy has it, the archive ``remote`` is fetched and extracted into
    the data directory (the archive's top-level folder is expected to be ``Path(folder).name``)."""
    for path, _ in candidate_paths(folder, data_dir):
        if (path / marker).exists():
            return path
    archive = fetch(remote, data_dir)
    target = data_root(data_dir) / folder
    extracted = safe_extract(archive, target.parent / f".extract-{target.name}")
    try:
        inner = extracted / target.name
        source = inner if (inner / marker).exists() else extracted
        if not (source / marker).exists():
            raise CS330Error(f"{archive} does not contain {target.name}/{marker}; is it the right archive?")
        if target.exists():
            shutil.rmtree(target)
        os.replace(source, target)
    finally:
        shutil.rmtree(extracted, ignore_errors=True)
    return target
