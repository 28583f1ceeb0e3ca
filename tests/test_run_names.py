"""Two runs that differ in any flag that changes what they train get different run folders.

The flags come from each script's parser, so a new flag is checked as soon as it exists: it must
either change the default run folder or be listed below as run-only, with the reason. For each flag
the test parses a base command line where the flag applies (e.g. ``--model svdpp`` for SVD++'s
regularisation) and the same line with the flag's value changed, and compares the folders.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.cli import RUN_ONLY_FLAGS
from hw0_recsys import predictors
from hw0_recsys import train as hw0
from hw1_mann import train as hw1

# Flags that do not change what a run trains, by script, with the reason. Besides these, the flags
# common.cli.RUN_ONLY_FLAGS names (device, threads, folders, --resume/--test) never do.
HW0_RUN_ONLY = {
    "checkpoint_every": "when checkpoints are written",
    "save_predictions": "also writes the final predictions to predictions.pt",
}
HW1_RUN_ONLY = {
    "eval_freq": "when the periodic val/test scores and checkpoints happen; they draw from their own samplers",
    "eval_tasks": "how many tasks the periodic val/test scores use",
    "num_test_tasks": "how many test tasks score the trained model at the end (results.json records it)",
    "memory_impl": "which implementation of the same network and maths runs (results.json records it)",
}

# Where a flag applies: the base command line it is changed on (by dest; default: no flag).
HW0_CONTEXT = {
    "svdpp model": ["--model", "svdpp"],  # argument groups, by title
    "autorec model": ["--model", "autorec"],
    "early_stopping": ["--val_fraction", "0.05"],
    "eval_every": ["--val_fraction", "0.05", "--early_stopping"],  # it picks the epochs early stopping chooses from
    "model_arg": ["--model", "timebase"],
}
HW1_CONTEXT = {
    "memory_slots": ["--model", "memory"], "memory_dim": ["--model", "memory"], "num_reads": ["--model", "memory"],
    "key_strength": ["--model", "memory"], "lru_write": ["--model", "memory"],
    "presentations": ["--protocol", "santoro"],
}


def model_arg_change(base: argparse.Namespace) -> list[str]:
    name, value = next((n, v) for n, v in predictors.model_hparams(base.model).items() if isinstance(v, float))
    return ["--model_arg", f"{name}={value * 2 or 0.5}"]


# A flag whose new value cannot be read off its parser: dest -> the flags that change it.
HW0_CHANGES: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "precision": lambda base: ["--precision", "bf16"],  # auto and fp32 are both fp32 for hw0: the same run
    "model_arg": model_arg_change,
}
HW1_CHANGES: dict[str, Callable[[argparse.Namespace], list[str]]] = {
    "precision": lambda base: ["--precision", "bf16"],  # auto is fp32 for hw1: the same run as fp32
}


def changed_value(action: argparse.Action, value: object) -> str | None:
    """A valid value for ``action`` other than ``value``, as command-line text (None: no rule)."""
    if action.choices:
        return next(str(choice) for choice in action.choices if choice != value)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, float):
        return str(value * 2 or 0.5)
    if isinstance(value, list):
        return ",".join(str(v + 1 if i == 0 else v) for i, v in enumerate(value))
    return None


def change(action: argparse.Action, base: argparse.Namespace) -> list[str] | None:
    """The flags that give ``action``'s destination another value than in ``base``."""
    value = getattr(base, action.dest)
    if action.nargs == 0:  # store_true / store_false / store_const
        return [action.option_strings[0]] if action.const != value else None
    text = changed_value(action, value)
    return None if text is None else [action.option_strings[0], text]


def flag_cases(parser: argparse.ArgumentParser, run_only: dict[str, str], context: dict[str, list[str]],
               ) -> Iterator[tuple[str, list[str], argparse.Action | None]]:
    """(dest, base argv, an action of that dest) for every flag that must name the run, once per dest."""
    group_of = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    skip = set(run_only) | set(RUN_ONLY_FLAGS) | {"help"}
    seen = set()
    for action in parser._actions:
        if action.dest in skip or action.dest in seen:
            continue
        seen.add(action.dest)
        base = context.get(action.dest, context.get(group_of.get(id(action)), []))
        yield action.dest, base, action


def folders(script, changes: dict, parse: Callable[[list[str]], argparse.Namespace], dest: str, base_argv: list[str],
            ) -> tuple[Path, Path]:
    base = parse(base_argv)
    actions = [a for a in script.build_parser()._actions if a.dest == dest]
    extra = changes[dest](base) if dest in changes else next(filter(None, (change(a, base) for a in actions)), None)
    assert extra is not None, (f"no rule to change --{dest}: add one to the test's CHANGES, or list the flag as "
                               "run-only with the reason")
    changed = parse([*base_argv, *extra])
    assert vars(changed) != vars(base), f"{extra} changed no setting"
    return script.run_folder(base), script.run_folder(changed)


def over_flags(cases: list[tuple[str, list[str], argparse.Action]]) -> pytest.MarkDecorator:
    """Parametrise a test over ``flag_cases`` as (dest, base), one case per flag, named by it."""
    return pytest.mark.parametrize(("dest", "base"), [(dest, base) for dest, base, _ in cases],
                                   ids=[dest for dest, _, _ in cases])


def assert_flag_names_the_run(script, changes: dict, dest: str, base: list[str]) -> None:
    first, second = folders(script, changes, script.parse_args, dest, base)
    assert first != second, f"--{dest} changes what is trained but not the run folder {first}"


@over_flags(list(flag_cases(hw0.build_parser(), HW0_RUN_ONLY, HW0_CONTEXT)))
def test_hw0_every_flag_names_the_run(dest: str, base: list[str]) -> None:
    assert_flag_names_the_run(hw0, HW0_CHANGES, dest, base)


@over_flags(list(flag_cases(hw1.build_parser(), HW1_RUN_ONLY, HW1_CONTEXT)))
def test_hw1_every_flag_names_the_run(dest: str, base: list[str]) -> None:
    assert_flag_names_the_run(hw1, HW1_CHANGES, dest, base)


@pytest.mark.parametrize(("script", "run_only"), [(hw0, HW0_RUN_ONLY), (hw1, HW1_RUN_ONLY)])
def test_run_only_flags_exist(script, run_only: dict[str, str]) -> None:
    """The run-only lists name flags the parser has (a renamed flag would silently leave the list)."""
    dests = {action.dest for action in script.build_parser()._actions}
    assert set(run_only) <= dests
