"""Tasks per second: sequence meta-batches from the in-memory store vs reading image files per sample.

    python hw1_mann/bench.py --num_classes 5 --num_shot 1 --meta_batch_size 128

The file-reading baseline does what the original homework's data loader did for every task: pick
N characters, read K+1 of their PNG files (here straight from the official zips, no extraction),
decode, resize to 28x28 and flatten, one image at a time, in the main process.
"""

from __future__ import annotations

import argparse
import random
import time
import zipfile

import numpy as np
import torch

from common.cli import positive_int
from common.data import fetch
from common.errors import cli_main
from common.omniglot import (
    NUM_DRAWINGS,
    OMNIGLOT_ARCHIVES,
    OmniglotStore,
    character_members,
    decode_image,
    split_characters,
)
from hw1_mann.data import SequenceSampler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_classes", type=positive_int, default=5, help="N (default: 5)")
    parser.add_argument("--num_shot", type=positive_int, default=1, help="K (default: 1)")
    parser.add_argument("--meta_batch_size", type=positive_int, default=128, help="tasks per batch (default: 128)")
    parser.add_argument("--store_batches", type=positive_int, default=50, help="batches timed from the store")
    parser.add_argument("--file_batches", type=positive_int, default=2, help="batches timed from files (slow)")
    parser.add_argument("--data_dir", default=None, help="data directory (default: data/, then $CS330_DATA_MIRROR)")
    return parser.parse_args(argv)


def file_reading_batch(archives: dict[str, zipfile.ZipFile], members: list[list[tuple[str, str]]],
                       num_classes: int, num_shot: int, batch_size: int, rng: random.Random) -> np.ndarray:
    """One meta-batch ``[B, K+1, N, 784]`` read image by image from the zips (the baseline)."""
    batch = np.zeros((batch_size, num_shot + 1, num_classes, 784), dtype=np.float32)
    for b in range(batch_size):
        for n, character in enumerate(rng.sample(members, num_classes)):
            for k, (zip_name, member) in enumerate(rng.sample(character, num_shot + 1)):
                batch[b, k, n] = decode_image(archives[zip_name].read(member), 28).reshape(-1) / 255.0
    return batch


@cli_main
def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    store = OmniglotStore.load(args.data_dir)
    sampler = SequenceSampler(store.split("train"), args.num_classes, args.num_shot, "cpu", seed=0)
    sampler.sample(args.meta_batch_size)  # warm-up
    tic = time.perf_counter()
    for _ in range(args.store_batches):
        sampler.sample(args.meta_batch_size)
    store_rate = args.store_batches * args.meta_batch_size / (time.perf_counter() - tic)

    # The same training characters, as lists of (zip, PNG member) pairs.
    paths = {remote.relpath: fetch(remote, args.data_dir) for remote in OMNIGLOT_ARCHIVES}
    archives = {name: zipfile.ZipFile(path) for name, path in paths.items()}
    by_character = {char: [(name, member) for member in files]
                    for name, archive in archives.items() for char, files in character_members(archive).items()}
    assert all(len(files) == NUM_DRAWINGS for files in by_character.values())
    characters = [by_character[c] for c in store.characters]
    members = [characters[i] for i in split_characters(len(characters))["train"]]
    rng = random.Random(0)
    tic = time.perf_counter()
    for _ in range(args.file_batches):
        file_reading_batch(archives, members, args.num_classes, args.num_shot, args.meta_batch_size, rng)
    file_rate = args.file_batches * args.meta_batch_size / (time.perf_counter() - tic)
    for archive in archives.values():
        archive.close()

    print(f"{args.num_classes}-way {args.num_shot}-shot, meta-batch {args.meta_batch_size}, 1 thread:")
    print(f"  store (hw1_mann.data):      {store_rate:10.0f} tasks/s")
    print(f"  image files, one at a time: {file_rate:10.1f} tasks/s")
    print(f"  speed-up:                   {store_rate / file_rate:10.0f}x")
    return {"store_tasks_per_s": store_rate, "file_tasks_per_s": file_rate, "speedup": store_rate / file_rate}


if __name__ == "__main__":
    main()
