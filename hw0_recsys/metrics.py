"""Vectorized evaluation: ranking (MRR, Recall@k, NDCG@k) and rating (MSE, RMSE) metrics.

Ranking follows Spotlight's ``mrr_score``, which the course uses: every item is a candidate, items
the user rated in the training data are pushed below all others, each test item's rank counts the
candidates that score higher (ties share the average rank), reciprocal ranks are averaged per user
and then over users. Recall@k and NDCG@k use binary relevance (any rated test item is relevant).
"""

from __future__ import annotations

import math

import torch

RATING_RANGE = (1.0, 5.0)


def reciprocal_ranks(scores: torch.Tensor, train_seen: torch.Tensor, test_users: torch.Tensor,
                     test_items: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """``[T]`` reciprocal rank of each test pair among all items of its user.

    ``scores`` is ``[U, I]`` (higher = more likely), ``train_seen`` the ``[U, I]`` bool mask of training pairs.
    """
    masked = scores.float().masked_fill(train_seen, -math.inf)  # [U, I]
    out = torch.empty(len(test_users), dtype=torch.float64)
    for start in range(0, len(test_users), chunk_size):  # chunks bound memory to chunk_size x I
        users = test_users[start:start + chunk_size]
        rows = masked[users]  # [C, I]
        target = rows.gather(1, test_items[start:start + chunk_size, None])  # [C, 1]
        higher = (rows > target).sum(1)
        tied = (rows == target).sum(1)  # includes the item itself
        out[start:start + len(users)] = 1.0 / (higher + (tied + 1) / 2.0).double().cpu()
    return out


def mean_per_user(values: torch.Tensor, users: torch.Tensor) -> float:
    """Average ``values`` within each user, then over the users that have any."""
    users = users.cpu()
    totals = torch.bincount(users, weights=values.double())
    counts = torch.bincount(users)
    present = counts > 0
    return float((totals[present] / counts[present]).mean())


def mrr_score(scores: torch.Tensor, train_seen: torch.Tensor, test_users: torch.Tensor,
              test_items: torch.Tensor) -> float:
    """Mean reciprocal rank (Spotlight's definition, see the module docstring)."""
    return mean_per_user(reciprocal_ranks(scores, train_seen, test_users, test_items), test_users)


def top_k_metrics(scores: torch.Tensor, train_seen: torch.Tensor, test_seen: torch.Tensor,
                  k: int = 10) -> dict[str, float]:
    """Recall@k and NDCG@k over the users with at least one test item (training items excluded)."""
    masked = scores.float().masked_fill(train_seen, -math.inf)  # [U, I]
    top = masked.topk(k, dim=1).indices  # [U, k]
    hits = test_seen.gather(1, top).double()  # [U, k] 1 where a recommended item is a test item
    num_relevant = test_seen.sum(1)  # [U]
    users = num_relevant > 0
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=scores.device))  # [k]
    dcg = hits @ discounts  # [U]
    ideal = discounts.cumsum(0)[num_relevant.clamp(1, k) - 1]  # [U] DCG of a perfect top-k
    recall = hits.sum(1) / num_relevant.clamp(min=1)
    return {f"recall@{k}": float(recall[users].mean()), f"ndcg@{k}": float((dcg / ideal)[users].mean())}


def rating_metrics(predicted: torch.Tensor, target: torch.Tensor, clip: bool = True) -> dict[str, float]:
    """MSE and RMSE of rating predictions, clipped to the 1..5 star range first (as every MovieLens
    baseline does: a prediction of 5.3 is never worse than 5)."""
    if clip:
        predicted = predicted.clamp(*RATING_RANGE)
    mse = float((predicted.double() - target.double()).square().mean())
    return {"mse": mse, "rmse": math.sqrt(mse)}
