"""The course's model, :class:`MultiTaskNet`: one pair of user/item embeddings serves two tasks, a
factorization head that scores whether a user interacts with an item (ranking, trained with negative
sampling) and an MLP head that regresses the rating. With ``embedding_sharing=False`` each task gets
its own embeddings, which is the single-task baseline.

The other rating models are grouped by family: SVD++ and its time-aware versions in ``svdpp.py``,
the autoencoders (I-AutoRec and its relatives) in ``autoencoders.py``, the neighbourhood model in
``neighbourhood.py``; ``predictors.py`` says which ``--model`` builds which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ScaledEmbedding(nn.Embedding):
    """Embedding initialised with N(0, 1/dim^2), as in Spotlight: small dot products at the start."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 1.0 / self.embedding_dim)


class ZeroEmbedding(nn.Embedding):
    """Embedding initialised to zero, for biases."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class MultiTaskNet(nn.Module):
    """Shared (or separate) embeddings with a factorization head and a rating-regression head."""

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 32,
                 layer_sizes: Sequence[int] = (96, 64), embedding_sharing: bool = True) -> None:
        super().__init__()
        self.embedding_sharing = embedding_sharing
        self.user_embeddings = ScaledEmbedding(num_users, embedding_dim)  # U
        self.item_embeddings = ScaledEmbedding(num_items, embedding_dim)  # Q
        self.user_biases = ZeroEmbedding(num_users, 1)  # A
        self.item_biases = ZeroEmbedding(num_items, 1)  # B
        if not embedding_sharing:
            self.regression_user_embeddings = ScaledEmbedding(num_users, embedding_dim)
            self.regression_item_embeddings = ScaledEmbedding(num_items, embedding_dim)
        layers: list[nn.Module] = []
        width = 3 * embedding_dim  # the MLP reads [U, Q, U*Q]
        for size in layer_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.regression_mlp = nn.Sequential(*layers)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` user and item ids -> (interaction logits ``[B]``, predicted ratings ``[B]``)."""
        user = self.user_embeddings(user_ids)  # [B, D]
        item = self.item_embeddings(item_ids)  # [B, D]
        logits = (user * item).sum(-1) + self.user_biases(user_ids).squeeze(-1) + self.item_biases(item_ids).squeeze(-1)
        if not self.embedding_sharing:
            user = self.regression_user_embeddings(user_ids)
            item = self.regression_item_embeddings(item_ids)
        score = self.regression_mlp(torch.cat([user, item, user * item], dim=-1)).squeeze(-1)  # [B]
        return logits, score

    @torch.no_grad()
    def all_logits(self) -> torch.Tensor:
        """``[num_users, num_items]`` factorization logits for every pair, for the ranking metrics."""
        return (self.user_embeddings.weight @ self.item_embeddings.weight.T
                + self.user_biases.weight + self.item_biases.weight.T)
