"""Two hw2 runs (``protonet.py``, ``maml.py``, ``anil.py``) that differ in any flag that changes what
they train get different run folders.

The flags come from each script's parser (the helpers of tests/test_run_names.py), so a new flag is
checked as soon as it exists: it must change the default run folder or be listed below as run-only,
with the reason. common.cli.RUN_ONLY_FLAGS (device, threads, folders, --resume/--test) are run-only
everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from hw2_protonet_maml import anil, maml, protonet
from tests.test_run_names import assert_flag_names_the_run, flag_cases

# The flags a --resume may change (training.RESUMABLE_FLAGS) and the speed switches: the same weights.
RUN_ONLY = {
    "num_train_iterations": "the run length: --resume extends a run in its own folder, and results.json records "
                            "the length it was tested at",
    "val_interval": "when validation runs (it draws its own fixed tasks, not from the training sampler)",
    "num_val_tasks": "how many tasks validation uses",
    "save_interval": "when checkpoints are written",
    "num_test_tasks": "how many test tasks score the model at the end (results.json records it)",
    "test_num_way": "what the end-of-run test evaluates (--test writes one results file per N, K, Q)",
    "test_num_support": "what the end-of-run test evaluates",
    "test_num_query": "what the end-of-run test evaluates",
    "checkpoint_step": "which checkpoint --test evaluates",
}
MAML_RUN_ONLY = {
    **RUN_ONLY,
    "vmap_tasks": "the same per-task computation vmapped (meta-gradients equal, test_hw2_protonet_maml)",
    "compile_query": "the same query pass compiled (meta-gradients equal, test_hw2_protonet_maml)",
}

# A flag whose new value cannot be read off its parser: dest -> the flags that change it.
CHANGES: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "precision": lambda base: ["--precision", "bf16" if base.precision != "bf16" else "fp32"],
    "eval_num_inner_steps": lambda base: ["--eval_num_inner_steps", str(base.num_inner_steps + 4)],
    "train_num_way": lambda base: ["--train_num_way", "20"],
    "lr_step_size": lambda base: ["--lr_step_size", "2000"],
    "patience": lambda base: ["--patience", "10"],
}
# Where a flag applies: the base command line it is changed on (ProtoNet's default K + Q already fills
# the 20 drawings of a character).
CONTEXT = {"num_support": ["--num_query", "10"], "num_query": ["--num_query", "10"],
           "lr_gamma": ["--lr_step_size", "2000"]}  # the factor applies only with a schedule
SCRIPTS = {"protonet": (protonet, RUN_ONLY), "maml": (maml, MAML_RUN_ONLY), "anil": (anil, RUN_ONLY)}
CASES = [(name, dest, base) for name, (script, run_only) in SCRIPTS.items()
         for dest, base, _ in flag_cases(script.build_parser(), run_only, CONTEXT)]


@pytest.mark.parametrize(("name", "dest", "base"), CASES, ids=[f"{name}-{dest}" for name, dest, _ in CASES])
def test_hw2_every_flag_names_the_run(name: str, dest: str, base: list[str]) -> None:
    script, _ = SCRIPTS[name]
    # --precision auto resolves by the machine; from fp32 every precision flag is a real change
    assert_flag_names_the_run(script, CHANGES, dest, ["--precision", "fp32", *base] if dest == "precision" else base)


def test_default_folder_names_are_unchanged_by_the_eval_steps_part() -> None:
    args = maml.parse_args(["--precision", "fp32"])
    assert maml.run_folder(args).name == ("maml_protocs330_way5_shot1_query15_batch16_steps1_ilr0.4_learnilr0_"
                                          "olr0.001_fo0_filt64_stride1_precfp32_seed0")
    with_eval = maml.parse_args(["--precision", "fp32", "--eval_num_inner_steps", "5"])
    assert "_evalsteps5_" in maml.run_folder(with_eval).name


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_run_only_flags_exist(name: str) -> None:
    script, run_only = SCRIPTS[name]
    dests = {action.dest for action in script.build_parser()._actions}
    assert set(run_only) <= dests
