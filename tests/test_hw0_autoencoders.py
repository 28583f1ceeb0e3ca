"""hw0 autoencoders (U-AutoRec, GLocal-K's local-kernel autoencoder) on a small synthetic rating set."""

from __future__ import annotations

import pytest
import torch

from hw0_recsys.autoencoders import KernelAutoRec, KernelLinear, UserAutoRec
from hw0_recsys.data import Ratings, holdout

NUM_USERS, NUM_ITEMS = 30, 40
SMALL = {"hidden_size": 32}  # both models take hidden_size; a small one keeps the tests fast


def synthetic_ratings(seed: int = 0) -> Ratings:
    """Low-rank 1..5 stars; the last user and the last item have no rating at all."""
    generator = torch.Generator().manual_seed(seed)
    users, items = torch.meshgrid(torch.arange(NUM_USERS - 1), torch.arange(NUM_ITEMS - 1), indexing="ij")
    keep = torch.rand(users.shape, generator=generator) < 0.5
    users, items = users[keep], items[keep]
    user_factors = torch.randn(NUM_USERS, 2, generator=generator)
    item_factors = torch.randn(NUM_ITEMS, 2, generator=generator)
    stars = (3 + (user_factors[users] * item_factors[items]).sum(-1)).round().clamp(1, 5)
    return Ratings(users, items, stars.float())


def build(model_class: type, train: Ratings, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_class(NUM_USERS, NUM_ITEMS, train, **kwargs)


@pytest.mark.parametrize("model_class", [UserAutoRec, KernelAutoRec])
def test_fits_the_training_ratings(model_class):
    train = synthetic_ratings()
    # The defaults' L2 strengths are tuned for 72,000 ratings; on ~570 they would dominate the loss.
    model = build(model_class, train, **SMALL, weight_reg=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):  # the training script's full-batch loop
        loss = (model.predict(train) - train.ratings).square().mean() + model.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        rmse = (model.predict(train) - train.ratings).square().mean().sqrt()
    baseline = (train.ratings - train.ratings.mean()).square().mean().sqrt()
    assert rmse < 0.5 * baseline


@pytest.mark.parametrize("model_class", [UserAutoRec, KernelAutoRec])
def test_predict_reads_all_scores(model_class):
    train = synthetic_ratings()
    model = build(model_class, train, **SMALL)
    pairs = Ratings(torch.tensor([0, 5, 29, 3]), torch.tensor([1, 39, 2, 7]), torch.zeros(4))
    with torch.no_grad():
        scores = model.all_scores()
        assert scores.shape == (NUM_USERS, NUM_ITEMS)
        torch.testing.assert_close(model.predict(pairs), scores[pairs.users, pairs.items])


@pytest.mark.parametrize("model_class", [UserAutoRec, KernelAutoRec])
def test_users_and_items_without_training_ratings_get_the_global_mean(model_class):
    train = synthetic_ratings()
    model = build(model_class, train, **SMALL)
    with torch.no_grad():
        scores = model.all_scores()
    mean = float(train.ratings.mean())
    assert torch.all(scores[-1] == mean) and torch.all(scores[:, -1] == mean)  # user 29 and item 39: unrated
    assert not torch.any(scores[:-1, :-1] == mean)  # every other pair is the network's own prediction


def test_held_out_ratings_never_enter_the_input():
    train, held = holdout(synthetic_ratings(), 0.2, 1)
    expected = torch.zeros(NUM_USERS, NUM_ITEMS)  # [U, I]
    expected[train.users, train.items] = train.ratings
    user_input = build(UserAutoRec, train, **SMALL).autoencoder.item_ratings  # [U, I]: one row per user
    kernel_input = build(KernelAutoRec, train, **SMALL).item_ratings  # [I, U]: one row per item
    torch.testing.assert_close(user_input, expected, rtol=0, atol=0)
    torch.testing.assert_close(kernel_input, expected.T, rtol=0, atol=0)
    assert torch.all(user_input[held.users, held.items] == 0)
    assert torch.all(kernel_input[held.items, held.users] == 0)


def test_kernel_is_finite_support():
    layer = KernelLinear(50, 60, kernel_dim=3)
    with torch.no_grad():  # spread the points so that some pairs are inside the support, some outside
        layer.u.uniform_(-0.6, 0.6)
        layer.v.uniform_(-0.6, 0.6)
        kernel = layer.kernel()  # [50, 60]
    distance = torch.cdist(layer.u.double(), layer.v.double())  # exact reference, in float64
    assert kernel.min() >= 0 and kernel.max() <= 1
    assert torch.all(kernel[distance >= 1 + 1e-5] == 0)  # the margin covers float32 rounding only
    inside = distance < 1
    assert 0.1 < inside.double().mean() < 0.9  # both cases are exercised
    torch.testing.assert_close(kernel[inside].double(), 1 - distance[inside] ** 2, atol=1e-5, rtol=0)
    x = torch.randn(4, 50)
    torch.testing.assert_close(layer(x), x @ (layer.weight * kernel) + layer.bias)  # the kernel gates W


def test_kernel_penalty_formula():
    train = synthetic_ratings()
    model = build(KernelAutoRec, train, hidden_size=8, weight_reg=3.0, kernel_reg=0.5)
    expected = sum(3.0 * layer.weight.square().sum() + 0.5 * layer.kernel().square().sum()
                   for layer in model.layers) / len(train)
    torch.testing.assert_close(model.penalty(), expected)
    assert [layer.weight.shape for layer in model.layers] == [(NUM_USERS, 8), (8, 8), (8, NUM_USERS)]


def test_user_autorec_penalty_is_item_autorecs_with_its_strength():
    train = synthetic_ratings()
    model = build(UserAutoRec, train, hidden_size=8, weight_reg=4.0)
    inner = model.autoencoder
    squares = inner.encoder.weight.square().sum() + inner.decoder.weight.square().sum()
    torch.testing.assert_close(model.penalty(), 4.0 / 2 * squares / len(train))
    assert inner.encoder.weight.shape == (8, NUM_ITEMS)  # the input is a user's row over all items
