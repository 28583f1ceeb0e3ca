"""hw0 time models (TimeBaseline, timeSVD++) on a small synthetic data set with planted time effects."""

from __future__ import annotations

import pytest
import torch

from common.errors import CS330Error
from hw0_recsys.data import Ratings, holdout
from hw0_recsys.svdpp import TimeBaseline, TimeSVDPlusPlus

NUM_USERS, NUM_ITEMS = 30, 40
CENTER = 10_100  # every user's ratings are symmetric around CENTER + shift_u, so t_u is a whole day


def synthetic_ratings(seed: int = 0) -> tuple[Ratings, torch.Tensor]:
    """24 ratings per user on 8 days (3 a day) at t_u +- k, k >= 1, so t_u itself is never a rating day.
    Stars = 3.5 + b_u + b_i + drift_u dev_u(t) + a (user, day) effect + noise; returns (ratings, t_u)."""
    gen = torch.Generator().manual_seed(seed)
    user_bias, item_bias = 0.5 * torch.randn(NUM_USERS, generator=gen), 0.5 * torch.randn(NUM_ITEMS, generator=gen)
    drift = 0.15 * torch.randn(NUM_USERS, generator=gen)
    mean_days = CENTER + torch.randint(-20, 21, (NUM_USERS,), generator=gen)  # [U]
    users, items, days, stars = [], [], [], []
    for user in range(NUM_USERS):
        offsets = torch.randperm(60, generator=gen)[:4] + 1  # 4 distinct k in 1..60
        user_days = torch.cat([mean_days[user] + offsets, mean_days[user] - offsets]).repeat_interleave(3)  # [24]
        gap = (user_days - mean_days[user]).float()
        day_effect = (0.4 * torch.randn(8, generator=gen)).repeat_interleave(3)
        user_items = torch.randperm(NUM_ITEMS, generator=gen)[:24]
        stars.append(3.5 + user_bias[user] + item_bias[user_items] + drift[user] * gap.sign() * gap.abs() ** 0.4
                     + day_effect + 0.1 * torch.randn(24, generator=gen))
        users.append(torch.full((24,), user))
        items.append(user_items)
        days.append(user_days)
    ratings = Ratings(torch.cat(users), torch.cat(items), torch.cat(stars).float(), torch.cat(days))
    return ratings, mean_days


def fit(model: torch.nn.Module, train: Ratings, params: list[torch.nn.Parameter] | None = None,
        steps: int = 100) -> torch.nn.Module:
    """Full-batch Adam on the mean squared error plus the model's penalty, as train.py trains it."""
    optimizer = torch.optim.Adam(params or [p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = (model.predict(train) - train.ratings).square().mean() + model.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rmse(model: torch.nn.Module, ratings: Ratings) -> float:
    with torch.no_grad():
        return float((model.predict(ratings) - ratings.ratings).square().mean().sqrt())


def build(kind: str, train: Ratings) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "baseline":
        return TimeBaseline(NUM_USERS, NUM_ITEMS, train)
    return TimeSVDPlusPlus(NUM_USERS, NUM_ITEMS, train, embedding_dim=4)


@pytest.mark.parametrize("kind", ["baseline", "svdpp"])
def test_time_models_fit_training_ratings(kind):
    train, _ = synthetic_ratings()
    global_mean_rmse = float((train.ratings - train.ratings.mean()).square().mean().sqrt())
    model = build(kind, train)
    assert rmse(model, train) == pytest.approx(global_mean_rmse, rel=0.05)  # untrained: about the global mean
    fit(model, train)
    assert rmse(model, train) < 0.4 * global_mean_rmse


def test_time_baseline_captures_planted_time_effects():
    train, held_out = holdout(synthetic_ratings()[0], 0.25, 7)
    timed = fit(build("baseline", train), train)
    # The same model with its time terms left at their zero initialisation is mu + b_u + b_i.
    plain = build("baseline", train)
    fit(plain, train, params=[plain.global_mean, plain.user_biases, plain.item_biases])
    assert rmse(timed, held_out) < 0.6 * rmse(plain, held_out)
    assert timed.user_drifts.abs().max() > 0.05 and timed.day_biases.abs().max() > 0.1


@pytest.mark.parametrize("kind", ["baseline", "svdpp"])
def test_unseen_days_get_no_day_terms_and_match_all_scores(kind):
    train, mean_days = synthetic_ratings()
    model = fit(build(kind, train), train)
    baseline = model if kind == "baseline" else model.baseline
    assert torch.equal(baseline.user_mean_day + baseline.first_day, mean_days.float())  # t_u as planted
    users = torch.arange(NUM_USERS).repeat_interleave(NUM_ITEMS)
    items = torch.arange(NUM_ITEMS).repeat(NUM_USERS)
    # At t_u, a day no user rated on: dev = 0 and no b_{u,t}, c_{u,t}, which is what all_scores() scores.
    at_mean = Ratings(users, items, torch.zeros(len(users)), mean_days[users])
    with torch.no_grad():
        assert torch.allclose(model.predict(at_mean), model.all_scores().reshape(-1), atol=1e-5)
        # Zeroing the day-specific terms changes the training ratings' predictions, not those of unseen
        # (user, day) pairs: t_u, a day only some users rated on, and days outside the training period.
        day = train.days[0]
        rated_that_day = torch.zeros(NUM_USERS, dtype=torch.bool)
        rated_that_day[train.users[train.days == day]] = True  # [U]
        other_day = day.repeat(len(users))
        unseen = [at_mean, Ratings(users, items, at_mean.ratings, other_day),
                  Ratings(users, items, at_mean.ratings, mean_days[users] + 1000)]
        before = [model.predict(r) for r in [train, *unseen]]
        baseline.day_biases.zero_()
        baseline.day_scales.zero_()
        after = [model.predict(r) for r in [train, *unseen]]
    assert (before[0] - after[0]).abs().max() > 0.05
    assert torch.equal(before[1], after[1]) and torch.equal(before[3], after[3]) and before[3].isfinite().all()
    others = ~rated_that_day[users]
    assert others.any() and torch.equal(before[2][others], after[2][others])
    assert (before[2][~others] - after[2][~others]).abs().max() > 1e-3


@pytest.mark.parametrize("model_class", [TimeBaseline, TimeSVDPlusPlus])
def test_time_models_need_days(model_class):
    train, _ = synthetic_ratings()
    no_days = Ratings(train.users, train.items, train.ratings)
    with pytest.raises(CS330Error, match="days=None"):
        model_class(NUM_USERS, NUM_ITEMS, no_days)
    model = model_class(NUM_USERS, NUM_ITEMS, train)
    with pytest.raises(CS330Error, match="days=None"):
        model.predict(no_days)
