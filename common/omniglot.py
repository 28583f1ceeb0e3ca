"""The Omniglot store shared by hw1 and hw2.

The official ``images_background.zip`` and ``images_evaluation.zip`` (1623 characters x 20
drawings of 105x105 1-bit PNGs) are read straight from the zips, each image decoded once,
resized (28x28 by default, Lanczos as in the course's ``omniglot_resized``), inverted so that
strokes are bright, and cached as one uint8 tensor in the data directory. Episodes are then
sampled by indexing that tensor on the training device: no per-sample file I/O, no DataLoader
workers.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.checkpoint import atomic_save
from common.data import RemoteFile, data_root, fetch
from common.errors import CS330Error, DiskFull

_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
OMNIGLOT_ARCHIVES = (
    RemoteFile("omniglot/images_background.zip", f"{_BASE_URL}/images_background.zip",
               "68d2efa1b9178cc56df9314c21c6e718"),
    RemoteFile("omniglot/images_evaluation.zip", f"{_BASE_URL}/images_evaluation.zip",
               "6b91aef0f799c5bb55b94e3f2daec811"),
)
NUM_DRAWINGS = 20
_CACHE_VERSION = 2  # 2: the cache carries a checksum of its own contents

# What a truncated or corrupted zip raises while it is read and decoded: zipfile (no central
# directory, bad CRC-32), zlib and EOFError (deflate data cut short), PIL (OSError for truncated
# or unidentified images, SyntaxError for broken PNG chunks, ValueError for bad image data).
_DAMAGED_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, SyntaxError, ValueError)
# What torch.load raises on a cache cut short or overwritten: a bad zip directory (RuntimeError),
# a failed seek past the end (OSError), an empty file (EOFError), mangled pickle bytes.
_UNREADABLE_CACHE_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError)

# Split sizes in characters (the standard store has 1623). CS330: 1100/100/423 as in the course.
# Vinyals et al. (used by the MAML and ProtoNet papers): 1200 training characters (1028 train +
# 172 validation, Snell et al.'s split sizes) and 423 test, each rotation a new class.
PROTOCOLS = {
    "cs330": {"train": 1100, "val": 100, "rotations": False},
    "vinyals": {"train": 1028, "val": 172, "rotations": True},
}
STANDARD_NUM_CHARACTERS = 1623
SPLIT_SEED = 1  # fixed, so every run (whatever its training seed) sees the same classes


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def character_members(archive: zipfile.ZipFile) -> dict[str, list[str]]:
    """PNG members grouped by character folder (``<split>/<alphabet>/<character>``), sorted by name
    so the result does not depend on the order of entries in the zip."""
    groups: dict[str, list[str]] = {}
    for name in archive.namelist():
        if name.endswith(".png"):
            groups.setdefault(name.rsplit("/", 1)[0], []).append(name)
    return {char: sorted(files) for char, files in sorted(groups.items())}


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """One Omniglot PNG -> ``[S, S]`` uint8 with strokes 255 and background 0."""
    image = Image.open(io.BytesIO(data)).convert("L")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.LANCZOS)
    return 255 - np.asarray(image, dtype=np.uint8)


def _decode_archive(path: Path, image_size: int) -> tuple[list[np.ndarray], list[str]]:
    """The ``[20, S, S]`` drawings and the name of each character in one zip."""
    blocks, characters = [], []
    with zipfile.ZipFile(path) as archive:
        members = character_members(archive)
        bar = tqdm(members.items(), desc=f"decode {path.name}", unit="char", leave=False)
        for char, files in bar:
            if len(files) != NUM_DRAWINGS:
                raise CS330Error(f"{path}: character {char} has {len(files)} drawings, expected {NUM_DRAWINGS}")
            blocks.append(np.stack([decode_image(archive.read(f), image_size) for f in files]))
            characters.append(char)
    return blocks, characters


def _decode_archives(paths: list[Path], image_size: int) -> tuple[np.ndarray, list[str]]:
    characters, blocks = [], []
    for path in paths:
        try:
            archive_blocks, archive_characters = _decode_archive(path, image_size)
        except _DAMAGED_ARCHIVE_ERRORS as err:
            raise CS330Error(
                f"cannot read {path}: {_reason(err)}. The file is truncated or corrupted: delete it and run "
                f"again to download a fresh copy, or point --data_dir or CS330_DATA_MIRROR at a folder holding "
                f"a good omniglot/{path.name}"
            ) from err
        blocks += archive_blocks
        characters += archive_characters
    if not characters:
        raise CS330Error(f"no Omniglot PNGs found in {', '.join(map(str, paths))}")
    return np.stack(blocks), characters


def _reason(err: BaseException) -> str:
    """A one-line reason for ``err`` (some torch and pickle messages span many lines)."""
    text = getattr(err, "strerror", None) or str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _checksum(images: torch.Tensor, characters: list[str]) -> str:
    """Digest of the cache contents: a disk error or a partial overwrite inside the tensor data
    leaves a file torch.load reads without complaint (it does not check the zip's CRCs)."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(f"{tuple(images.shape)} {images.dtype}\0".encode())
    digest.update(images.contiguous().numpy().data)
    digest.update("\0".join(characters).encode())
    return digest.hexdigest()


def _intact(cached: dict[str, Any]) -> bool:
    images, characters = cached.get("images"), cached.get("characters")
    return (
        isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        and isinstance(characters, list) and all(isinstance(c, str) for c in characters)
        and cached.get("checksum") == _checksum(images, characters)
    )


def _read_cache(cache: Path, key: str) -> tuple[torch.Tensor, list[str]] | None:
    """The cached images and characters, or None when the cache is missing, stale (other archives,
    size or version: rebuilt silently) or damaged (rebuilt with a warning, never used)."""
    if not cache.exists():
        return None
    try:
        cached = torch.load(cache, weights_only=True)
    except _UNREADABLE_CACHE_ERRORS as err:
        _warn(f"Omniglot cache {cache} is unreadable ({_reason(err)}); rebuilding from the zips")
        return None
    if isinstance(cached, dict) and cached.get("key") != key:
        return None  # other archives, image size or cache version: expected, rebuilt silently
    if not isinstance(cached, dict) or not _intact(cached):
        _warn(f"Omniglot cache {cache} failed its checksum; rebuilding from the zips")
        return None
    return cached["images"], list(cached["characters"])


def _write_cache(cache: Path, key: str, images: torch.Tensor, characters: list[str]) -> None:
    """Save the cache; a data directory that cannot be written (read-only mount, full disk) only
    costs the next run a decode, so it is a warning, not an error."""
    payload = {"key": key, "images": images, "characters": characters, "checksum": _checksum(images, characters)}
    try:
        atomic_save(payload, cache)
    except DiskFull:
        _warn(f"no space left on {cache.parent} for the Omniglot cache; running from memory, the next run "
              "decodes the zips again")
    except OSError as err:
        _warn(f"cannot write the Omniglot cache to {cache} ({_reason(err)}); running from memory, "
              "the next run decodes the zips again")


@dataclass
class OmniglotStore:
    """All characters as one tensor: ``images`` is ``[num_characters, 20, S, S]`` uint8."""

    images: torch.Tensor
    characters: list[str]

    @classmethod
    def load(cls, data_dir: str | Path | None = None, image_size: int = 28) -> OmniglotStore:
        """Load the cached store, (re)building it when missing, damaged or when the source zips changed."""
        if image_size <= 0:
            raise CS330Error(f"image_size must be positive, got {image_size}")
        archives = [fetch(remote, data_dir) for remote in OMNIGLOT_ARCHIVES]
        key = f"v{_CACHE_VERSION}-{image_size}-{_sha256(archives)}"
        cache = data_root(data_dir) / "omniglot" / f"omniglot_{image_size}px.pt"
        cached = _read_cache(cache, key)
        if cached is not None:
            return cls(*cached)
        images, characters = _decode_archives(archives, image_size)
        store = cls(torch.from_numpy(images), characters)
        _write_cache(cache, key, store.images, characters)
        return store

    def __len__(self) -> int:
        return len(self.characters)

    def split(self, name: str, protocol: str = "cs330") -> torch.Tensor:
        """The classes of one split as ``[num_classes, 20, S, S]`` uint8 (rotations included for
        the Vinyals protocol: class ``4 * c + r`` is character ``c`` rotated by ``90 * r`` degrees)."""
        index = split_characters(len(self), protocol)[name]
        images = self.images[torch.as_tensor(index)]
        if PROTOCOLS[protocol]["rotations"]:
            rotated = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
            images = torch.stack(rotated, dim=1).flatten(0, 1)
        return images.contiguous()


def split_characters(num_characters: int, protocol: str = "cs330") -> dict[str, np.ndarray]:
    """Character indices of the train/val/test splits: a permutation seeded by ``SPLIT_SEED`` of
    the characters in sorted-name order, so it does not depend on file-system listing order.
    Stores of a non-standard size (test fixtures) use the same fractions."""
    if protocol not in PROTOCOLS:
        raise CS330Error(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    sizes = PROTOCOLS[protocol]
    scale = num_characters / STANDARD_NUM_CHARACTERS
    n_train, n_val = round(sizes["train"] * scale), round(sizes["val"] * scale)
    order = np.random.default_rng(SPLIT_SEED).permutation(num_characters)
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


class Episodes(NamedTuple):
    """A batch of B tasks. Labels are 0..N-1 within each task."""

    support_images: torch.Tensor  # [B, N*K, 1, S, S] float, strokes 1
    support_labels: torch.Tensor  # [B, N*K] long
    query_images: torch.Tensor  # [B, N*Q, 1, S, S]
    query_labels: torch.Tensor  # [B, N*Q]


class EpisodeSampler:
    """Samples N-way K-shot Q-query tasks from one split, B at a time, on ``device``.

    Randomness comes from the sampler's own generator (seeded, saved in checkpoints with
    :meth:`state_dict`), so data order survives ``--resume`` and does not depend on model code.
    """

    def __init__(self, images: torch.Tensor, num_way: int, num_support: int, num_query: int,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        num_classes, num_drawings = images.shape[:2]
        for label, value in (("num_way", num_way), ("num_support", num_support), ("num_query", num_query)):
            if value <= 0:
                raise CS330Error(f"{label} must be positive, got {value}")
        if num_way > num_classes:
            raise CS330Error(f"num_way={num_way} is larger than the {num_classes} classes in this split")
        if num_support + num_query > num_drawings:
            raise CS330Error(
                f"num_support + num_query = {num_support} + {num_query} = {num_support + num_query} "
                f"exceeds the {num_drawings} drawings each Omniglot character has"
            )
        self.images = images.to(device)
        self.num_way, self.num_support, self.num_query = num_way, num_support, num_query
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, batch_size: int) -> torch.Tensor:
        """Row indices into the flattened ``[classes * drawings]`` image table, ``[B, N, K+Q]``."""
        if batch_size <= 0:
            raise CS330Error(f"batch size must be positive, got {batch_size}")
        num_classes, num_drawings = self.images.shape[:2]
        # Random keys + topk = N distinct classes per task in random order (label = position).
        classes = torch.rand(batch_size, num_classes, generator=self.generator).topk(self.num_way, dim=1).indices
        draws = torch.rand(batch_size, self.num_way, num_drawings, generator=self.generator).argsort(dim=-1)
        rows = classes[..., None] * num_drawings + draws[..., : self.num_support + self.num_query]
        return rows.to(self.device)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        # index_select on a 2-D view is several times faster than broadcast advanced indexing.
        size = self.images.shape[-1]
        flat = self.images.view(-1, size * size).index_select(0, rows.reshape(-1))
        return flat.view(*rows.shape, 1, size, size).float().mul_(1.0 / 255.0)

    def sample_grid(self, batch_size: int) -> torch.Tensor:
        """``[B, N, K+Q, 1, S, S]`` float images: class n of task b in row n, drawings along dim 2."""
        return self._gather(self._draw(batch_size))

    def sample(self, batch_size: int) -> Episodes:
        rows = self._draw(batch_size)  # [B, N, K+Q]
        n, k, q = self.num_way, self.num_support, self.num_query
        labels = torch.arange(n, device=self.device)
        return Episodes(
            self._gather(rows[:, :, :k]).flatten(1, 2),  # [B, N*K, 1, S, S]
            labels.repeat_interleave(k).expand(batch_size, -1),
            self._gather(rows[:, :, k:]).flatten(1, 2),  # [B, N*Q, 1, S, S]
            labels.repeat_interleave(q).expand(batch_size, -1),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
