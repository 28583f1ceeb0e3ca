"""hw0 recommender: parsing, splits, metrics on hand-computed examples, training, seeding, resume, flags.

Training tests run on a tiny synthetic ml-100k-shaped folder generated in tmp_path (no real data
is copied); the split-size tests use the real MovieLens 100K through CS330_DATA_MIRROR when set.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from common.errors import CS330Error
from hw0_recsys import train as train_script
from hw0_recsys.data import Ratings, holdout, load_split, read_ratings
from hw0_recsys.metrics import mrr_score, rating_metrics, top_k_metrics
from hw0_recsys.model import MultiTaskNet


def write_synthetic_ml100k(root, num_users: int = 40, num_items: int = 60, per_user: int = 25) -> None:
    """A low-rank 1..5 star data set in the u.data format (every user and item id appears)."""
    rng = np.random.default_rng(0)
    user_factors, item_factors = rng.normal(size=(num_users, 3)), rng.normal(size=(num_items, 3))
    rows = []
    for user in range(num_users):
        items = rng.choice(num_items, per_user, replace=False)
        items[0] = user % num_items  # makes sure every item id is used
        items[1] = (user + num_users) % num_items
        for item in set(items.tolist()):
            stars = int(np.clip(np.rint(3 + user_factors[user] @ item_factors[item]), 1, 5))
            rows.append(f"{user + 1}\t{item + 1}\t{stars}\t{880000000 + len(rows)}")
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("\n".join(rows) + "\n")


@pytest.fixture
def synthetic_dir(tmp_path):
    write_synthetic_ml100k(tmp_path / "data")
    return tmp_path / "data"


def train_args(data_dir, log_dir, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--log_dir", str(log_dir), "--device", "cpu", *extra]


def metrics_only(results: dict) -> dict:
    return {key: value for key, value in results.items() if key != "train_seconds"}


# ---------------------------------------------------------------- parsing and splits

def test_read_ratings_parses_and_makes_ids_zero_based(tmp_path):
    path = tmp_path / "ratings.tsv"
    path.write_text("196\t242\t3\t881250949\n1\t1\t5\t874965758\n")
    ratings = read_ratings(path)
    assert ratings.users.tolist() == [195, 0]
    assert ratings.items.tolist() == [241, 0]
    assert ratings.ratings.tolist() == [3.0, 5.0]
    assert ratings.ratings.dtype == torch.float32


@pytest.mark.parametrize("content", ["1\t2\tthree\t4\n", "1\t2\t9\t4\n", "0\t2\t3\t4\n", "1\t2\n"])
def test_read_ratings_rejects_malformed_files(tmp_path, content):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(CS330Error):
        read_ratings(path)


def test_holdout_is_a_disjoint_partition(synthetic_dir):
    everything = read_ratings(synthetic_dir / "ml-100k" / "u.data")
    kept, held = holdout(everything, 0.2, seed=3)
    assert len(kept) + len(held) == len(everything)
    assert len(held) == round(0.2 * len(everything))
    kept_pairs = set(zip(kept.users.tolist(), kept.items.tolist()))
    held_pairs = set(zip(held.users.tolist(), held.items.tolist()))
    assert not kept_pairs & held_pairs
    assert holdout(everything, 0.2, seed=3)[1].users.tolist() == held.users.tolist()  # seeded


needs_mirror = pytest.mark.skipif(not os.environ.get("CS330_DATA_MIRROR"),
                                  reason="CS330_DATA_MIRROR is not set: the real MovieLens 100K is not available")


@needs_mirror
@pytest.mark.parametrize("name, train_size, test_size", [("u1", 80000, 20000), ("ua", 90570, 9430),
                                                         ("random", 95000, 5000)])
def test_real_split_sizes_and_disjointness(name, train_size, test_size):
    split = load_split(name)
    assert (split.num_users, split.num_items) == (943, 1682)
    assert (len(split.train), len(split.test)) == (train_size, test_size)
    train_keys = set((split.train.users * split.num_items + split.train.items).tolist())
    test_keys = set((split.test.users * split.num_items + split.test.items).tolist())
    assert len(train_keys) == train_size and not train_keys & test_keys


# ---------------------------------------------------------------- metrics

def test_mrr_matches_hand_computed_example():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],
                           [0.2, 0.2, 0.8, 0.1]])
    train_seen = torch.tensor([[True, False, False, False],
                               [False, False, False, False]])
    # user 0: item 0 is a training item, so item 2 ranks 1st and item 1 3rd -> (1 + 1/3) / 2
    # user 1: item 0 ties with item 1 behind item 2 -> average rank 2.5 -> 0.4
    mrr = mrr_score(scores, train_seen, torch.tensor([0, 0, 1]), torch.tensor([2, 1, 0]))
    assert mrr == pytest.approx(((1 + 1 / 3) / 2 + 0.4) / 2)


def test_recall_and_ndcg_match_hand_computed_example():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],
                           [0.2, 0.3, 0.8, 0.1],
                           [0.1, 0.2, 0.3, 0.4]])
    train_seen = torch.tensor([[True, False, False, False], [False] * 4, [False] * 4])
    test_seen = torch.tensor([[False, True, True, False],  # top-2 = items 2, 3: one hit at rank 1
                              [False, False, False, True],  # top-2 = items 2, 1: no hit
                              [False] * 4])  # no test items: not counted
    metrics = top_k_metrics(scores, train_seen, test_seen, k=2)
    assert metrics["recall@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["ndcg@2"] == pytest.approx((1.0 / (1.0 + 1.0 / math.log2(3)) + 0.0) / 2)


def test_rating_metrics_clip_to_the_star_range():
    metrics = rating_metrics(torch.tensor([6.0, 0.5, 3.0]), torch.tensor([5.0, 1.0, 4.0]))
    assert metrics["mse"] == pytest.approx(1 / 3)
    assert metrics["rmse"] == pytest.approx(math.sqrt(1 / 3))


# ---------------------------------------------------------------- training

def scalar_curve(run_dir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_short_multitask_run_lowers_both_losses(synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    results = train_script.main(train_args(synthetic_dir, run_dir, "--num_epochs", "8", "--batch_size", "64",
                                           "--lr", "0.01"))
    factorization = scalar_curve(run_dir, "train/factorization_loss")
    regression = scalar_curve(run_dir, "train/regression_loss")
    assert len(factorization) == len(regression) == 8
    assert factorization[-1] < factorization[0]
    assert regression[-1] < 0.5 * regression[0]
    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved["metrics"]) >= {"test/mrr", "test/recall@10", "test/ndcg@10", "test/mse", "test/rmse"}
    assert 0 < results["test/mrr"] <= 1


def test_svdpp_run_fits_the_ratings_and_val_fraction_avoids_test(synthetic_dir, tmp_path):
    results = train_script.main(train_args(synthetic_dir, tmp_path / "run", "--model", "svdpp", "--num_epochs", "60",
                                           "--embedding_dim", "8", "--val_fraction", "0.1"))
    assert set(results) == {"val/mrr", "val/recall@10", "val/ndcg@10", "val/mse", "val/rmse", "train_seconds"}
    regression = scalar_curve(tmp_path / "run", "train/regression_loss")
    assert regression[-1] < 0.5 * regression[0]


def test_autorec_run_fits_the_ratings_and_saves_predictions(synthetic_dir, tmp_path):
    results = train_script.main(train_args(synthetic_dir, tmp_path / "run", "--model", "autorec", "--num_epochs",
                                           "60", "--embedding_dim", "16", "--autorec_reg", "1", "--save_predictions"))
    regression = scalar_curve(tmp_path / "run", "train/regression_loss")
    assert regression[-1] < 0.5 * regression[0]
    saved = torch.load(tmp_path / "run" / "predictions.pt", weights_only=True)
    assert saved["predicted"].shape == saved["ratings"].shape == saved["users"].shape
    assert rating_metrics(saved["predicted"], saved["ratings"])["rmse"] == pytest.approx(results["test/rmse"])


def test_factorization_losses_match_their_formulas():
    args = train_script.parse_args(["--factorization_weight", "1", "--regression_weight", "0"])
    model = MultiTaskNet(3, 4, embedding_dim=2)
    batch = Ratings(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([4.0, 2.0, 5.0]))
    positive, _ = model(batch.users, batch.items)
    expected = {}
    for loss_name in ("course", "bpr", "pointwise"):
        args.factorization_loss = loss_name
        generator = torch.Generator().manual_seed(0)
        negative, _ = model(batch.users, torch.randint(4, (3,), generator=torch.Generator().manual_seed(0)))
        expected = {"course": (1 - torch.sigmoid(positive - negative)).mean(),
                    "bpr": -torch.log(torch.sigmoid(positive - negative)).mean(),
                    "pointwise": (1 - torch.sigmoid(positive) + torch.sigmoid(negative)).mean()}
        losses = train_script.training_losses(args, model, batch, generator)
        assert float(losses["factorization_loss"]) == pytest.approx(float(expected[loss_name]), rel=1e-5)


def test_implicit_from_test_adds_test_items_to_n_u_but_not_their_ratings(synthetic_dir, tmp_path):
    split = load_split("random", synthetic_dir)
    args = train_script.parse_args(["--model", "svdpp", "--embedding_dim", "4"])
    rated = Ratings(torch.cat([split.train.users, split.test.users]), torch.cat([split.train.items, split.test.items]),
                    torch.zeros(len(split.train) + len(split.test)))
    plain = train_script.build_model(args, split.train, split.num_users, split.num_items)
    transductive = train_script.build_model(args, split.train, split.num_users, split.num_items, rated)
    user, item = int(split.test.users[0]), int(split.test.items[0])
    assert plain.implicit.to_dense()[user, item] == 0 < transductive.implicit.to_dense()[user, item]
    assert torch.equal(plain.user_weights, transductive.user_weights)  # L2 still counts training ratings only
    assert torch.equal(plain.implicit_weights, transductive.implicit_weights)
    results = train_script.main(train_args(synthetic_dir, tmp_path / "run", "--model", "svdpp", "--num_epochs", "5",
                                           "--embedding_dim", "4", "--implicit_from_test"))
    assert math.isfinite(results["test/rmse"])


def test_same_seed_reproduces_and_other_seed_differs(synthetic_dir, tmp_path):
    flags = ("--num_epochs", "2", "--batch_size", "64")
    first = train_script.main(train_args(synthetic_dir, tmp_path / "a", *flags))
    second = train_script.main(train_args(synthetic_dir, tmp_path / "b", *flags))
    other = train_script.main(train_args(synthetic_dir, tmp_path / "c", *flags, "--seed", "1"))
    assert metrics_only(first) == metrics_only(second)
    assert metrics_only(first) != metrics_only(other)


class SimulatedKill(Exception):
    pass


@pytest.mark.parametrize("model_flags", [("--batch_size", "64"), ("--model", "svdpp", "--embedding_dim", "8")])
def test_resume_after_a_kill_gives_identical_final_metrics(synthetic_dir, tmp_path, monkeypatch, model_flags):
    flags = ("--num_epochs", "4", "--checkpoint_every", "1", "--eval_every", "1", *model_flags)
    uninterrupted = train_script.main(train_args(synthetic_dir, tmp_path / "full", *flags))

    real_save = train_script.save_checkpoint

    def save_then_die(run_dir, step, state, keep_last=None):
        path = real_save(run_dir, step, state, keep_last)
        if step == 2:
            raise SimulatedKill  # dies right after the epoch-2 checkpoint, before epoch 3 starts
        return path

    monkeypatch.setattr(train_script, "save_checkpoint", save_then_die)
    with pytest.raises(SimulatedKill):
        train_script.main(train_args(synthetic_dir, tmp_path / "killed", *flags))
    monkeypatch.setattr(train_script, "save_checkpoint", real_save)
    torch.manual_seed(12345)  # a restarted process has fresh global RNG state; resume must restore it
    resumed = train_script.main(train_args(synthetic_dir, tmp_path / "killed", *flags, "--resume"))
    assert metrics_only(resumed) == metrics_only(uninterrupted)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags", [
    ["--factorization_weight", "-1"],
    ["--factorization_weight", "0", "--regression_weight", "0"],
    ["--layer_sizes", "96,x"],
    ["--val_fraction", "1.5"],
    ["--test_fraction", "0"],
    ["--batch_size", "-3"],
    ["--split", "u9"],
    ["--num_epochs", "0"],
    ["--model", "svdpp", "--autorec_reg", "-1"],
    ["--factorization_loss", "hinge"],
])
def test_bad_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(flags)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_resume_without_checkpoint_and_overwrite_are_refused(synthetic_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, tmp_path / "empty", "--resume"))
    assert exit_info.value.code == 2 and "no checkpoint" in capsys.readouterr().err
    flags = ("--num_epochs", "1", "--batch_size", "64")
    train_script.main(train_args(synthetic_dir, tmp_path / "done", *flags))
    with pytest.raises(SystemExit):
        train_script.main(train_args(synthetic_dir, tmp_path / "done", *flags))
    assert "--resume" in capsys.readouterr().err
