"""The course's hw3 command lines, parsed by ft.py and icl.py into the runs the handout means.

Each row is a line of the course's ``hw3/run_all.sh`` (CS330 Fall 2022; the public copy in
github.com/Jaskanwal/stanford-CS330-2022), ``python3 ft.py`` / ``python3 icl.py`` replaced by our
script's flag parser: nothing is loaded or trained. The course's flags are those of the argparse at
the top of its ``hw3/ft.py`` (``--task --model --dataset --k --mode --debug --repeats --device``) and
``hw3/icl.py`` (``--prompt`` instead of ``--mode``), where ``--model``, ``--dataset``, ``--k``,
``--mode`` and ``--prompt`` are comma-separated lists. Ours keep the course's names as the canonical
ones: a list of models, datasets or (ft.py) modes makes one run per combination, each in its own
run folder, in the course's loop order (ft.py: dataset, then model, then mode; icl.py: model, then
dataset); the k and (icl.py) prompts of a run share its folder, as they share its loops.

What a line means that it does not say (the starter's defaults ours do not share, each a flag here):
``--lr`` (the course: Adam at 1e-4 for BERT, 2e-5 for GPT-2; ours AdamW at 1e-4, 1e-3 for LoRA),
the step limit and early stopping (the course: up to 1000 steps for BERT, 10 per support example
for GPT-2, checked every 10 / 40 steps; ours ``--max_steps`` 100, ``--eval_every`` 5),
``--n_eval`` (the course: 125 per task; ours 50), and ICL's support draw (the course: one draw per
repeat, with replacement, shared by every query as with our ``--support fixed``, its order shuffled
for each query, which neither of ours does; ours defaults to a fresh draw per query). The course's
``--debug`` (one step, one evaluation example) is not accepted: no handout line uses it, and
``--max_steps 1 --n_eval 1`` says the same.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from common.errors import CS330Error
from hw3_lm_fewshot import ft, icl

ALL_MODES = ["first", "last", "middle", "lora4", "lora16"]
# (the course's command line, our module, the runs it means: one dict of settings per run, in order)
ROWS = [
    pytest.param("python3 ft.py --task ft   --model bert-tiny,bert-med --dataset amazon --k 1,8,128", ft,
                 [{"model": model, "dataset": "amazon", "mode": "all", "k": [1, 8, 128], "repeats": 1}
                  for model in ("bert-tiny", "bert-med")], id="Q0-ft"),
    pytest.param("python3 icl.py --task icl  --model med,full --dataset babi --k 0,1,16", icl,
                 [{"model": model, "dataset": "babi", "k": [0, 1, 16], "prompt": ["qa"], "repeats": 1}
                  for model in ("med", "full")], id="Q1-icl-babi"),
    pytest.param("python3 icl.py --task icl  --model med --dataset xsum --k 0,1,4 --prompt none,tldr,custom", icl,
                 [{"model": "med", "dataset": "xsum", "k": [0, 1, 4], "prompt": ["none", "tldr", "custom"]}],
                 id="Q1-icl-xsum"),
    pytest.param("python3 ft.py --task ft   --model med --mode first,last,middle,lora4,lora16 --dataset xsum,babi "
                 "--k 0,1,8,64", ft,
                 [{"model": "med", "dataset": dataset, "mode": mode, "k": [0, 1, 8, 64],
                   "prompt_format": "tldr" if dataset == "xsum" else "qa"}  # the course's fine-tuning cues
                  for dataset in ("xsum", "babi") for mode in ALL_MODES], id="Q2-ft"),
    pytest.param("python3 icl.py --task icl  --model med --dataset babi --k 16 --repeats 5", icl,
                 [{"model": "med", "dataset": "babi", "k": [16], "repeats": 5, "prompt": ["qa"]}], id="Q3-icl"),
    pytest.param("python3 ft.py --task ft   --model med --dataset babi --k 16 --repeats 5 --mode lora16", ft,
                 [{"model": "med", "dataset": "babi", "k": [16], "repeats": 5, "mode": "lora16", "lr": 1e-3}],
                 id="Q3-ft"),
]


def parse_runs(script, command: str) -> list:
    """``command`` with ``python3 <course file>`` replaced by ``script``'s flag parser."""
    return script.parse_runs(shlex.split(command)[2:])


@pytest.mark.parametrize(("command", "script", "runs"), ROWS)
def test_handout_lines_mean_the_same_runs(command: str, script, runs: list[dict[str, Any]]) -> None:
    parsed = parse_runs(script, command)
    assert [{name: getattr(args, name) for name in expected} for args, expected in zip(parsed, runs)] == runs
    assert len(parsed) == len(runs)
    folders = [script.run_folder(args) for args in parsed]
    assert len(set(folders)) == len(folders)  # each run its own folder, none replacing another's results


@pytest.mark.parametrize(("script", "task"), [(ft, "ft"), (icl, "icl")])
def test_the_courses_plot_task_points_to_experiments(script, task: str, capsys) -> None:
    assert script.parse_args(["--task", task]).task == task
    with pytest.raises(SystemExit) as info:
        script.parse_args(["--task", "plot"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"runs --task {task} only" in err and "experiments.py" in err


def test_one_log_dir_takes_one_run() -> None:
    with pytest.raises(CS330Error, match=r"--log_dir names one run folder, but --dataset x --model x --mode make 2"):
        ft.parse_runs(["--mode", "last,lora4", "--log_dir", "runs/x"])
    with pytest.raises(CS330Error, match=r"--model ',' names nothing"):
        icl.parse_runs(["--model", ","])
