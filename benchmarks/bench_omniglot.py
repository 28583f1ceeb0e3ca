"""Task sampling speed: the in-memory Omniglot store against reading every sampled image from the zip,
for hw2's episodes (N-way K-shot Q-query) and hw1's sequence meta-batches (K+1 drawings per class).

    python benchmarks/bench_omniglot.py

The per-sample baseline does what the original homework loaders did for every image of every task:
open the PNG file (here: the zip member), decode it, resize to 28x28 and invert it. Both sides sample
the same number of tasks with the same N/K/Q.
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import time
import zipfile

import numpy as np
import torch

from common.data import fetch
from common.device import cpu_capability
from common.omniglot import OMNIGLOT_ARCHIVES, EpisodeSampler, OmniglotStore, character_members, decode_image
from hw1_mann.data import CourseSampler


def store_rate(sampler: EpisodeSampler, batch: int, seconds: float) -> float:
    # Warm up for a second so one-off costs (first allocations of a new batch size) are not counted.
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
        sampler.sample(batch)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.sample(batch)
        count += batch
    return count / (time.perf_counter() - start)


def per_sample_rate(archives: list[zipfile.ZipFile], members: list[list[str]], num_way: int, per_class: int,
                    image_size: int, seconds: float, rng: np.random.Generator) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for char in rng.choice(len(members), num_way, replace=False):
            archive_index, files = members[char]
            for name in rng.choice(files, per_class, replace=False):
                decode_image(archives[archive_index].read(name), image_size)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement (default: 5)")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    store = OmniglotStore.load(args.data_dir)
    print(f"store load (from cache when present): {time.perf_counter() - start:.3f} s, "
          f"{tuple(store.images.shape)} uint8")
    train = store.split("train")
    archives = [zipfile.ZipFile(fetch(remote, args.data_dir)) for remote in OMNIGLOT_ARCHIVES]
    members = [(index, files) for index, archive in enumerate(archives)
               for files in character_members(archive).values()]
    rng = np.random.default_rng(0)
    torch.set_num_threads(1)
    print(f"1 thread, CPU capability {cpu_capability()}")
    print(f"{'task':<44}{'store tasks/s':>15}{'per-sample tasks/s':>20}{'speed-up':>10}")
    samplers = {  # name -> (sampler, tasks per batch, classes per task, drawings per class)
        "hw2 episodes 5-way 1-shot 15-query, B=16": (EpisodeSampler(train, 5, 1, 15, "cpu", seed=0), 16, 5, 16),
        "hw2 episodes 20-way 5-shot 5-query, B=16": (EpisodeSampler(train, 20, 5, 5, "cpu", seed=0), 16, 20, 10),
        "hw1 sequences 5-way 1-shot, B=128": (CourseSampler(train, 5, 1, "cpu", seed=0), 128, 5, 2),
    }
    for name, (sampler, batch, num_way, per_class) in samplers.items():
        fast = store_rate(sampler, batch, args.seconds)
        slow = per_sample_rate(archives, members, num_way, per_class, 28, args.seconds, rng)
        print(f"{name:<44}{fast:>15.0f}{slow:>20.1f}{fast / slow:>9.0f}x")

if __name__ == "__main__":
    main()
