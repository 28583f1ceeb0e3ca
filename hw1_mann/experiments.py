"""The hw1 experiments: the course (K, N) grid, a hidden-size sweep, LSTM vs memory network, and
seeds of the hardest course setting.

    python hw1_mann/experiments.py --preset cpu --dry_run   # what would run, and what is done
    python hw1_mann/experiments.py --preset cpu             # about an hour on 2 CPU cores
    python hw1_mann/experiments.py --preset course --device cuda

Presets:
- ``cpu``: the LSTM at (K, N) = (1, 4) with 3 seeds at the course's 25000 steps (README: 16-30
  steps/s at (1, 4) on this CPU, so 15-25 min per run). The Santoro et al. protocol is future work.
- ``course``: the course's 25000 steps for the course grid (1,2), (2,2), (1,3), (1,4), hidden sizes
  8/128/256 at (1, 3), LSTM vs memory network at (1, 4), and the 3 seeds at (1, 4).
- ``smoke`` (``--quick``): 300 steps of one run, to check the pipeline.
Every run is ``hw1_mann/train.py`` in ``runs/hw1_mann/experiments/<preset>/<name>`` (see
common/grid.py: finished runs are reused, killed ones resumed). Writes ``results.md`` (table) and
``test_acc_vs_step.png``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from common.errors import cli_main
from common.grid import Config, grid_parser, lookup, run_experiments

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HOMEWORK = "hw1_mann"
# (group, model, K, N, hidden, seed)
COURSE = [
    ("grid", "lstm", 1, 2, 128, 123), ("grid", "lstm", 2, 2, 128, 123), ("grid", "lstm", 1, 3, 128, 123),
    ("grid", "lstm", 1, 4, 128, 123),
    ("hidden", "lstm", 1, 3, 8, 123), ("hidden", "lstm", 1, 3, 128, 123), ("hidden", "lstm", 1, 3, 256, 123),
    ("memory", "lstm", 1, 4, 128, 123), ("memory", "memory", 1, 4, 128, 123),
]
SEEDS = [("seeds", "lstm", 1, 4, 128, seed) for seed in (123, 124, 125)]
PRESETS = {  # experiments, training steps, eval/checkpoint period, final test tasks
    "smoke": {"runs": SEEDS[:1], "train_steps": 300, "eval_freq": 50, "num_test_tasks": 200},
    "cpu": {"runs": SEEDS, "train_steps": 25000, "eval_freq": 100, "num_test_tasks": 1000},
    "course": {"runs": COURSE + SEEDS, "train_steps": 25000, "eval_freq": 100, "num_test_tasks": 1000},
}
GROUP_TITLES = {"grid": "course grid (LSTM)", "hidden": "hidden size, 1-shot 3-way (LSTM)",
                "memory": "LSTM vs memory, 1-shot 4-way", "seeds": "LSTM, 1-shot 4-way, 3 seeds"}


def run_name(model: str, shots: int, ways: int, hidden: int, seed: int) -> str:
    return f"{model}_K{shots}_N{ways}_H{hidden}_seed{seed}"


def configs(preset: str) -> list[Config]:
    sizes = PRESETS[preset]
    return [Config(run_name(model, shots, ways, hidden, seed), "hw1_mann.train",
                   ["--model", model, "--num_shot", str(shots), "--num_classes", str(ways), "--hidden_dim", str(hidden),
                    "--random_seed", str(seed), "--train_steps", str(sizes["train_steps"]),
                    "--eval_freq", str(sizes["eval_freq"]), "--num_test_tasks", str(sizes["num_test_tasks"])])
            for _, model, shots, ways, hidden, seed in sizes["runs"]]


def report_for(preset: str):
    """The report of ``preset``: a table row per experiment, a plot panel per group."""
    runs = PRESETS[preset]["runs"]

    def report(frame: pd.DataFrame, out: Path) -> str:
        lines = ["| group | model | K | N | hidden | seed | test acc (95%) | by instance | last val acc | steps/s |",
                 "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
        seed_accs = []
        for group, model, shots, ways, hidden, seed in runs:
            name = run_name(model, shots, ways, hidden, seed)
            acc = lookup(frame, name, "test_acc")
            if acc is None:
                lines.append(f"| {group} | {model} | {shots} | {ways} | {hidden} | {seed} | not finished | | | |")
                continue
            seed_accs += [acc] if group == "seeds" else []
            by_instance = ", ".join(f"{a:.3f}" for a in lookup(frame, name, "test_acc_by_instance", []))
            lines.append(f"| {group} | {model} | {shots} | {ways} | {hidden} | {seed} | {acc:.3f} ± "
                         f"{lookup(frame, name, 'test_acc_ci95'):.3f} | {by_instance} | "
                         f"{lookup(frame, name, 'val_acc', float('nan')):.3f} | "
                         f"{lookup(frame, name, 'steps_per_sec', float('nan')):.1f} |")
        header = (f"Runs of {PRESETS[preset]['train_steps']} steps, meta-batch 128, lr 1e-3; test accuracy over "
                  f"{PRESETS[preset]['num_test_tasks']} test tasks; by instance: query accuracy after 0..K "
                  "support rows.")
        if len(seed_accs) > 1:
            header += (f" Seeds at (K, N) = (1, 4): mean {np.mean(seed_accs):.3f}, std {np.std(seed_accs, ddof=1):.3f} "
                       f"over {len(seed_accs)} seeds.")
        plot(frame, runs, out / "test_acc_vs_step.png")
        return header + "\n\n" + "\n".join(lines)

    return report


def plot(frame: pd.DataFrame, runs: list[tuple], path: Path) -> None:
    groups = [g for g in GROUP_TITLES if any(key[0] == g for key in runs)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for _, model, shots, ways, hidden, seed in (key for key in runs if key[0] == group):
            history = lookup(frame, run_name(model, shots, ways, hidden, seed), "history", [])
            ax.plot([h["step"] for h in history], [h["test_acc"] for h in history],
                    label=f"{model} K={shots} N={ways} H={hidden} seed {seed}")
        ax.set(title=GROUP_TITLES[group], xlabel="training step", ylabel="test query accuracy (128 tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = grid_parser(__doc__, presets=tuple(PRESETS)).parse_args(argv)
    run_experiments(args, HOMEWORK, configs(args.preset), report_for(args.preset))


if __name__ == "__main__":
    main()
