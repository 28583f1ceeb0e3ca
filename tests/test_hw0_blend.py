"""BellKor's blend (hw0_recsys/blend.py): the ridge fit, the cross-validated choice, and that fitting
it never reads a test rating."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import CS330Error
from hw0_recsys.blend import blend_features, blend_fold, fit_blend, fit_ridge, stacked_predictions
from hw0_recsys.data import load_split
from hw0_recsys.train import main as train_main
from tests.test_hw0_recsys import write_synthetic_ml100k


def test_fit_ridge_recovers_linear_weights_and_leaves_the_intercept_free():
    generator = torch.Generator().manual_seed(0)
    features = torch.cat([torch.ones(500, 1), torch.rand(500, 3, generator=generator)], dim=1).double()
    weights = torch.tensor([2.0, 0.5, -0.3, 0.1], dtype=torch.float64)
    assert torch.allclose(fit_ridge(features, features @ weights, 0.0), weights, atol=1e-9)
    # a huge penalty shrinks every slope to 0, and the free intercept becomes the mean target
    heavy = fit_ridge(features, features @ weights, 1e9)
    assert heavy[1:].abs().max() < 1e-6
    assert heavy[0] == pytest.approx(float((features @ weights).mean()), abs=1e-6)


def test_blend_of_two_noisy_predictors_beats_each_and_uses_support_when_it_matters():
    generator = torch.Generator().manual_seed(1)
    size = 4000
    truth = 1 + 4 * torch.rand(size, generator=generator)
    user_support = torch.randint(1, 300, (size,), generator=generator)
    item_support = torch.randint(1, 300, (size,), generator=generator)
    # predictor 0 is good for heavy users, predictor 1 for light ones: only meta-features can tell
    heavy = (user_support > 150).float()
    noise = torch.randn(size, 2, generator=generator)
    predicted = torch.stack([truth + noise[:, 0] * (0.2 + 0.8 * (1 - heavy)),
                             truth + noise[:, 1] * (0.2 + 0.8 * heavy)], dim=1)
    blend = fit_blend(predicted[:3000], truth[:3000], user_support[:3000], item_support[:3000])
    assert blend.meta
    blended = blend.predict(predicted[3000:], user_support[3000:], item_support[3000:])
    rmse = lambda p: float((p.clamp(1, 5) - truth[3000:]).square().mean().sqrt())  # noqa: E731
    assert rmse(blended) < 0.9 * min(rmse(predicted[3000:, 0]), rmse(predicted[3000:, 1]))
    assert blend_features(predicted, user_support, item_support, meta=True).shape == (size, 1 + 2 + 2 * 3)


def test_runs_of_different_pairs_are_refused():
    run = {"users": torch.tensor([0, 1]), "items": torch.tensor([2, 3]), "predicted": torch.tensor([3.0, 4.0])}
    with pytest.raises(CS330Error, match="different pairs"):
        stacked_predictions([run], torch.tensor([0, 1]), torch.tensor([3, 2]))


def write_fold(root, shuffle_test_ratings: bool) -> None:
    """The synthetic u.data split 80/20 into u1.base/u1.test; optionally the test ratings permuted."""
    write_synthetic_ml100k(root)
    folder = root / "ml-100k"
    lines = (folder / "u.data").read_text().splitlines()
    order = np.random.default_rng(0).permutation(len(lines))
    test = [lines[i].split("\t") for i in sorted(order[: len(lines) // 5])]
    if shuffle_test_ratings:
        stars = np.random.default_rng(1).permutation([row[2] for row in test])
        test = [[user, item, star, stamp] for (user, item, _, stamp), star in zip(test, stars)]
    (folder / "u1.base").write_text("\n".join(lines[i] for i in sorted(order[len(lines) // 5:])) + "\n")
    (folder / "u1.test").write_text("\n".join("\t".join(row) for row in test) + "\n")


@pytest.mark.slow
def test_blend_weights_do_not_depend_on_the_test_ratings(tmp_path):
    """The whole pipeline (probe runs, full runs, blend) on a fold, then again with the test
    ratings shuffled: the same blend, the same blended predictions."""
    results = []
    for shuffled in (False, True):
        root = tmp_path / f"shuffled{int(shuffled)}"
        write_fold(root / "data", shuffled)
        probe_runs, full_runs = [], []
        for model in (["--model", "svdpp", "--embedding_dim", "4"], ["--model", "autorec", "--embedding_dim", "8"]):
            for runs, extra in ((probe_runs, ["--val_fraction", "0.1"]), (full_runs, [])):
                log_dir = root / f"{model[1]}{len(extra)}"
                train_main(["--data_dir", str(root / "data"), "--log_dir", str(log_dir), "--device", "cpu",
                            "--split", "u1", "--num_epochs", "30", "--save_predictions", *model, *extra])
                runs.append(torch.load(log_dir / "predictions.pt", weights_only=True))
        results.append(blend_fold(probe_runs, full_runs, load_split("u1", root / "data"), 0.1))
    (first, first_blended), (second, second_blended) = results
    assert not torch.equal(full_runs[0]["ratings"], load_split("u1", tmp_path / "shuffled0" / "data").test.ratings)
    assert (first.meta, first.ridge) == (second.meta, second.ridge)
    assert torch.equal(first.weights, second.weights)
    assert torch.equal(first_blended, second_blended)
