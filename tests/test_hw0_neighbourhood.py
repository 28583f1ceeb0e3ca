"""hw0 ItemNeighbourhood (Koren's global neighbourhood model) on small synthetic ratings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hw0_recsys.data import Ratings
from hw0_recsys.neighbourhood import ItemNeighbourhood, fit_baseline, shrunk_correlation

NUM_USERS, NUM_ITEMS = 30, 40


def planted_ratings(seed: int = 0) -> Ratings:
    """Items come in 4 groups of 10; a user's stars on an item follow their taste for its group, so
    an item's residual is predicted by the residuals of the same group's items (item-item structure)."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(0.0, 1.0, size=(NUM_USERS, 4))  # [U, groups]
    group = np.arange(NUM_ITEMS) // 10  # [I]
    item_bias = rng.normal(0.0, 0.3, size=NUM_ITEMS)
    stars = np.clip(np.rint(3.2 + item_bias[None, :] + taste[:, group] + rng.normal(0, 0.3, (NUM_USERS, NUM_ITEMS))),
                    1, 5)
    users, items = np.nonzero(rng.random((NUM_USERS, NUM_ITEMS)) < 0.6)
    return Ratings(torch.from_numpy(users), torch.from_numpy(items),
                   torch.from_numpy(stars[users, items].astype(np.float32)))


def train_steps(model: ItemNeighbourhood, train: Ratings, steps: int, lr: float = 0.05) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model.predict(train) - train.ratings).square().mean() + model.penalty()
        loss.backward()
        optimizer.step()


def rmse(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return float((predicted - target).detach().square().mean().sqrt())


def test_fits_training_ratings_far_better_than_the_baseline() -> None:
    torch.manual_seed(0)
    train = planted_ratings()
    model = ItemNeighbourhood(NUM_USERS, NUM_ITEMS, train, num_neighbours=15, weight_reg=0.01, implicit_reg=0.01)
    baseline = rmse(model.baseline_scores()[train.users, train.items], train.ratings)
    assert rmse(model.predict(train), train.ratings) == pytest.approx(baseline, abs=1e-5)  # W = C = 0 at init
    train_steps(model, train, 100)
    with torch.no_grad():
        fitted = rmse(model.predict(train), train.ratings)
    assert baseline > 0.8  # the groups' tastes are invisible to user and item biases
    assert fitted < 0.5 * baseline


def test_predict_equals_all_scores_at_the_pairs() -> None:
    torch.manual_seed(0)
    train = planted_ratings()
    model = ItemNeighbourhood(NUM_USERS, NUM_ITEMS, train, num_neighbours=10)
    with torch.no_grad():  # random weights, so the neighbour sums are not trivially zero
        model.weights.normal_()
        model.implicit_weights.normal_()
        pairs = Ratings(torch.tensor([0, 5, 29, 3]), torch.tensor([39, 0, 17, 3]), torch.zeros(4))
        expected = model.all_scores()[pairs.users, pairs.items]
        torch.testing.assert_close(model.predict(pairs), expected)
        # Spell out the formula for one pair: (u, i) = (5, 0).
        u, i = 5, 0
        neighbours = [j for j in range(NUM_ITEMS) if model.mask[i, j] and model.inputs[u, NUM_ITEMS + j]]
        residuals = model.inputs[u, :NUM_ITEMS]
        by_hand = (model.global_mean + model.user_biases[u] + model.item_biases[i]
                   + (sum(residuals[j] * model.weights[i, j] + model.implicit_weights[i, j] for j in neighbours))
                   / len(neighbours) ** 0.5)
        torch.testing.assert_close(expected[1], by_hand)


def test_only_the_k_most_similar_items_are_neighbours() -> None:
    train = planted_ratings()
    model = ItemNeighbourhood(NUM_USERS, NUM_ITEMS, train, num_neighbours=5)
    assert model.mask.diagonal().sum() == 0  # i is never its own neighbour
    assert (model.mask.sum(1) <= 5).all() and model.mask.sum() > 0.9 * 5 * NUM_ITEMS
    # The neighbours are the top 5 of the shrunk similarity row; with planted groups they share i's group.
    similarity = shrunk_correlation(model.inputs[:, :NUM_ITEMS], model.inputs[:, NUM_ITEMS:], 100.0)
    similarity.fill_diagonal_(float("-inf"))
    assert torch.equal(model.mask, torch.zeros_like(model.mask).scatter_(1, similarity.topk(5, dim=1).indices, 1.0))
    same_group = (torch.arange(NUM_ITEMS)[:, None] // 10) == (torch.arange(NUM_ITEMS)[None, :] // 10)
    assert (model.mask.bool() & same_group).sum() > 0.9 * model.mask.sum()


def test_weights_outside_the_neighbourhood_have_no_effect() -> None:
    torch.manual_seed(0)
    train = planted_ratings()
    model = ItemNeighbourhood(NUM_USERS, NUM_ITEMS, train, num_neighbours=5)
    with torch.no_grad():
        model.weights.normal_()
        before = model.all_scores()
        outside = model.mask == 0
        model.weights[outside] += 10.0
        model.implicit_weights[outside] -= 10.0
        torch.testing.assert_close(model.all_scores(), before)
    loss = (model.predict(train) - train.ratings).square().mean() + model.penalty()
    loss.backward()
    assert model.weights.grad[outside].abs().max() == 0 and model.implicit_weights.grad[outside].abs().max() == 0
    assert model.weights.grad[~outside].abs().max() > 0 and model.implicit_weights.grad[~outside].abs().max() > 0


def test_all_items_as_neighbours_keeps_every_co_rated_pair() -> None:
    train = planted_ratings()
    model = ItemNeighbourhood(NUM_USERS, NUM_ITEMS, train, num_neighbours=10_000)
    rated = model.inputs[:, NUM_ITEMS:]
    expected = ((rated.T @ rated) > 0).float().fill_diagonal_(0.0)
    assert torch.equal(model.mask, expected)


def test_baseline_is_regularised_least_squares_on_the_training_ratings() -> None:
    # Two users, two items, stars (0,0)=5, (0,1)=3, (1,0)=4; mu = 4, item_reg = 1, user_reg = 2.
    tiny = Ratings(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), torch.tensor([5.0, 3.0, 4.0]))
    mu, users, items = fit_baseline(tiny, 2, 2, user_reg=2.0, item_reg=1.0, iterations=1)
    assert mu == 4.0
    # One sweep from b_u = 0: b_0 = (1 + 0)/(1 + 2), b_1 = -1/(1 + 1); b_u0 = ((1 - 1/3) + (-1 + 1/2))/(2 + 2).
    torch.testing.assert_close(items, torch.tensor([1 / 3, -1 / 2]))
    torch.testing.assert_close(users, torch.tensor([1 / 24, -1 / 9]))
    # Many sweeps reach the minimum of sum (r - mu - b_u - b_i)^2 + 2 |b_u|^2 + 1 |b_i|^2: zero gradient.
    train = planted_ratings()
    mu, users, items = fit_baseline(train, NUM_USERS, NUM_ITEMS, user_reg=10.0, item_reg=25.0, iterations=200)
    users, items = users.double().requires_grad_(), items.double().requires_grad_()
    objective = ((train.ratings.double() - mu - users[train.users] - items[train.items]).square().sum()
                 + 10.0 * users.square().sum() + 25.0 * items.square().sum())
    objective.backward()
    assert users.grad.abs().max() < 1e-4 and items.grad.abs().max() < 1e-4
    # The model's fixed residuals r_uj - b~_uj come from that fit on the ratings it was given.
    model = ItemNeighbourhood(NUM_USERS, NUM_ITEMS, train, baseline_iterations=200)
    residuals = model.inputs[:, :NUM_ITEMS]
    torch.testing.assert_close(residuals[train.users, train.items], train.ratings - model.baseline_scores()[
        train.users, train.items])
    torch.testing.assert_close(model.baseline_users, users.detach().float(), atol=1e-5, rtol=0)
    assert residuals.count_nonzero() <= len(train)  # unrated entries stay 0


def test_shrunk_correlation_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    rated = (rng.random((12, 5)) < 0.7).astype(np.float32)
    residuals = rng.normal(size=(12, 5)).astype(np.float32) * rated
    got = shrunk_correlation(torch.from_numpy(residuals), torch.from_numpy(rated), shrinkage=3.0)
    i, j = 1, 3
    both = (rated[:, i] > 0) & (rated[:, j] > 0)
    x, y = residuals[both, i], residuals[both, j]
    rho = (x @ y) / np.sqrt((x @ x) * (y @ y))
    assert float(got[i, j]) == pytest.approx(both.sum() / (both.sum() + 3.0) * rho, rel=1e-5)
    torch.testing.assert_close(got, got.T)
