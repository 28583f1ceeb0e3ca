"""The two Omniglot networks of hw2.

``ProtoNetEmbedding``: four conv(3x3, 64) -> batch norm -> ReLU -> max-pool(2) blocks; a 28x28
image becomes a 64-d vector (28 -> 14 -> 7 -> 3 -> 1).

The MAML network is written functionally (a dict of tensors + :func:`maml_forward`) so the inner
loop can produce adapted weights without touching any module state: the course architecture,
four conv(3x3, 64) -> batch norm with batch statistics -> ReLU layers, a spatial mean and a linear head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_CONV_LAYERS = 4


class ProtoNetEmbedding(nn.Module):
    def __init__(self, in_channels: int = 1, hidden_channels: int = 64) -> None:
        super().__init__()
        blocks = []
        for i in range(NUM_CONV_LAYERS):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else hidden_channels, hidden_channels, 3, padding=1),
                nn.BatchNorm2d(hidden_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.layers = nn.Sequential(*blocks, nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, 1, S, S]`` -> ``[M, D]`` (D = 64 for 28x28 inputs)."""
        return self.layers(images)


def proto_logits(support_emb: torch.Tensor, support_labels: torch.Tensor, query_emb: torch.Tensor,
                 num_way: int) -> torch.Tensor:
    """Negative squared Euclidean distances from each query to each class prototype.

    Shapes: support ``[B, N*K, D]``, labels ``[B, N*K]``, query ``[B, M, D]`` -> logits ``[B, M, N]``.
    The prototype of class n is the mean of its support embeddings (computed with a one-hot
    matrix product, so support sets need not be sorted by class).
    """
    one_hot = F.one_hot(support_labels, num_way).to(support_emb.dtype)  # [B, N*K, N]
    prototypes = one_hot.transpose(1, 2) @ support_emb / one_hot.sum(1).unsqueeze(-1)  # [B, N, D]
    return -torch.cdist(query_emb, prototypes).pow(2)


def init_maml_params(num_way: int, in_channels: int = 1, hidden_channels: int = 64,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Meta-parameters of the MAML network: Xavier-uniform conv and head weights, zero biases."""
    params: dict[str, torch.Tensor] = {}
    for i in range(NUM_CONV_LAYERS):
        c_in = in_channels if i == 0 else hidden_channels
        params[f"conv{i}"] = _xavier((hidden_channels, c_in, 3, 3), generator)
        params[f"b{i}"] = torch.zeros(hidden_channels)
    params["w_head"] = _xavier((num_way, hidden_channels), generator)
    params["b_head"] = torch.zeros(num_way)
    return params


def _xavier(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def maml_forward(params: dict[str, torch.Tensor], images: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """``[M, 1, S, S]`` -> logits ``[M, N]`` with the given (possibly adapted) parameters.

    Batch norm always uses the statistics of the images passed in (no running statistics), as in
    the course and the MAML paper: the support and query sets are normalized separately.
    """
    x = images
    for i in range(NUM_CONV_LAYERS):
        x = F.conv2d(x, params[f"conv{i}"], params[f"b{i}"], stride=stride, padding=1)
        x = F.batch_norm(x, None, None, training=True)
        x = F.relu(x)
    x = x.mean(dim=(2, 3))  # [M, C]
    return F.linear(x, params["w_head"], params["b_head"])
