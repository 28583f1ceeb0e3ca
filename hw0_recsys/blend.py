"""BellKor's blend: a regression from several predictors' ratings to the true rating.

The Netflix Prize was won by blending many different predictors (Koren, Bell and Volinsky; Töscher,
Jahrer and Bell 2009): each predictor is trained without a *probe* slice of the training data, a
regression from their probe predictions to the probe ratings is fitted, then every predictor is
retrained on all the training data with the same settings and the regression is applied to its test
predictions. Nothing here reads a test rating: :func:`fit_blend` sees only probe data.

The regression is ridge (closed form, intercept not penalised) on the clipped predictions and,
optionally, on *meta-features* as BellKor used them: the log support of the user and of the item
(how many training ratings they have) and their products with each prediction, so that the weight
of a predictor can depend on how much data the user or item has (a neighbourhood model is worth more
for a heavy user, a factor model for a rare item). The penalty and whether to use the meta-features
are chosen by k-fold cross-validation on the probe slice itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.errors import CS330Error
from hw0_recsys.data import VAL_SPLIT_SEED, Split, holdout

RIDGE_CHOICES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative to the number of probe ratings, see fit_ridge
CV_FOLDS = 5
CV_SEED = 0


def blend_features(predicted: torch.Tensor, user_support: torch.Tensor, item_support: torch.Tensor,
                   meta: bool) -> torch.Tensor:
    """``[R, M]`` predictions of M predictors -> ``[R, F]`` regression features (float64), a column of
    ones first. ``user_support``/``item_support``: ``[R]`` training-rating counts of each pair's user and item."""
    predicted = predicted.double().clamp(1.0, 5.0)  # as they are scored: a wild prediction gets no leverage
    columns = [torch.ones(len(predicted), 1, dtype=torch.float64), predicted]
    if meta:
        for support in (user_support, item_support):
            log_support = torch.log1p(support.double())[:, None]  # [R, 1]
            columns += [log_support, predicted * log_support]
    return torch.cat(columns, dim=1)


def fit_ridge(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """``[F]`` weights minimising ``|X w - y|^2 + ridge * R * |w[1:]|^2`` (R = rows: the penalty is
    per rating, so one ridge value means the same on probe slices of any size)."""
    penalty = torch.full((features.shape[1],), ridge * len(features), dtype=torch.float64)
    penalty[0] = 0.0  # the intercept is free
    gram = features.T @ features + torch.diag(penalty)
    return torch.linalg.solve(gram, features.T @ targets.double())


def cross_validated_rmse(features: torch.Tensor, targets: torch.Tensor, ridge: float) -> float:
    """RMSE of :func:`fit_ridge` over ``CV_FOLDS`` seeded folds of the rows (each row predicted once)."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(CV_SEED))
    squared_error = 0.0
    for held in order.chunk(CV_FOLDS):
        kept = torch.ones(len(features), dtype=torch.bool)
        kept[held] = False
        weights = fit_ridge(features[kept], targets[kept], ridge)
        squared_error += float(((features[held] @ weights).clamp(1.0, 5.0) - targets[held].double()).square().sum())
    return (squared_error / len(features)) ** 0.5


@dataclass
class Blend:
    """A fitted blend: the chosen settings, the weights on the full probe slice, and every setting's
    cross-validated probe RMSE (``{(meta, ridge): rmse}``)."""

    meta: bool
    ridge: float
    weights: torch.Tensor  # [F], in blend_features' column order
    cv_rmse: dict[tuple[bool, float], float]

    def predict(self, predicted: torch.Tensor, user_support: torch.Tensor, item_support: torch.Tensor) -> torch.Tensor:
        """``[R, M]`` predictions (same predictors, same order as when fitted) -> ``[R]`` blended ratings."""
        features = blend_features(predicted, user_support, item_support, self.meta)
        return (features @ self.weights).float()


def fit_blend(predicted: torch.Tensor, ratings: torch.Tensor, user_support: torch.Tensor,
              item_support: torch.Tensor) -> Blend:
    """Choose meta-features on/off and the ridge penalty by cross-validation on the probe slice, then
    fit on all of it. ``predicted`` ``[R, M]``: the probe predictions; ``ratings`` ``[R]``: the probe's."""
    cv_rmse = {}
    for meta in (False, True):
        features = blend_features(predicted, user_support, item_support, meta)
        for ridge in RIDGE_CHOICES:
            cv_rmse[(meta, ridge)] = cross_validated_rmse(features, ratings, ridge)
    meta, ridge = min(cv_rmse, key=cv_rmse.get)
    weights = fit_ridge(blend_features(predicted, user_support, item_support, meta), ratings, ridge)
    return Blend(meta, ridge, weights, cv_rmse)


def support_counts(users: torch.Tensor, items: torch.Tensor, train_users: torch.Tensor, train_items: torch.Tensor,
                   num_users: int, num_items: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R]`` training-rating counts of each pair's user and item, times ``scale``. The probe's
    predictors trained on a fraction f of the fold: scale = 1 / f puts its counts on the scale of the
    whole fold's, which the retrained predictors saw."""
    user_counts = torch.bincount(train_users, minlength=num_users).double() * scale  # [U]
    item_counts = torch.bincount(train_items, minlength=num_items).double() * scale  # [I]
    return user_counts[users], item_counts[items]


def stacked_predictions(runs: Sequence[dict], users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``[R, M]``: the ``predicted`` column of each run's saved predictions (``predictions.pt``),
    checked to be of the pairs ``users``/``items`` in that order."""
    for run in runs:
        if not (torch.equal(run["users"], users) and torch.equal(run["items"], items)):
            raise CS330Error("blended runs were evaluated on different pairs; were they run on the same fold "
                             "with the same --val_fraction?")
    return torch.stack([run["predicted"].float() for run in runs], dim=1)


def blend_fold(probe_runs: Sequence[dict], full_runs: Sequence[dict], split: Split,
               probe_fraction: float) -> tuple[Blend, torch.Tensor]:
    """Fit the blend on the probe predictions, apply it to the test predictions of the retrained runs.

    ``probe_runs``: each predictor's predictions of the probe slice, trained with ``--val_fraction
    probe_fraction`` on ``split``'s fold; ``full_runs``: the same predictors trained on the whole fold,
    predicting its test pairs. The probe ratings are taken from ``split.train``; the test ratings saved
    in ``full_runs`` are never read. Returns the blend and the ``[T]`` blended test predictions.
    """
    rest, probe = holdout(split.train, probe_fraction, VAL_SPLIT_SEED)  # as train.py --val_fraction splits
    probe_predicted = stacked_predictions(probe_runs, probe.users, probe.items)  # [P, M]
    test_users, test_items = full_runs[0]["users"], full_runs[0]["items"]
    test_predicted = stacked_predictions(full_runs, test_users, test_items)  # [T, M]
    sizes = (split.num_users, split.num_items)
    blend = fit_blend(probe_predicted, probe.ratings, *support_counts(
        probe.users, probe.items, rest.users, rest.items, *sizes, scale=len(split.train) / len(rest)))
    blended = blend.predict(test_predicted, *support_counts(
        test_users, test_items, split.train.users, split.train.items, *sizes))
    return blend, blended
