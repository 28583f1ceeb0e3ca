"""The course's handout command lines, parsed by our scripts into the settings the handout means.

Each row is a command line of CS330 (Fall 2022) exactly as the course wrote it. Our script's module
replaces ``python <course file>``, and only its flag parser runs: nothing is loaded or trained.
Where the lines come from (public copies of the course's starter code and handouts):

- hw0: the argparse of ``hw0/main.py`` in github.com/Jaskanwal/stanford-CS330-2022 (Fall 2022); the
  four experiments of the handout's "Experiments" section, ``tex/01-multitask/03-experiments.tex``
  in github.com/shashankvmaiya/Multitask-Recommender-System (the same four lines are that repository's
  ``src/run_all.sh``, and the run folders of the Fall 2022 repository have the same names).
- hw1: the argparse of ``hw1/hw1.py`` and the lines of ``hw1/run.sh``, Fall 2022 repository.
- hw2: the argparse of ``hw2/protonet.py`` and ``hw2/maml.py``; the training configurations are the
  run folders under ``hw2/logs/``, the test lines those of ``hw2/q3.sh`` (Fall 2022 repository).
- hw3: its table is ``tests/test_hw3_handout_commands.py`` (the lines of ``hw3/run_all.sh`` there,
  each one or several runs, which that file parses with ``parse_runs``).

Not accepted, on purpose: hw1's ``--num_workers`` and ``--image_caching`` configure the course's
``DataLoader``; ours samples episodes from the in-memory Omniglot store on the training device, so it
has neither loader workers nor an uncached mode (none of the handout's lines uses them).

hw2's test lines (``q3.sh``) give the test tasks' sizes with the training flags' names and take the
rest from the run in ``--log_dir``: ours reads them so when that folder holds the run's
``hparams.json`` (``hw2_protonet_maml/flags.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

# ---------------------------------------------------------------------------- the tables
# (the course's command line, our module, the settings it means: attribute -> value)
HW0 = "hw0_recsys.train"
HW0_ROWS = [
    ("python main.py --factorization_weight 0.99 --regression_weight 0.01 --logdir run/shared=True_LF=0.99_LR=0.01",
     {"factorization_weight": 0.99, "regression_weight": 0.01, "no_embedding_sharing": False,
      "log_dir": "run/shared=True_LF=0.99_LR=0.01"}),
    ("python main.py --factorization_weight 0.5 --regression_weight 0.5 --logdir run/shared=True_LF=0.5_LR=0.5",
     {"factorization_weight": 0.5, "regression_weight": 0.5, "no_embedding_sharing": False,
      "log_dir": "run/shared=True_LF=0.5_LR=0.5"}),
    ("python main.py --no_shared_embeddings --factorization_weight 0.5 --regression_weight 0.5 "
     "--logdir run/shared=False_LF=0.5_LR=0.5",
     {"factorization_weight": 0.5, "regression_weight": 0.5, "no_embedding_sharing": True,
      "log_dir": "run/shared=False_LF=0.5_LR=0.5"}),
    ("python main.py --no_shared_embeddings --factorization_weight 0.99 --regression_weight 0.01 "
     "--logdir run/shared=False_LF=0.99_LR=0.01",
     {"factorization_weight": 0.99, "regression_weight": 0.01, "no_embedding_sharing": True,
      "log_dir": "run/shared=False_LF=0.99_LR=0.01"}),
    # the starter's other flags
    ("python main.py --epochs 200 --test_fraction 0.05 --shared_embeddings",
     {"num_epochs": 200, "test_fraction": 0.05, "no_embedding_sharing": False}),
]

HW1 = "hw1_mann.train"
HW1_ROWS = [
    ("python hw1.py --num_shot 1 --num_classes 2", {"num_shot": 1, "num_classes": 2}),
    ("python hw1.py --num_shot 2 --num_classes 2", {"num_shot": 2, "num_classes": 2}),
    ("python hw1.py --num_shot 1 --num_classes 3", {"num_shot": 1, "num_classes": 3}),
    ("python hw1.py --num_shot 1 --num_classes 4", {"num_shot": 1, "num_classes": 4}),
    ("python hw1.py --num_shot 1 --num_classes 3 --hidden_dim 256",
     {"num_shot": 1, "num_classes": 3, "hidden_dim": 256}),
    ("python hw1.py --num_shot 1 --num_classes 3 --hidden_dim 8", {"num_shot": 1, "num_classes": 3, "hidden_dim": 8}),
    ("python hw1.py --num_classes 5 --num_shot 1 --eval_freq 50 --meta_batch_size 64 --hidden_dim 128 "
     "--random_seed 7 --learning_rate 0.002 --train_steps 1000",
     {"num_classes": 5, "num_shot": 1, "eval_freq": 50, "meta_batch_size": 64, "hidden_dim": 128, "random_seed": 7,
      "learning_rate": 0.002, "train_steps": 1000}),
]

PROTONET, MAML = "hw2_protonet_maml.protonet", "hw2_protonet_maml.maml"
# The course's test lines name a trained run's folder; the flags each folder name means (its
# training command), from which the tests below write the run's hparams.json as our script would.
HW2_TRAINED_RUNS = {
    "./logs/protonet/omniglot.way_5.support_1.query_15.lr_0.001.batch_size_16":
        (PROTONET, "python protonet.py --num_way 5 --num_support 1 --num_query 15 --learning_rate 0.001 "
                   "--batch_size 16"),
    "./logs/maml/omniglot.way_5.support_1.query_15.inner_steps_1.inner_lr_0.4.learn_inner_lrs_True.outer_lr_0.001."
    "batch_size_16":
        (MAML, "python maml.py --num_way 5 --num_support 1 --num_query 15 --num_inner_steps 1 --inner_lr 0.4 "
               "--learn_inner_lrs --outer_lr 0.001 --batch_size 16"),
}
HW2_ROWS = [
    ("python protonet.py", PROTONET, {}),
    ("python protonet.py --num_support 1", PROTONET, {"num_support": 1}),
    ("python protonet.py --num_way 5 --num_support 5 --num_query 15 --learning_rate 0.001 --batch_size 16 "
     "--num_train_iterations 5000", PROTONET,
     {"num_way": 5, "num_support": 5, "num_query": 15, "learning_rate": 0.001, "batch_size": 16,
      "num_train_iterations": 5000}),
    ("python maml.py", MAML, {}),
    ("python maml.py --inner_lr 0.04", MAML, {"inner_lr": 0.04}),
    ("python maml.py --num_inner_steps 5 --inner_lr 0.04", MAML, {"num_inner_steps": 5, "inner_lr": 0.04}),
    ("python maml.py --learn_inner_lrs", MAML, {"learn_inner_lrs": True}),
    ("python maml.py --num_way 5 --num_support 1 --num_query 15 --num_inner_steps 1 --inner_lr 0.4 --outer_lr 0.001 "
     "--batch_size 16 --num_train_iterations 15000", MAML,
     {"num_way": 5, "num_support": 1, "num_query": 15, "num_inner_steps": 1, "inner_lr": 0.4, "outer_lr": 0.001,
      "batch_size": 16, "num_train_iterations": 15000}),
    pytest.param(
        "python protonet.py --log_dir ./logs/protonet/omniglot.way_5.support_1.query_15.lr_0.001.batch_size_16 "
        "--num_way 5 --num_support 4 --num_query 10 --test --checkpoint_step 4200", PROTONET,
        {"test": True, "checkpoint_step": 4200, "num_way": 5, "num_support": 1, "test_num_support": 4,
         "test_num_query": 10, "test_num_way": 5}, id="protonet-test-at-K"),
    pytest.param(
        "python maml.py --log_dir ./logs/maml/omniglot.way_5.support_1.query_15.inner_steps_1.inner_lr_0.4."
        "learn_inner_lrs_True.outer_lr_0.001.batch_size_16 --num_way 5 --num_support 4 --num_query 10 --test "
        "--checkpoint_step 5200", MAML,
        {"test": True, "checkpoint_step": 5200, "num_support": 1, "learn_inner_lrs": True, "test_num_support": 4,
         "test_num_query": 10, "num_query": 15}, id="maml-test-at-K"),
]

# The starter code's defaults (what a handout line that leaves a flag out means) that ours does not
# share: attribute -> (the course's, ours, why). Every other default of the starter is ours too.
HW0_COURSE_DEFAULTS = {"test_fraction": 0.05, "num_epochs": 200, "factorization_weight": 0.995,
                       "regression_weight": 0.005, "no_embedding_sharing": False,
                       "log_dir": "run/shared=True_LF=0.99_LR=0.01"}
HW0_DEFAULTS_THAT_DIFFER = {
    "num_epochs": (200, 10, "sized for a CPU; the README's course grid passes --epochs 200"),
    "factorization_weight": (0.995, 0.5, "every handout line sets both weights"),
    "regression_weight": (0.005, 0.5, "every handout line sets both weights"),
    "log_dir": ("run/shared=True_LF=0.99_LR=0.01", None, "None: runs/hw0_recsys/<run name from every flag>"),
}
HW1_COURSE_DEFAULTS = {"num_classes": 5, "num_shot": 1, "eval_freq": 100, "meta_batch_size": 128, "hidden_dim": 128,
                       "random_seed": 123, "learning_rate": 1e-3, "train_steps": 25000}


# ---------------------------------------------------------------------------- the checks
def parse(module: str, command: str) -> argparse.Namespace:
    """``command`` with ``python <course file>`` replaced by ``module``, through its flag parser only."""
    script = importlib.import_module(module)
    argv = shlex.split(command)[2:]
    return script.parse_args(argv)


def assert_means(args: argparse.Namespace, expected: dict[str, Any]) -> None:
    for name, value in expected.items():
        got = getattr(args, name)
        assert got == value, f"{name}: {got!r}, the handout means {value!r}"


@pytest.mark.parametrize(("command", "expected"), HW0_ROWS)
def test_hw0_handout_commands(command: str, expected: dict[str, Any]) -> None:
    args = parse(HW0, command)
    assert args.model == "multitask" and args.split == "random"  # the course's model on its 95/5 split
    assert_means(args, expected)


@pytest.mark.parametrize(("command", "expected"), HW1_ROWS)
def test_hw1_handout_commands(command: str, expected: dict[str, Any]) -> None:
    args = parse(HW1, command)
    assert args.model == "lstm" and args.protocol == "course"  # the course's MANN on its K-shot sequences
    assert_means(args, expected)


@pytest.mark.parametrize(("command", "module", "expected"), HW2_ROWS)
def test_hw2_handout_commands(command: str, module: str, expected: dict[str, Any], tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the course's relative --log_dir, with the trained run's hparams.json in it
    for log_dir, (trained_with, training_command) in HW2_TRAINED_RUNS.items():
        script = importlib.import_module(trained_with)
        hparams = vars(parse(trained_with, training_command)) | {"precision": "fp32"}  # as the run wrote it
        Path(log_dir).mkdir(parents=True)
        (Path(log_dir) / "hparams.json").write_text(json.dumps(hparams))
        assert script.run_folder(parse(trained_with, f"{training_command} --log_dir {log_dir}")) == Path(log_dir)
    assert_means(parse(module, command), expected)


def test_hw2_test_line_without_a_trained_run_reads_our_flags(tmp_path, monkeypatch) -> None:
    """Without the run's hparams.json there are no run settings to read: --num_support is the training's."""
    monkeypatch.chdir(tmp_path)
    args = parse(MAML, "python maml.py --log_dir elsewhere --num_support 4 --test")
    assert (args.num_support, args.test_num_support, args.test_num_query) == (4, 4, 15)


def test_hw0_defaults_are_the_courses_but_the_listed_ones() -> None:
    args = parse(HW0, "python main.py")
    for name, course in HW0_COURSE_DEFAULTS.items():
        _, ours, _ = HW0_DEFAULTS_THAT_DIFFER.get(name, (course, course, ""))
        assert getattr(args, name) == ours, name


@pytest.mark.parametrize(("module", "defaults"), [
    (HW1, HW1_COURSE_DEFAULTS),
    (PROTONET, {"num_way": 5, "num_support": 5, "num_query": 15, "learning_rate": 0.001, "batch_size": 16,
                "num_train_iterations": 5000, "test": False, "checkpoint_step": -1, "log_dir": None}),
    (MAML, {"num_way": 5, "num_support": 1, "num_query": 15, "num_inner_steps": 1, "inner_lr": 0.4,
            "learn_inner_lrs": False, "outer_lr": 0.001, "batch_size": 16, "num_train_iterations": 15000,
            "test": False, "checkpoint_step": -1, "log_dir": None}),
])
def test_defaults_are_the_courses(module: str, defaults: dict[str, Any]) -> None:
    assert_means(parse(module, "python script.py"), defaults)
