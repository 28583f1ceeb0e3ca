"""The course's MAML network as a plain ``nn.Module``, shared by ``maml.py`` and ``anil.py``.

MAML and ANIL work on any network (they call it through ``torch.func.functional_call``); this is
the one the course and the MAML paper use on Omniglot: 4 x [conv 3x3, batch norm, ReLU], spatial
mean, linear head. Batch norm always uses the statistics of the images passed in (no running
statistics, no affine parameters), as in the course: the support and query sets of a task are
normalized separately, and the network has no state besides its parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvBlock(nn.Module):
    """conv 3x3 -> batch norm over the images at hand -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, affine=False, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class ConvNet(nn.Module):
    """``[M, 1, S, S]`` -> logits ``[M, num_way]``: ``body`` (4 conv blocks), spatial mean, ``head``.

    ``stride=2`` is the MAML paper's strided network, about 4x cheaper than the course's ``stride=1``
    (full 28x28 resolution in every layer). Weights are Xavier-uniform, biases zero, drawn from a
    generator seeded with ``seed`` (so a network is the same whatever the global RNG did before).
    """

    def __init__(self, num_way: int, hidden_channels: int = 64, stride: int = 1, in_channels: int = 1,
                 num_layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(*(ConvBlock(in_channels if i == 0 else hidden_channels, hidden_channels, stride)
                                    for i in range(num_layers)))
        self.head = nn.Linear(hidden_channels, num_way)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in [block.conv for block in self.body] + [self.head]:
                layer.weight.copy_(xavier_uniform(layer.weight.shape, generator))
                layer.bias.zero_()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, 1, S, S]`` -> ``[M, C]``: the body and the spatial mean, accumulated in the head's
        precision (float32 even when the body runs in bf16)."""
        return self.body(images).mean(dim=(2, 3), dtype=self.head.weight.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def xavier_uniform(shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``nn.init.xavier_uniform_``'s distribution, drawn from ``generator``."""
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound
