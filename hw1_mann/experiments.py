"""The hw1 experiments: the course (K, N) grid, a hidden-size sweep and LSTM vs memory network.

    python hw1_mann/experiments.py                       # course length (25000 steps per run)
    python hw1_mann/experiments.py --train_steps 3000    # shorter runs
    python hw1_mann/experiments.py --quick               # a few hundred steps, to check it all works

Each run is ``hw1_mann/train.py`` with the flags below, in ``<out_dir>/<run name>``; a run whose
``results.json`` already exists is not trained again, so an interrupted sweep just continues.
Writes ``<out_dir>/results.md`` (table) and ``<out_dir>/test_acc_vs_step.png`` (plot).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.cli import positive_int  # noqa: E402
from common.errors import cli_main  # noqa: E402
from hw1_mann import train as train_script  # noqa: E402

# (group, model, K, N, hidden): the course grid, the hidden sweep at 1-shot 3-way, LSTM vs memory at (1, 4).
EXPERIMENTS = [
    ("grid", "lstm", 1, 2, 128), ("grid", "lstm", 2, 2, 128), ("grid", "lstm", 1, 3, 128), ("grid", "lstm", 1, 4, 128),
    ("hidden", "lstm", 1, 3, 8), ("hidden", "lstm", 1, 3, 128), ("hidden", "lstm", 1, 3, 256),
    ("memory", "lstm", 1, 4, 128), ("memory", "memory", 1, 4, 128),
]
GROUP_TITLES = {"grid": "course grid (LSTM)", "hidden": "hidden size, 1-shot 3-way (LSTM)",
                "memory": "LSTM vs memory, 1-shot 4-way"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_steps", type=positive_int, help="steps per run (default: 25000, --quick: 300)")
    parser.add_argument("--eval_freq", type=positive_int, help="eval/checkpoint period (default: 100, --quick: 50)")
    parser.add_argument("--num_test_tasks", type=positive_int, help="final test tasks (default: 1000, --quick: 200)")
    parser.add_argument("--groups", nargs="+", choices=sorted(GROUP_TITLES), default=sorted(GROUP_TITLES),
                        help="which experiment groups to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="short defaults (300 steps per run, 200 test tasks) for a first look")
    parser.add_argument("--out_dir", default="runs/hw1_mann/experiments", help="where the runs and report go")
    parser.add_argument("--device", default="auto", help="passed to train.py (default: auto)")
    parser.add_argument("--random_seed", type=int, default=123, help="passed to train.py (default: 123)")
    args = parser.parse_args(argv)
    # Explicit flags win over the --quick defaults.
    defaults = (300, 50, 200) if args.quick else (25000, 100, 1000)
    args.train_steps = args.train_steps or defaults[0]
    args.eval_freq = args.eval_freq or defaults[1]
    args.num_test_tasks = args.num_test_tasks or defaults[2]
    return args


def run_one(args: argparse.Namespace, model: str, shots: int, ways: int, hidden: int) -> dict[str, Any]:
    flags = ["--model", model, "--num_shot", str(shots), "--num_classes", str(ways), "--hidden_dim", str(hidden),
             "--train_steps", str(args.train_steps), "--eval_freq", str(args.eval_freq),
             "--num_test_tasks", str(args.num_test_tasks), "--device", args.device,
             "--random_seed", str(args.random_seed)]
    run_dir = Path(args.out_dir) / train_script.run_name(train_script.parse_args(flags))
    results = run_dir / "results.json"
    if not results.exists():
        resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
        train_script.main(flags + ["--log_dir", str(run_dir)] + resume)
    return {"dir": run_dir, "flags": flags, **json.loads(results.read_text())["metrics"]}


def write_report(args: argparse.Namespace, rows: list[tuple[tuple, dict[str, Any]]]) -> None:
    out = Path(args.out_dir)
    lines = [f"Runs of {args.train_steps} steps, meta-batch 128, lr 1e-3, seed {args.random_seed}; test accuracy over "
             f"{args.num_test_tasks} test tasks (95% interval); by instance: query accuracy after 0..K support rows.",
             "", "| group | model | K | N | hidden | test acc | by instance | last val acc | steps/s |",
             "|---|---|---:|---:|---:|---|---|---:|---:|"]
    for (group, model, shots, ways, hidden), m in rows:
        by_instance = ", ".join(f"{a:.3f}" for a in m["test_acc_by_instance"])
        lines.append(f"| {group} | {model} | {shots} | {ways} | {hidden} | {m['test_acc']:.3f} +- "
                     f"{m['test_acc_ci95']:.3f} | {by_instance} | {m['val_acc']:.3f} | {m['steps_per_sec']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    groups = [g for g in GROUP_TITLES if any(key[0] == g for key, _ in rows)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for (g, model, shots, ways, hidden), m in rows:
            if g == group:
                steps = [h["step"] for h in m["history"]]
                ax.plot(steps, [h["test_acc"] for h in m["history"]], label=f"{model} K={shots} N={ways} H={hidden}")
        ax.set(title=GROUP_TITLES[group], xlabel="training step", ylabel="test query accuracy (128 tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "test_acc_vs_step.png", dpi=120)
    print(f"wrote {out / 'results.md'} and {out / 'test_acc_vs_step.png'}")


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = [(key, run_one(args, *key[1:])) for key in EXPERIMENTS if key[0] in args.groups]
    write_report(args, rows)


if __name__ == "__main__":
    main()
