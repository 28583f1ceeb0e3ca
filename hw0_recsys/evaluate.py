"""A trained recommender scored: ranking metrics over all items and rating metrics on the held-out
pairs (:func:`evaluate`), and per-task early stopping, which keeps for each task the weights of the
epoch it was best at on the validation slice (:func:`update_best`, :func:`early_stopped_metrics`)."""

from __future__ import annotations

from pathlib import Path

import torch

from common.checkpoint import atomic_save
from hw0_recsys.data import Ratings, interaction_matrix
from hw0_recsys.metrics import mrr_score, rating_metrics, top_k_metrics
from hw0_recsys.models import MultiTaskNet
from hw0_recsys.svdpp import TimeBaseline, TimeSVDPlusPlus


@torch.no_grad()
def evaluate(model: torch.nn.Module, train: Ratings, test: Ratings, num_users: int, num_items: int,
             predictions_path: Path | None = None) -> dict:
    """Ranking metrics over all items (training items excluded) and rating metrics on the test pairs;
    the predicted ratings are saved to ``predictions_path`` when given."""
    model.eval()
    if not isinstance(model, MultiTaskNet):
        scores = model.all_scores()  # rank by predicted rating
        # A time model's rating depends on the test rating's day, which the scores (at t_u) do not
        # know; every other model's rating is read from the scores, not computed a second time.
        predicted = (model.predict(test) if isinstance(model, (TimeBaseline, TimeSVDPlusPlus))
                     else scores.reshape(-1)[test.users * num_items + test.items])
    else:
        scores = model.all_logits()
        predicted = model(test.users, test.items)[1]
    model.train()
    if predictions_path is not None:
        atomic_save({"users": test.users.cpu(), "items": test.items.cpu(), "ratings": test.ratings.cpu(),
                    "predicted": predicted.cpu()}, predictions_path)
    train_seen = interaction_matrix(train, num_users, num_items)
    metrics = {"mrr": mrr_score(scores, train_seen, test.users, test.items)}
    metrics.update(top_k_metrics(scores, train_seen, interaction_matrix(test, num_users, num_items), k=10))
    metrics.update(rating_metrics(predicted, test.ratings))
    return metrics


# ---------------------------------------------------------------------------- early stopping, per task
BETTER = {"mrr": float.__gt__, "mse": float.__lt__}  # validation metric -> "is this value better?"
RATING_KEYS = ("mse", "rmse")  # the rating task's metrics; every other metric ranks


def update_best(best: dict, metrics: dict, epoch: int, model: torch.nn.Module) -> None:
    """Keep a copy of the weights of the epoch with the best validation MRR and MSE so far."""
    for metric, better in BETTER.items():
        if metric not in best or better(metrics[metric], best[metric]["value"]):
            best[metric] = {"epoch": epoch, "value": metrics[metric],
                            "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def early_stopped_metrics(model: torch.nn.Module, best: dict, rated: Ratings, test: Ratings, num_users: int,
                          num_items: int) -> dict[str, float]:
    """Test metrics as deployed with per-task early stopping: the ranking metrics of the best-MRR
    weights, the rating metrics of the best-MSE weights, and the epochs they came from. ``rated``:
    every known rating (training and validation), whose items are left out of the test ranking."""
    final = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for metric in BETTER:
        model.load_state_dict(best[metric]["model"])
        metrics = evaluate(model, rated, test, num_users, num_items)
        results.update({f"test/{k}": v for k, v in metrics.items() if (k in RATING_KEYS) == (metric == "mse")})
        results[f"best_epoch/{metric}"] = best[metric]["epoch"]
    model.load_state_dict(final)
    return results
