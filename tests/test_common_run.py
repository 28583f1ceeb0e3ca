"""Run logging, checkpoints, seeding and devices."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from common.checkpoint import (
    capture_rng_state,
    ensure_finite,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from common.device import resolve_device
from common.errors import CS330Error
from common.runlog import RunLogger, build_run_name
from common.seeding import seed_everything
from common.stats import mean_ci95, paired_difference_ci95


def test_run_name_is_safe_and_carries_hparams():
    name = build_run_name("maml", {"way": 5, "lr": 0.4, "path": "a/b:c d"})
    assert name == "maml_way5_lr0.4_patha-b-c-d"
    assert not set(name) & set(':/\\ ')


def test_run_logger_writes_hparams_events_and_results(tmp_path):
    logger = RunLogger(tmp_path / "run", {"lr": 0.1, "device": torch.device("cpu")}, total_steps=3)
    for step in range(1, 4):
        logger.log({"train/loss": 1.0 / step}, step)
        logger.advance(step, loss=1.0 / step)
    path = logger.finish({"test_accuracy": 0.9, "note": "ok"})
    logger.close()
    assert json.loads((tmp_path / "run" / "hparams.json").read_text()) == {"lr": 0.1, "device": "cpu"}
    assert json.loads(path.read_text())["metrics"] == {"test_accuracy": 0.9, "note": "ok"}
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_checkpoints_are_atomic_latest_and_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"model": model.state_dict(), "note": "x"}, keep_last=2)
    assert list(list_checkpoints(tmp_path)) == [20, 30]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary files left
    state = load_checkpoint(tmp_path)
    assert state["step"] == 30 and torch.equal(state["model"]["weight"], model.weight)
    assert load_checkpoint(tmp_path, 20)["step"] == 20
    with pytest.raises(CS330Error, match="available steps"):
        load_checkpoint(tmp_path, 10)


def test_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(CS330Error, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty_run")


class NotATensor:
    """A pickled object that is neither a tensor nor a python primitive."""


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    save_checkpoint(tmp_path, 1, {"obj": NotATensor()})
    with pytest.raises(CS330Error, match="holds a pickled tests.test_common_run.NotATensor") as info:
        load_checkpoint(tmp_path)
    assert "weights_only=False" not in str(info.value)


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    seed_everything(3)
    save_checkpoint(tmp_path, 1, {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_seed_everything_repeats():
    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.randn(3))
    seed_everything(7)
    second = (random.random(), np.random.rand(), torch.randn(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_nan_loss_stops_with_message(tmp_path):
    ensure_finite(1.0, 5, tmp_path)
    save_checkpoint(tmp_path, 4, {"x": 1})
    with pytest.raises(CS330Error, match=r"nan at step 5.*step 4"):
        ensure_finite(float("nan"), 5, tmp_path)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(CS330Error, match="CUDA is not available"):
            resolve_device("cuda")


def test_paired_difference_cancels_what_the_items_share():
    hard_and_easy = [0.2, 0.9, 0.5, 0.7]
    better = [a + 0.1 for a in hard_and_easy]  # the same items, each 0.1 higher
    mean, half = paired_difference_ci95(better, hard_and_easy)
    assert mean == pytest.approx(0.1) and half == pytest.approx(0.0, abs=1e-12)
    assert mean_ci95(hard_and_easy)[1] > 0.2  # while the separate intervals overlap
    with pytest.raises(ValueError, match="same items"):
        paired_difference_ci95([1.0, 2.0], [1.0])


def test_mean_ci95():
    mean, half = mean_ci95([0.0, 1.0, 0.0, 1.0])
    assert mean == 0.5 and half == pytest.approx(1.96 * 0.5 / 2)
