"""hw0 recommender: parsing, splits, metrics on hand-computed examples, training, seeding, resume, flags.

Training tests run on a tiny synthetic ml-100k-shaped folder generated in tmp_path (no real data
is copied); the split-size tests use the real MovieLens 100K through CS330_DATA_MIRROR when set.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import list_checkpoints, non_finite_tensors
from common.errors import CS330Error
from hw0_recsys import train as train_script
from hw0_recsys.data import Ratings, holdout, load_split, read_ratings
from hw0_recsys.metrics import mrr_score, rating_metrics, top_k_metrics
from hw0_recsys.models import MultiTaskNet

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "hw0_recsys" / "train.py"


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
            rows.append(f"{user + 1}\t{item + 1}\t{stars}\t{880000000 + 3600 * len(rows)}")
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


def script_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


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


def test_early_stopping_reports_test_metrics_of_each_tasks_best_validation_epoch(synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    results = train_script.main(train_args(synthetic_dir, run_dir, "--num_epochs", "6", "--batch_size", "64",
                                           "--lr", "0.01", "--val_fraction", "0.2", "--early_stopping"))
    val_mrr, val_mse = scalar_curve(run_dir, "val/mrr"), scalar_curve(run_dir, "val/mse")
    assert results["best_epoch/mrr"] == 1 + max(range(6), key=val_mrr.__getitem__)
    assert results["best_epoch/mse"] == 1 + min(range(6), key=val_mse.__getitem__)
    assert {"test/mrr", "test/recall@10", "test/ndcg@10", "test/mse", "test/rmse", "val/mse"} <= set(results)
    # the rating metrics are those of the best-MSE epoch's weights: a run stopped there scores the same
    stopped = train_script.main(train_args(synthetic_dir, tmp_path / "stopped", "--num_epochs",
                                           str(results["best_epoch/mse"]), "--batch_size", "64", "--lr", "0.01",
                                           "--val_fraction", "0.2", "--early_stopping"))
    assert stopped["test/mse"] == pytest.approx(results["test/mse"])


def test_early_stopped_test_ranking_leaves_out_the_validation_items_too():
    class FixedScores(torch.nn.Module):  # user 0 scores a validation item highest, then the test item
        def all_scores(self) -> torch.Tensor:
            return torch.tensor([[0.0, 9.0, 8.0] + [1.0] * 9])  # [1 user, 12 items]

        def predict(self, ratings: Ratings) -> torch.Tensor:
            return torch.full((len(ratings),), 3.0)

    def one(item: int, stars: float) -> Ratings:
        return Ratings(torch.tensor([0]), torch.tensor([item]), torch.tensor([stars]))

    best = {metric: {"epoch": 1, "model": {}} for metric in ("mrr", "mse")}
    rated = Ratings(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([4.0, 5.0]))  # training + validation
    results = train_script.early_stopped_metrics(FixedScores(), best, rated, one(2, 3.0), 1, 12)
    assert results["test/mrr"] == 1.0  # item 1 is known, so the test item ranks first
    assert train_script.early_stopped_metrics(FixedScores(), best, one(0, 4.0), one(2, 3.0), 1, 12)["test/mrr"] == 0.5


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
        assert losses["factorization_loss"].item() == pytest.approx(expected[loss_name].item(), rel=1e-5)


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


def start_train(log: Path, *flags: str) -> subprocess.Popen:
    # A real process, as a user's run would be: the kill is a real SIGKILL at an arbitrary instruction.
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(SCRIPT), *flags], env=script_env(), stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.parametrize("model_flags", [("--batch_size", "64"), ("--model", "svdpp", "--embedding_dim", "8"),
                                         ("--batch_size", "64", "--val_fraction", "0.2", "--early_stopping"),
                                         ("--model", "kernelnet", "--model_arg", "hidden_size=16")])  # cosine lr
def test_resume_after_sigkill_gives_identical_final_metrics(synthetic_dir, tmp_path, model_flags):
    flags = ("--num_epochs", "40", "--checkpoint_every", "1", "--eval_every", "1", *model_flags)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = start_train(tmp_path / "straight.log", *train_args(synthetic_dir, straight, *flags))
    proc = start_train(tmp_path / "killed.log", *train_args(synthetic_dir, killed, *flags))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "step0000003.pt").exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = start_train(tmp_path / "resumed.log", *train_args(synthetic_dir, killed, *flags, "--resume"))
    for run, log in ((uninterrupted, "straight.log"), (resumed, "resumed.log")):
        assert run.wait() == 0, (tmp_path / log).read_text()[-2000:]
    saved = {name: json.loads((folder / "results.json").read_text())["metrics"]
             for name, folder in (("straight", straight), ("killed", killed))}
    assert metrics_only(saved["killed"]) == metrics_only(saved["straight"])


# ---------------------------------------------------------------- resume rules

def test_resume_extends_num_epochs_and_refuses_other_changed_flags(synthetic_dir, tmp_path, capsys):
    flags = ("--batch_size", "64", "--lr", "0.01")
    straight = train_script.main(train_args(synthetic_dir, tmp_path / "straight", *flags, "--num_epochs", "5"))
    run_dir = tmp_path / "extended"
    train_script.main(train_args(synthetic_dir, run_dir, *flags, "--num_epochs", "3"))
    # The run length, the intervals and --save_predictions may change on --resume.
    extended = train_script.main(train_args(synthetic_dir, run_dir, *flags, "--num_epochs", "5", "--resume",
                                            "--eval_every", "2", "--save_predictions"))
    assert metrics_only(extended) == metrics_only(straight)  # epochs 4 and 5 continued from epoch 3
    assert len(scalar_curve(run_dir, "train/loss")) == 5
    assert json.loads((run_dir / "hparams.json").read_text())["num_epochs"] == 5
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, run_dir, "--batch_size", "64", "--lr", "0.02",
                                     "--num_epochs", "6", "--resume"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--lr 0.01 -> 0.02" in err and "num_epochs" not in err.split("(")[1]
    assert max(list_checkpoints(run_dir)) == 5  # refused before any work
    with pytest.raises(SystemExit):  # shorter than the run already is
        train_script.main(train_args(synthetic_dir, run_dir, *flags, "--num_epochs", "4", "--resume"))
    assert "already at --num_epochs 5, past the --num_epochs 4 asked for" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--embedding_dim", "100000000000"], "--embedding_dim 100000000000 (40 users, 60 items) needs at least "),
    (["--huge_user_id"], "(largest user id 1000000000000, item id 60: a score for every user-item pair) needs at "),
])
def test_sizes_no_memory_can_hold_are_refused_before_any_work(synthetic_dir, tmp_path, capsys, flags, message):
    """Issue 28: these ended in an allocator traceback."""
    if flags == ["--huge_user_id"]:
        ratings = synthetic_dir / "ml-100k" / "u.data"
        ratings.write_text(ratings.read_text() + "1000000000000\t1\t3\t880000000\n")
        flags = []
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, tmp_path / "run", *flags))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert "more than the" in errors[0] and not (tmp_path / "run").exists()


def test_full_disk_at_the_predictions_is_one_line_and_keeps_the_checkpoint(synthetic_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """Issue 28: predictions.pt was written in place with torch.save: a traceback on a full disk."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "predicted" in obj:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, run_dir, "--batch_size", "64", "--num_epochs", "1",
                                     "--save_predictions"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"error: no space left on {run_dir}: predictions.pt was not written" in err
    assert list_checkpoints(run_dir) and not list(run_dir.glob(".*.tmp")) and not (run_dir / "results.json").exists()


def test_cosine_schedule_run_cannot_be_extended(synthetic_dir, tmp_path, capsys):
    """Issue 28: extending a cosine run with --resume switched its schedule mid-run and recorded it
    as an ordinary cosine run of the new length."""
    flags = ("--batch_size", "64", "--lr_schedule", "cosine")
    run_dir = tmp_path / "run"
    train_script.main(train_args(synthetic_dir, run_dir, *flags, "--num_epochs", "2"))
    before = json.loads((run_dir / "results.json").read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, run_dir, *flags, "--num_epochs", "4", "--resume"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--num_epochs 2 -> 4" in err, err
    assert max(list_checkpoints(run_dir)) == 2 and json.loads((run_dir / "results.json").read_text()) == before
    assert "cannot be extended" in train_script.build_parser().description


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(synthetic_dir, tmp_path, capsys):
    flags = ("--batch_size", "64", "--checkpoint_every", "1")
    straight = train_script.main(train_args(synthetic_dir, tmp_path / "straight", *flags, "--num_epochs", "4"))
    run_dir = tmp_path / "run"
    train_script.main(train_args(synthetic_dir, run_dir, *flags, "--num_epochs", "3"))
    latest = list_checkpoints(run_dir)[3]
    latest.write_bytes(latest.read_bytes()[:100])  # a copy cut short
    capsys.readouterr()
    resumed = train_script.main(train_args(synthetic_dir, run_dir, *flags, "--num_epochs", "4", "--resume"))
    err = capsys.readouterr().err
    assert "warning" in err and str(latest) in err
    assert metrics_only(resumed) == metrics_only(straight)  # continued from the epoch-2 checkpoint


def test_resume_without_checkpoint_starts_fresh_with_a_note(synthetic_dir, tmp_path, capsys):
    results = train_script.main(train_args(synthetic_dir, tmp_path / "empty", "--num_epochs", "1", "--resume"))
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "starting the run fresh" in err and "--test" not in err
    assert (tmp_path / "empty" / "results.json").exists() and 0 < results["test/mrr"] <= 1


def test_rerun_over_existing_checkpoints_is_refused_without_a_test_hint(synthetic_dir, tmp_path, capsys):
    flags = ("--num_epochs", "1", "--batch_size", "64")
    train_script.main(train_args(synthetic_dir, tmp_path / "done", *flags))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, tmp_path / "done", *flags))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--resume" in err and "--test" not in err


# ---------------------------------------------------------------- run folder lifecycle

def assert_no_results_and_no_poisoned_checkpoint(run_dir: Path) -> None:
    assert not (run_dir / "results.json").exists()
    for path in list_checkpoints(run_dir).values():
        assert not non_finite_tensors(torch.load(path, weights_only=True)["model"])


def test_huge_lr_exits_2_without_a_poisoned_checkpoint_or_results(synthetic_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:  # the loss overflows within the first epoch
        train_script.main(train_args(synthetic_dir, run_dir, "--num_epochs", "3", "--lr", "1e30", "--batch_size", "64"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "the training loss became" in err and "Lower the learning rate" in err
    assert_no_results_and_no_poisoned_checkpoint(run_dir)


def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(synthetic_dir, tmp_path, monkeypatch,
                                                                       capsys):
    # Adam moves a weight by about lr per step, so a finite --lr cannot make the weights inf while the
    # loss that produced them is finite; an epoch that does (an overflow in a gradient) is simulated.
    real_epoch = train_script.train_epoch

    def poisoned_epoch(args, model, *rest):
        losses = real_epoch(args, model, *rest)
        if len(list_checkpoints(tmp_path / "run")) == 2:
            with torch.no_grad():
                model.item_biases.weight[0] = float("inf")
        return losses

    monkeypatch.setattr(train_script, "train_epoch", poisoned_epoch)
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, tmp_path / "run", "--num_epochs", "5", "--batch_size", "64"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "the weights became non-finite by step 3" in err
    assert "the last good checkpoint (step 2) is kept" in err
    assert sorted(list_checkpoints(tmp_path / "run")) == [1, 2]
    assert_no_results_and_no_poisoned_checkpoint(tmp_path / "run")


@pytest.mark.slow
def test_second_run_on_the_same_folder_is_refused_naming_the_first(synthetic_dir, tmp_path):
    run_dir = tmp_path / "run"
    flags = train_args(synthetic_dir, run_dir, "--num_epochs", "100000", "--batch_size", "64",
                       "--eval_every", "100000", "--checkpoint_every", "100000")
    first = subprocess.Popen([sys.executable, str(SCRIPT), *flags], env=script_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run_dir / "hparams.json").exists():  # written after the lock is taken
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        second = subprocess.run([sys.executable, str(SCRIPT), *flags], env=script_env(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert "in use by another run" in second.stderr and f"process {first.pid}" in second.stderr
        assert first.poll() is None  # the first run is unharmed
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # The kernel drops the lock of a killed process: a resume is not refused (num_epochs may change).
    resumed = train_script.main([*flags, "--num_epochs", "1", "--resume"])
    assert 0 < resumed["test/mrr"] <= 1


def test_read_only_log_dir_is_a_one_line_error(synthetic_dir, tmp_path, monkeypatch, capsys):
    def read_only_open(path, *args, **kwargs):  # as root every folder is writable: simulate EROFS
        if Path(path).name.startswith(".write-test"):
            raise OSError(30, "Read-only file system")
        return open(path, *args, **kwargs)

    monkeypatch.setattr("common.run.open", read_only_open, raising=False)  # the probe's write
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(synthetic_dir, tmp_path / "run", "--num_epochs", "1"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.strip().splitlines() == [f"error: cannot write the run folder {tmp_path / 'run'} (Read-only file "
                                        "system); pass --log_dir with a writable folder"]
    assert not (tmp_path / "run").exists()  # a failed start leaves no folder behind


def test_bad_data_fails_before_the_run_folder_exists(tmp_path, capsys):
    (tmp_path / "data" / "ml-100k").mkdir(parents=True)
    (tmp_path / "data" / "ml-100k" / "u.data").write_text("1\t2\tthree\t4\n")
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(train_args(tmp_path / "data", tmp_path / "run", "--num_epochs", "1"))
    assert exit_info.value.code == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_clean_runs_print_no_warnings(synthetic_dir, tmp_path):
    # A fresh process: torch warns once per process, so an earlier test could hide a warning here.
    runs = [train_args(synthetic_dir, tmp_path / model, "--model", model, "--num_epochs", "2", "--embedding_dim", "4")
            for model in ("multitask", "svdpp", "autorec")]
    runs += [train_args(synthetic_dir, tmp_path / model, "--model", model, "--num_epochs", "2")
             for model in train_script.RATING_MODELS]
    code = "; ".join(["from hw0_recsys.train import main", *(f"main({argv!r})" for argv in runs)])
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr


def test_precision_is_printed_and_recorded(synthetic_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        train_script.main(train_args(synthetic_dir, tmp_path / "fp32", "--num_epochs", "1", "--threads", "1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert "precision: fp32 (hw0's models are small embedding/MLP models; bf16 was not measured faster)" in (
        capsys.readouterr().out)
    assert json.loads((tmp_path / "fp32" / "hparams.json").read_text())["precision"] == "fp32"
    bf16 = train_script.main(train_args(synthetic_dir, tmp_path / "bf16", "--num_epochs", "1", "--bf16"))
    assert "precision: bf16 (as requested)" in capsys.readouterr().out and math.isfinite(bf16["test/rmse"])
    assert json.loads((tmp_path / "bf16" / "hparams.json").read_text())["precision"] == "bf16"
    default_args = train_script.parse_args([])
    name = train_script.build_run_name("multitask", train_script.run_name_parts(default_args))
    assert "_precfp32_" in name
    assert train_script.run_hparams(default_args)["precision"] == "fp32"


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, message", [
    (["--factorization_weight", "-1"], "non-negative"),
    (["--factorization_weight", "0", "--regression_weight", "0"], "nothing would be trained"),
    (["--layer_sizes", "96,x"], "comma-separated"),
    (["--val_fraction", "1.5"], "between 0 and 1"),
    (["--val_fraction", "1"], "below 1"),
    (["--val_fraction", "nan"], "finite"),
    (["--test_fraction", "0"], "strictly between 0 and 1"),
    (["--test_fraction", "inf"], "finite"),
    (["--batch_size", "-3"], "non-negative integer"),
    (["--split", "u9"], "invalid choice"),
    (["--num_epochs", "0"], "positive integer"),
    (["--model", "svdpp", "--autorec_reg", "-1"], "non-negative"),
    (["--factorization_loss", "hinge"], "invalid choice"),
    (["--lr", "inf"], "finite"),
    (["--lr", "nan"], "finite"),
    (["--weight_decay", "inf"], "finite"),
    (["--reg_exponent", "nan"], "finite"),
    (["--implicit_from_test"], "only applies to --model svdpp"),
    (["--model", "svdpp", "--bf16"], "no bf16"),
    (["--early_stopping"], "also pass --val_fraction"),
    (["--model", "kernelnet", "--model_arg", "no_such=1"], "expected NAME=VALUE"),
    (["--model", "kernelnet", "--model_arg", "hidden_size"], "expected NAME=VALUE"),
    (["--model", "kernelnet", "--model_arg", "hidden_size=big"], "must be of type int"),
    (["--model", "timesvdpp", "--model_arg", "embedding_dim=-2"], "finite number >= 0"),
    (["--model", "svdpp", "--model_arg", "x=1"], "--model_arg applies to"),
    (["--model", "neighbourhood", "--embedding_dim", "8"], "--embedding_dim does not apply"),
    (["--model", "timebase", "--bf16"], "not measured"),
])
def test_bad_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_course_report_states_the_length_and_rate_its_runs_ran_with(tmp_path):
    """Issue 28 (the class of hw2's "600 test tasks"): the course section printed the preset's epochs."""
    import pandas as pd

    from hw0_recsys import experiments

    rows = [{"name": f"course_shared_seed{seed}", "setting": "shared", "run_dir": tmp_path / str(seed),
             "test/mrr": 0.1, "test/recall@10": 0.2, "test/ndcg@10": 0.1, "test/mse": 0.9, "train_seconds": 1.0,
             "num_epochs": 3, "lr": 0.01} for seed in (0, 1)]
    text = experiments.course_section(pd.DataFrame(rows), experiments.PRESETS["cpu"], tmp_path)
    assert text.startswith("## Course grid (multi-task model, random 95/5 split, 3 epochs, lr 0.01;"), text[:120]
