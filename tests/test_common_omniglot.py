"""The Omniglot store: decoding, cache, splits, episode sampling."""

from __future__ import annotations

import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import CS330Error
from common.omniglot import EpisodeSampler, OmniglotStore, split_characters
from tests.conftest import make_fake_omniglot, real_omniglot_available


def test_store_shape_and_polarity(omniglot_store):
    images = omniglot_store.images
    assert images.dtype == torch.uint8 and images.shape[1:] == (20, 28, 28)
    if real_omniglot_available():
        assert images.shape[0] == 1623
    # Strokes are bright after inversion: most pixels are background (0), strokes reach 255.
    assert images.float().median() == 0 and images.max() == 255
    assert len(set(omniglot_store.characters)) == images.shape[0]


def test_cache_is_reused_then_rebuilt_when_archives_change(tmp_path, monkeypatch):
    monkeypatch.delenv("CS330_DATA_MIRROR", raising=False)
    make_fake_omniglot(tmp_path, alphabets=2, characters=3, seed=0)
    first = OmniglotStore.load(tmp_path)
    cache = tmp_path / "omniglot" / "omniglot_28px.pt"
    stamp = cache.stat().st_mtime_ns
    start = time.perf_counter()
    again = OmniglotStore.load(tmp_path)
    assert time.perf_counter() - start < 1.0
    assert cache.stat().st_mtime_ns == stamp and torch.equal(first.images, again.images)
    make_fake_omniglot(tmp_path, alphabets=2, characters=3, seed=1)  # different drawings, same names
    rebuilt = OmniglotStore.load(tmp_path)
    assert not torch.equal(first.images, rebuilt.images)
    assert OmniglotStore.load(tmp_path, image_size=14).images.shape[-1] == 14


@pytest.fixture
def small_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny fake Omniglot (6 + 3 characters) in a tmp data dir, never the mirror."""
    monkeypatch.delenv("CS330_DATA_MIRROR", raising=False)
    return make_fake_omniglot(tmp_path, alphabets=2, characters=3, seed=0)


def member_data_offset(path: Path, member_suffix: str) -> tuple[int, int]:
    """(offset, size) of the stored bytes of the first zip member whose name ends with the suffix."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def messages(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The ``warning:``/``error:`` lines written to stderr, without the tqdm progress bars."""
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    return [line for line in lines if line.startswith(("warning:", "error:"))]


def cache_path(data_dir: Path) -> Path:
    return data_dir / "omniglot" / "omniglot_28px.pt"


def test_cache_corrupted_inside_the_tensor_data_is_rebuilt(small_data_dir, capsys):
    good = OmniglotStore.load(small_data_dir)
    cache = cache_path(small_data_dir)
    start, size = member_data_offset(cache, "/data/0")  # the images tensor's storage
    assert size >= 8192
    overwrite(cache, start + size // 2 - 2048, bytes(range(256)) * 16)  # 4 KB, a disk error's worth
    capsys.readouterr()
    loaded = OmniglotStore.load(small_data_dir)
    assert torch.equal(loaded.images, good.images) and loaded.characters == good.characters
    assert messages(capsys) == [f"warning: Omniglot cache {cache} failed its checksum; rebuilding from the zips"]
    # The rebuilt cache is intact again and used silently.
    assert torch.equal(OmniglotStore.load(small_data_dir).images, good.images)
    assert messages(capsys) == []


def test_cache_with_changed_character_names_is_rebuilt(small_data_dir, capsys):
    good = OmniglotStore.load(small_data_dir)
    cache = cache_path(small_data_dir)
    cached = torch.load(cache, weights_only=True)
    cached["characters"][0] = "images_background/Alphabet_b0/character99"
    torch.save(cached, cache)
    capsys.readouterr()
    assert OmniglotStore.load(small_data_dir).characters == good.characters
    assert messages(capsys) == [f"warning: Omniglot cache {cache} failed its checksum; rebuilding from the zips"]


def test_cache_from_before_checksums_is_rebuilt_silently(small_data_dir, capsys):
    good = OmniglotStore.load(small_data_dir)
    cache = cache_path(small_data_dir)
    cached = torch.load(cache, weights_only=True)
    old = {"key": "v1" + cached["key"][2:], "images": cached["images"], "characters": cached["characters"]}
    torch.save(old, cache)
    capsys.readouterr()
    assert torch.equal(OmniglotStore.load(small_data_dir).images, good.images)
    assert messages(capsys) == []
    assert "checksum" in torch.load(cache, weights_only=True)


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -10])
def test_truncated_cache_is_rebuilt(small_data_dir, capsys, keep):
    good = OmniglotStore.load(small_data_dir)
    cache = cache_path(small_data_dir)
    raw = cache.read_bytes()
    size = int(len(raw) * keep) if isinstance(keep, float) else keep % len(raw)
    cache.write_bytes(raw[:size])
    capsys.readouterr()
    assert torch.equal(OmniglotStore.load(small_data_dir).images, good.images)
    lines = messages(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"warning: Omniglot cache {cache} is unreadable (")
    assert lines[0].endswith("); rebuilding from the zips")
    assert torch.equal(torch.load(cache, weights_only=True)["images"], good.images)  # a good cache again


def test_stale_temporary_cache_files_are_ignored(small_data_dir, capsys):
    folder = small_data_dir / "omniglot"
    (folder / ".omniglot_28px.pt.abc123.tmp").write_bytes(b"left by a killed run")
    assert len(OmniglotStore.load(small_data_dir)) == 9
    assert messages(capsys) == []


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_crc(path: Path) -> None:
    start, size = member_data_offset(path, "_05.png")
    overwrite(path, start + size // 2, b"\xff\x00\xff\x00")


@pytest.mark.parametrize("damage, reason", [
    (damage_truncate, "File is not a zip file"), (damage_crc, "Bad CRC-32"),
])
@pytest.mark.parametrize("archive", ["images_background.zip", "images_evaluation.zip"])
def test_damaged_archive_gives_one_clear_error(small_data_dir, damage, reason, archive):
    path = small_data_dir / "omniglot" / archive
    damage(path)
    with pytest.raises(CS330Error, match=reason) as info:
        OmniglotStore.load(small_data_dir)
    message = str(info.value)
    assert f"cannot read {path}" in message and "delete it" in message
    assert "--data_dir" in message and "CS330_DATA_MIRROR" in message
    assert sorted(p.name for p in path.parent.iterdir()) == ["images_background.zip", "images_evaluation.zip"]


def test_damaged_archive_is_a_cli_error(small_data_dir, capsys):
    from common.errors import cli_main

    damage_crc(small_data_dir / "omniglot" / "images_background.zip")
    with pytest.raises(SystemExit) as info:
        cli_main(OmniglotStore.load)(small_data_dir)
    assert info.value.code == 2
    lines = messages(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: cannot read ")


def test_unwritable_cache_runs_from_memory(small_data_dir, monkeypatch, capsys):
    # chmod cannot make a folder read-only for root (our CI), so the save fails by hand, as
    # atomic_save does on a read-only mount.
    def read_only_save(obj, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("common.omniglot.atomic_save", read_only_save)
    store = OmniglotStore.load(small_data_dir)
    assert store.images.shape == (9, 20, 28, 28)
    cache = cache_path(small_data_dir)
    assert messages(capsys) == [
        f"warning: cannot write the Omniglot cache to {cache} (Permission denied); running from memory, "
        "the next run decodes the zips again"
    ]
    assert not cache.exists()
    monkeypatch.undo()
    assert torch.equal(OmniglotStore.load(small_data_dir).images, store.images)
    assert cache.exists() and messages(capsys) == []


def test_cache_on_a_full_disk_runs_from_memory(small_data_dir, monkeypatch, capsys):
    """Issue 28: the disk filling up while the cache is written costs a decode, never the run."""
    monkeypatch.setattr("common.checkpoint.torch.save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    assert OmniglotStore.load(small_data_dir).images.shape == (9, 20, 28, 28)
    cache = cache_path(small_data_dir)
    assert messages(capsys) == [f"warning: no space left on {cache.parent} for the Omniglot cache; running from "
                                "memory, the next run decodes the zips again"]
    assert not cache.exists() and not list(cache.parent.glob(".*.tmp"))


def test_missing_archives_give_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("CS330_DATA_MIRROR", raising=False)
    monkeypatch.setattr("common.omniglot.OMNIGLOT_ARCHIVES", tuple(
        type(r)(r.relpath, "http://127.0.0.1:9/" + r.name, r.md5)
        for r in __import__("common.omniglot", fromlist=["x"]).OMNIGLOT_ARCHIVES))
    with pytest.raises(CS330Error, match="could not find images_background.zip"):
        OmniglotStore.load(tmp_path)


def test_cs330_split_sizes_disjoint_and_fixed():
    splits = split_characters(1623, "cs330")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    union = np.concatenate(list(splits.values()))
    assert len(np.unique(union)) == 1623
    again = split_characters(1623, "cs330")
    assert all(np.array_equal(splits[s], again[s]) for s in splits)


def test_vinyals_split_adds_rotations(omniglot_store):
    sizes = {s: len(v) for s, v in split_characters(len(omniglot_store), "vinyals").items()}
    if len(omniglot_store) == 1623:
        assert sizes == {"train": 1028, "val": 172, "test": 423}
    train = omniglot_store.split("train", "vinyals")
    assert train.shape[0] == 4 * sizes["train"]
    assert torch.equal(train[1], torch.rot90(train[0], 1, dims=(-2, -1)))


def test_split_independent_of_listing_order(omniglot_store):
    # Characters are kept in sorted-name order whatever order the zip lists them in.
    assert omniglot_store.characters == sorted(omniglot_store.characters)


def test_sampler_shapes_labels_and_distinct_classes(omniglot_store):
    split = omniglot_store.split("train")
    sampler = EpisodeSampler(split, num_way=5, num_support=2, num_query=3, seed=0)
    support, support_labels, query, query_labels = sampler.sample(4)
    assert support.shape == (4, 10, 1, 28, 28) and query.shape == (4, 15, 1, 28, 28)
    assert support.dtype == torch.float32 and 0 <= support.min() and support.max() <= 1
    assert support_labels[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert query_labels.shape == (4, 15) and set(query_labels[0].tolist()) == set(range(5))
    grid = EpisodeSampler(split, 5, 2, 3, seed=0).sample_grid(4)  # [B, N, K+Q, 1, S, S]
    assert grid.shape == (4, 5, 5, 1, 28, 28)
    # The same seed gives the same tasks; support and query images come from the grid rows.
    assert torch.equal(grid[:, :, :2].flatten(1, 2), support)
    # No image appears twice in a task, and the N classes of a task differ.
    flat = grid.flatten(3)  # [B, N, K+Q, S*S]
    for task in flat:
        assert torch.unique(task.flatten(0, 1), dim=0).shape[0] == 25


def test_sampler_state_roundtrip(omniglot_store):
    split = omniglot_store.split("val")
    sampler = EpisodeSampler(split, 3, 1, 1, seed=5)
    sampler.sample(2)
    state = sampler.state_dict()
    expected = sampler.sample(2).query_images
    other = EpisodeSampler(split, 3, 1, 1, seed=999)
    other.load_state_dict(state)
    assert torch.equal(other.sample(2).query_images, expected)


@pytest.mark.parametrize("way, k, q, match", [
    (10_000, 1, 1, "larger than"), (5, 15, 6, "exceeds the 20 drawings"), (5, 0, 5, "num_support must be positive"),
    (0, 1, 1, "num_way must be positive"),
])
def test_sampler_refuses_impossible_tasks(omniglot_store, way, k, q, match):
    with pytest.raises(CS330Error, match=match):
        EpisodeSampler(omniglot_store.split("train"), way, k, q)


@pytest.mark.skipif(not os.environ.get("CS330_DATA_MIRROR"), reason="needs the real archives")
def test_real_archives_decode_like_the_pngs(omniglot_store):
    # Spot-check against an independent decode of one real file.
    import zipfile

    from PIL import Image

    path = os.path.join(os.environ["CS330_DATA_MIRROR"], "omniglot", "images_background.zip")
    with zipfile.ZipFile(path) as zf:
        name = sorted(n for n in zf.namelist() if n.endswith(".png"))[0]
        with zf.open(name) as f:
            image = Image.open(f).convert("L").resize((28, 28), Image.LANCZOS)
    index = omniglot_store.characters.index(name.rsplit("/", 1)[0])
    assert torch.equal(omniglot_store.images[index, 0], torch.from_numpy(255 - np.asarray(image)))
