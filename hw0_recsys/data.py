"""MovieLens 100K: parsing, the official splits (u1..u5, ua, ub) and seeded random hold-outs.

Ratings are kept as three aligned tensors (0-based user ids, 0-based item ids, float ratings), so a
training step indexes them directly: no Dataset/DataLoader objects, no per-example python work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data import RemoteFile, fetch_extracted
from common.errors import CS330Error
from common.limits import check_fits

ML100K_ZIP = RemoteFile(
    "ml-100k.zip", "https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"
)
OFFICIAL_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
SPLIT_CHOICES = ("random", *OFFICIAL_SPLITS)
RANDOM_SPLIT_SEED = 1234  # fixed, so every run (whatever its training seed) sees the same random split
VAL_SPLIT_SEED = 4321  # fixed: a validation (or blend probe) slice must not change with the training seed


@dataclass
class Ratings:
    """Explicit feedback: ``users[k]`` gave ``ratings[k]`` stars to ``items[k]`` (ids 0-based)."""

    users: torch.Tensor  # [R] int64
    items: torch.Tensor  # [R] int64
    ratings: torch.Tensor  # [R] float32
    days: torch.Tensor | None = None  # [R] int64 day of each rating (Unix time // 86400), for the time models

    def __len__(self) -> int:
        return int(self.users.numel())

    def subset(self, index: torch.Tensor | np.ndarray) -> Ratings:
        index = torch.as_tensor(index, dtype=torch.long)
        return Ratings(self.users[index], self.items[index], self.ratings[index],
                       None if self.days is None else self.days[index])

    def to(self, device: torch.device | str) -> Ratings:
        return Ratings(self.users.to(device), self.items.to(device), self.ratings.to(device),
                       None if self.days is None else self.days.to(device))


@dataclass
class Split:
    """A train/test pair over a shared id space (the ids of the whole u.data)."""

    train: Ratings
    test: Ratings
    num_users: int
    num_items: int


def ml100k_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The extracted ``ml-100k`` folder (data dir, then the mirror, else the official zip is downloaded)."""
    return fetch_extracted(ML100K_ZIP, "ml-100k", "u.data", data_dir)


def read_ratings(path: str | os.PathLike) -> Ratings:
    """Parse a tab-separated ``user item rating timestamp`` file (u.data or a split) with 1-based ids."""
    path = Path(path)
    if not path.is_file():
        raise CS330Error(f"ratings file {path} does not exist")
    try:
        frame = pd.read_csv(path, sep="\t", header=None, names=["user", "item", "rating", "timestamp"],
                            dtype="int64", engine="c")
    except (ValueError, pd.errors.ParserError) as err:
        raise CS330Error(
            f"{path} is not a MovieLens ratings file (4 tab-separated integer columns "
            f"'user item rating timestamp'): {err}"
        ) from None
    if frame.isna().any().any():
        raise CS330Error(f"{path}: some rows have fewer than 4 tab-separated columns")
    if len(frame) == 0:
        raise CS330Error(f"{path} holds no ratings")
    if (frame[["user", "item"]] < 1).any().any():
        raise CS330Error(f"{path}: user and item ids must be 1-based positive integers")
    if not frame["rating"].between(1, 5).all():
        raise CS330Error(f"{path}: ratings must be 1..5 stars")
    return Ratings(
        torch.from_numpy(frame["user"].to_numpy() - 1),
        torch.from_numpy(frame["item"].to_numpy() - 1),
        torch.from_numpy(frame["rating"].to_numpy().astype(np.float32)),
        torch.from_numpy(frame["timestamp"].to_numpy() // 86400),
    )


def holdout(ratings: Ratings, fraction: float, seed: int) -> tuple[Ratings, Ratings]:
    """Randomly move ``fraction`` of the ratings to a second set (a test or validation set)."""
    if not 0.0 < fraction < 1.0:
        raise CS330Error(f"a hold-out fraction must be strictly between 0 and 1, got {fraction}")
    order = torch.randperm(len(ratings), generator=torch.Generator().manual_seed(seed))
    num_held = int(round(fraction * len(ratings)))
    if num_held == 0 or num_held == len(ratings):
        raise CS330Error(f"a fraction of {fraction} of {len(ratings)} ratings leaves one side empty")
    return ratings.subset(order[num_held:].sort().values), ratings.subset(order[:num_held].sort().values)


def load_split(name: str, data_dir: str | os.PathLike | None = None, test_fraction: float = 0.05) -> Split:
    """``random``: ``test_fraction`` of u.data held out with a fixed seed (the course's 95/5 split);
    ``u1``..``u5``, ``ua``, ``ub``: the official GroupLens base/test files."""
    if name not in SPLIT_CHOICES:
        raise CS330Error(f"unknown split {name!r}; choose one of {', '.join(SPLIT_CHOICES)}")
    folder = ml100k_dir(data_dir)
    everything = read_ratings(folder / "u.data")
    num_users, num_items = int(everything.users.max()) + 1, int(everything.items.max()) + 1
    # Every model scores all users x all items (float32) beside two [users, items] masks of who rated what.
    check_fits(num_users * num_items * 6, f"{folder / 'u.data'} (largest user id {num_users}, item id {num_items}: "
               "a score for every user-item pair)", "ids must number the users and items 1..N; fix the file")
    if name == "random":
        train, test = holdout(everything, test_fraction, RANDOM_SPLIT_SEED)
    else:
        train, test = read_ratings(folder / f"{name}.base"), read_ratings(folder / f"{name}.test")
    for part in (train, test):
        if int(part.users.max()) >= num_users or int(part.items.max()) >= num_items:
            raise CS330Error(f"split {name} in {folder} has ids outside u.data; is the folder consistent?")
    return Split(train, test, num_users, num_items)


def interaction_matrix(ratings: Ratings, num_users: int, num_items: int) -> torch.Tensor:
    """``[num_users, num_items]`` bool: True where the user rated the item (whatever the stars)."""
    seen = torch.zeros(num_users, num_items, dtype=torch.bool, device=ratings.users.device)
    seen[ratings.users, ratings.items] = True
    return seen
