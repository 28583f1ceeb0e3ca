"""Two hw3 runs (``ft.py``, ``icl.py``) that differ in any flag that changes their result get
different run folders: the second can no longer replace the first's results.json.

The flags come from each script's parser (the helpers of tests/test_run_names.py), so a new flag is
checked as soon as it exists: it must change the default run folder or be listed below as run-only,
with the reason. common.cli.RUN_ONLY_FLAGS (device, threads, folders) are run-only everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from hw3_lm_fewshot import ft, icl
from tests.test_run_names import flag_cases, folders

TASK = "the course's --task: one value per script (ft.py: ft, icl.py: icl)"
FT_RUN_ONLY = {"task": TASK}
ICL_RUN_ONLY = {
    "task": TASK,
    "batch_size": "queries per forward pass: the batches give the answers of one query at a time (tested in "
                  "test_hw3_models and test_hw3_tiny_models)",
}

# Where a flag applies: the base command line it is changed on (by dest; default: no flag).
FT_CONTEXT = {
    "prompt_format": ["--dataset", "babi"],  # the amazon classifier reads no prompt
    "max_length": ["--dataset", "babi"],  # amazon inputs are cut at 100 tokens whatever the flag says above it
}
ICL_CONTEXT = {
    "calibrate": ["--support", "fixed"],
    "orderings": ["--support", "fixed"],
}

# A flag whose new value cannot be read off its parser: dest -> the flags that change it.
CHANGES: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "precision": lambda base: ["--precision", "bf16"],  # auto is fp32 for hw3: the same run as fp32
    "model": lambda base: ["--model", "bert-tiny"],
    "max_context": lambda base: ["--max_context", "512"],
    "early_stop_acc": lambda base: ["--early_stop_acc", "0.5"],
}
FT_CHANGES = {**CHANGES, "mode": lambda base: ["--mode", "lora4"], "dataset": lambda base: ["--dataset", "babi"]}
ICL_CHANGES = {**CHANGES, "prompt": lambda base: ["--prompt", "none"], "dataset": lambda base: ["--dataset", "xsum"]}

FT_CASES = list(flag_cases(ft.build_parser(), FT_RUN_ONLY, FT_CONTEXT))
ICL_CASES = list(flag_cases(icl.build_parser(), ICL_RUN_ONLY, ICL_CONTEXT))


@pytest.mark.parametrize(("dest", "base"), [(dest, base) for dest, base, _ in FT_CASES],
                         ids=[dest for dest, _, _ in FT_CASES])
def test_ft_every_flag_names_the_run(dest: str, base: list[str]) -> None:
    first, second = folders(ft, FT_CHANGES, ft.parse_args, dest, base)
    assert first != second, f"--{dest} changes the result but not the run folder {first}"


@pytest.mark.parametrize(("dest", "base"), [(dest, base) for dest, base, _ in ICL_CASES],
                         ids=[dest for dest, _, _ in ICL_CASES])
def test_icl_every_flag_names_the_run(dest: str, base: list[str]) -> None:
    first, second = folders(icl, ICL_CHANGES, icl.parse_args, dest, base)
    assert first != second, f"--{dest} changes the result but not the run folder {first}"


def test_ft_runs_differing_only_in_lr_get_two_folders_and_store_the_rate() -> None:
    """The defect of issue 27: ``--lr`` was left out of the name, and hparams.json stored ``lr: null``."""
    default, other = ft.parse_args(["--mode", "lora4"]), ft.parse_args(["--mode", "lora4", "--lr", "5e-4"])
    assert (default.lr, other.lr) == (1e-3, 5e-4)
    assert ft.run_folder(default) != ft.run_folder(other)


@pytest.mark.parametrize(("script", "run_only"), [(ft, FT_RUN_ONLY), (icl, ICL_RUN_ONLY)])
def test_run_only_flags_exist(script, run_only: dict[str, str]) -> None:
    """The run-only lists name flags the parser has (a renamed flag would silently leave the list)."""
    assert set(run_only) <= {action.dest for action in script.build_parser()._actions}
