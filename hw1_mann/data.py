"""Meta-batches of N-way K-shot tasks laid out as sequences, the input format of the black-box learners.

Row ``k < K`` of a task holds the k-th drawing of every class (class n at position n, label n); the
last row holds one more drawing of every class in a random order: the query set. All sampling
indexes the in-memory Omniglot store (``common.omniglot``) with a seeded generator, so there are
no per-sample file reads, no worker processes, and the data order survives ``--resume``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from common.errors import CS330Error
from common.omniglot import NUM_DRAWINGS, EpisodeSampler

# --- the course's protocol (--protocol course): K support rows, then the query row -------------------


class CourseBatch(NamedTuple):
    images: torch.Tensor  # [B, K+1, N, 784] float in [0, 1], strokes 1
    labels: torch.Tensor  # [B, K+1, N, N] one-hot float; row K is the (shuffled) query set


def check_task_shape(num_classes: int, num_shot: int, split_sizes: dict[str, int] | None = None) -> None:
    """Refuse (N, K) combinations that cannot be sampled, before any training starts."""
    if num_classes < 2:
        raise CS330Error(f"--num_classes must be at least 2 (a {num_classes}-way task has nothing to classify)")
    if num_shot < 1:
        raise CS330Error(f"--num_shot must be at least 1, got {num_shot}")
    if num_shot + 1 > NUM_DRAWINGS:
        raise CS330Error(
            f"--num_shot {num_shot} needs {num_shot + 1} drawings per class (K support + 1 query), but every "
            f"Omniglot character has only {NUM_DRAWINGS}: use --num_shot {NUM_DRAWINGS - 1} or less"
        )
    for split, size in (split_sizes or {}).items():
        if num_classes > size:
            raise CS330Error(
                f"--num_classes {num_classes} is larger than the {size} characters of the {split} split: "
                f"use --num_classes {size} or less"
            )


class CourseSampler:
    """Samples ``[B, K+1, N, 784]`` image / ``[B, K+1, N, N]`` label meta-batches from one split."""

    def __init__(self, split_images: torch.Tensor, num_classes: int, num_shot: int,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        check_task_shape(num_classes, num_shot, {"chosen": int(split_images.shape[0])})
        self.episodes = EpisodeSampler(split_images, num_classes, num_shot, 1, device=device, seed=seed)
        self.num_classes, self.num_shot = num_classes, num_shot
        self.device = torch.device(device)
        # One-hot label of every position: class n sits at position n in each row before shuffling.
        self.eye = torch.eye(num_classes, device=self.device)  # [N, N]

    def sample(self, batch_size: int) -> CourseBatch:
        n, k = self.num_classes, self.num_shot
        grid = self.episodes.sample_grid(batch_size)  # [B, N, K+1, 1, S, S]
        images = grid.flatten(3).transpose(1, 2)  # [B, K+1, N, S*S]
        labels = self.eye.expand(batch_size, k + 1, n, n)  # [B, K+1, N, N]
        # Shuffle the query row per task so its label cannot be read off its position.
        order = torch.rand(batch_size, n, generator=self.episodes.generator).argsort(dim=1).to(self.device)  # [B, N]
        query_images = images[:, -1].gather(1, order[..., None].expand(-1, -1, images.shape[-1]))
        query_labels = labels[:, -1].gather(1, order[..., None].expand(-1, -1, n))
        images = torch.cat([images[:, :-1], query_images[:, None]], dim=1).contiguous()
        labels = torch.cat([labels[:, :-1], query_labels[:, None]], dim=1).contiguous()
        return CourseBatch(images, labels)

    def state_dict(self) -> dict[str, Any]:
        return self.episodes.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes.load_state_dict(state)


# --- Santoro et al. (2016)'s protocol: one label per step, revealed at the next step ----------------
# Each class is shown --presentations times per episode; its k-th showing is its instance k (the
# paper's word, and the columns of its table 1: accuracy by instance).


class SantoroBatch(NamedTuple):
    images: torch.Tensor  # [B, T, 784] float in [0, 1], T = N * presentations
    labels: torch.Tensor  # [B, T] class ids; the model sees labels[:, t-1] at step t
    instance: torch.Tensor  # [B, T] the step's instance number: 1-based count of its class's showings so far


def check_episode_shape(num_classes: int, presentations: int, split_sizes: dict[str, int] | None = None) -> None:
    """Refuse (N, presentations) combinations that cannot be sampled, before any training starts."""
    check_task_shape(num_classes, 1, split_sizes)
    if not 1 <= presentations <= NUM_DRAWINGS:
        raise CS330Error(
            f"--presentations {presentations}: each class is shown as distinct drawings of one character, and "
            f"every Omniglot character has {NUM_DRAWINGS}: use 1..{NUM_DRAWINGS}"
        )


class SantoroSampler:
    """Episodes of Santoro et al.: N random classes with random labels, each shown ``presentations``
    times (distinct drawings) in one random order of ``T = N * presentations`` steps.

    The paper drew the class of every step at random ("about 10 instances of each class" in 50 steps);
    a fixed count per class keeps every instance number, the 10th included, in every episode.
    """

    def __init__(self, split_images: torch.Tensor, num_classes: int, presentations: int = 10,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        check_episode_shape(num_classes, presentations, {"chosen": int(split_images.shape[0])})
        # The grid's rows are random classes, so "label = row" is a random label assignment per episode.
        self.episodes = EpisodeSampler(split_images, num_classes, presentations, 1, device=device, seed=seed)
        self.num_classes, self.presentations = num_classes, presentations
        self.device = torch.device(device)

    def sample(self, batch_size: int) -> SantoroBatch:
        n, p = self.num_classes, self.presentations
        grid = self.episodes.sample_grid(batch_size)[:, :, :p]  # [B, N, P, 1, S, S] (drops the query drawing)
        images = grid.flatten(3).flatten(1, 2)  # [B, N*P, S*S]: class-major
        labels = torch.arange(n, device=self.device).repeat_interleave(p).expand(batch_size, -1)  # [B, N*P]
        # One random order of the steps per episode (a class's drawings are in random order already).
        order = torch.rand(batch_size, n * p, generator=self.episodes.generator).argsort(dim=1).to(self.device)
        images = images.gather(1, order[..., None].expand(-1, -1, images.shape[-1]))
        labels = labels.gather(1, order)
        return SantoroBatch(images.contiguous(), labels.contiguous(), instance_numbers(labels, n))

    def state_dict(self) -> dict[str, Any]:
        return self.episodes.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episodes.load_state_dict(state)


def instance_numbers(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, T]`` labels -> ``[B, T]`` 1-based count of the step's label among steps ``0..t``."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes)  # [B, T, N]
    return (one_hot.cumsum(dim=1) * one_hot).sum(-1)


# Either protocol's sampler and meta-batch.
TaskSampler = CourseSampler | SantoroSampler
TaskBatch = CourseBatch | SantoroBatch
