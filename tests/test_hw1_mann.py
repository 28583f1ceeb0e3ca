"""hw1: sequence meta-batches, label masking, the LSTM and memory MANNs, training, resume and flags."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hw1_mann import train as train_script
from hw1_mann.data import SequenceSampler, check_task_shape
from hw1_mann.models import LSTMMANN, MemoryMANN, query_loss

needs_omniglot = pytest.mark.skipif(
    not os.environ.get("CS330_DATA_MIRROR"), reason="CS330_DATA_MIRROR is not set (the Omniglot zips live there)"
)


@pytest.fixture(scope="module")
def train_split() -> torch.Tensor:
    from common.omniglot import OmniglotStore

    return OmniglotStore.load().split("train")


def _fake_batch(batch: int = 3, shots: int = 2, ways: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, shots + 1, ways, 784, generator=gen)
    order = torch.rand(batch, shots + 1, ways, generator=gen).argsort(-1)
    labels = torch.nn.functional.one_hot(order, ways).float()
    return images, labels


@needs_omniglot
def test_sequence_batch_shapes_and_labels(train_split):
    sampler = SequenceSampler(train_split, num_classes=3, num_shot=2, seed=5)
    images, labels = sampler.sample(6)
    assert images.shape == (6, 3, 3, 784) and labels.shape == (6, 3, 3, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    eye = torch.eye(3)
    assert torch.equal(labels[:, :2], eye.expand(6, 2, 3, 3))  # support rows: class n at position n
    assert torch.equal(labels[:, 2].sum(1), torch.ones(6, 3))  # query row: every class exactly once
    assert not all(torch.equal(labels[b, 2], eye) for b in range(6))  # ... in a shuffled order
    again = SequenceSampler(train_split, num_classes=3, num_shot=2, seed=5).sample(6)
    assert torch.equal(again.images, images) and torch.equal(again.labels, labels)  # seeded


@needs_omniglot
def test_impossible_task_shapes_are_refused(train_split):
    from common.errors import CS330Error

    with pytest.raises(CS330Error, match="num_shot 20"):
        check_task_shape(5, 20)
    with pytest.raises(CS330Error, match="at least 2"):
        check_task_shape(1, 1)
    with pytest.raises(CS330Error, match="larger than"):
        SequenceSampler(train_split[:10], num_classes=11, num_shot=1)


@needs_omniglot
def test_script_refuses_bad_n_k_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(["--num_classes", "150", "--log_dir", str(tmp_path / "run"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "larger than the 100 characters of the val split" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model_cls", [LSTMMANN, MemoryMANN])
def test_output_shape_and_query_labels_are_hidden(model_cls):
    torch.manual_seed(0)
    model = model_cls(4, hidden_dim=16)
    images, labels = _fake_batch()
    logits = model(images, labels)
    assert logits.shape == labels.shape
    altered = labels.clone()
    altered[:, -1] = torch.roll(altered[:, -1], 1, dims=-1)  # different query labels, same targets
    altered_logits = model(images, altered)
    assert torch.equal(altered_logits, logits)
    assert query_loss(altered_logits, labels) == query_loss(logits, labels)
    # ... while the support labels do matter.
    support_changed = labels.clone()
    support_changed[:, 0] = torch.roll(support_changed[:, 0], 1, dims=-1)
    assert not torch.equal(model(images, support_changed), logits)


def test_wrong_shapes_get_a_clear_error():
    from common.errors import CS330Error

    model = LSTMMANN(4, hidden_dim=8)
    images, labels = _fake_batch(ways=3)
    with pytest.raises(CS330Error, match="4-way"):
        model(images, labels)


def test_boolean_flags_parse_as_booleans():
    assert train_script.parse_args(["--test", "false"]).test is False
    assert train_script.parse_args(["--test", "False"]).test is False
    assert train_script.parse_args(["--test"]).test is True
    assert train_script.parse_args(["--test", "true"]).test is True
    assert train_script.parse_args([]).test is False and train_script.parse_args([]).resume is False
    assert train_script.parse_args(["--resume"]).resume is True
    with pytest.raises(SystemExit):
        train_script.parse_args(["--test", "maybe"])


def test_course_defaults():
    args = train_script.parse_args([])
    assert (args.num_classes, args.num_shot, args.meta_batch_size, args.hidden_dim) == (5, 1, 128, 128)
    assert (args.learning_rate, args.train_steps, args.eval_freq, args.random_seed) == (1e-3, 25000, 100, 123)
    assert args.model == "lstm"


@needs_omniglot
def test_short_training_beats_chance_on_two_way(tmp_path):
    metrics = train_script.main([
        "--num_classes", "2", "--num_shot", "1", "--meta_batch_size", "64", "--train_steps", "300",
        "--eval_freq", "100", "--learning_rate", "2e-3", "--num_test_tasks", "500", "--device", "cpu",
        "--log_dir", str(tmp_path / "run"),
    ])
    assert metrics["test_acc"] - metrics["test_acc_ci95"] > 0.6  # chance is 0.5
    assert len(metrics["test_acc_by_instance"]) == 2
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert saved["test_acc"] == metrics["test_acc"]


class _SimulatedKill(Exception):
    pass


@needs_omniglot
@pytest.mark.parametrize("model", ["lstm", "memory"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, monkeypatch, model):
    flags = ["--num_classes", "3", "--num_shot", "2", "--meta_batch_size", "8", "--hidden_dim", "16",
             "--train_steps", "12", "--eval_freq", "4", "--num_test_tasks", "16", "--device", "cpu",
             "--model", model, "--memory_slots", "16"]
    uninterrupted = train_script.main(flags + ["--log_dir", str(tmp_path / "a")])

    real_sample, calls = SequenceSampler.sample, {"n": 0}

    def dying_sample(self, batch_size):
        calls["n"] += 1
        if calls["n"] == 9:  # training step 7: 4 train + 2 eval draws (step-4 checkpoint), then steps 5, 6, 7
            raise _SimulatedKill
        return real_sample(self, batch_size)

    monkeypatch.setattr(SequenceSampler, "sample", dying_sample)
    with pytest.raises(_SimulatedKill):
        train_script.main(flags + ["--log_dir", str(tmp_path / "b")])
    monkeypatch.setattr(SequenceSampler, "sample", real_sample)
    with pytest.raises(SystemExit):  # restarting without --resume must not overwrite the run
        train_script.main(flags + ["--log_dir", str(tmp_path / "b")])
    resumed = train_script.main(flags + ["--log_dir", str(tmp_path / "b"), "--resume"])

    assert resumed["history"] == uninterrupted["history"]
    for key in ("test_acc", "test_loss", "test_acc_by_instance"):
        assert resumed[key] == uninterrupted[key]
    retest = train_script.main(flags + ["--log_dir", str(tmp_path / "b"), "--test"])
    assert retest["test_acc"] == uninterrupted["test_acc"]
