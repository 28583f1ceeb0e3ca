"""The hw1 experiments: the course (K, N) grid, a hidden-size sweep, LSTM vs memory network, seeds
of the hardest course setting, and LSTM vs memory network under Santoro et al. (2016)'s protocol.

    python hw1_mann/experiments.py --preset cpu --dry_run   # what would run, and what is done
    python hw1_mann/experiments.py --preset cpu             # run times: README
    python hw1_mann/experiments.py --preset course --device cuda

Presets:
- ``cpu``: the LSTM at (K, N) = (1, 4) with 3 seeds at the course's 25000 steps; Santoro et al.'s
  protocol (5 classes x 10 presentations, meta-batch 16, hidden 200) for 12000 steps = 192,000
  episodes, about twice the paper's 100,000, 3 seeds of each model (the README gives the steps/s
  and minutes per run that sized it for a CPU).
- ``course``: the course's 25000 steps for the course grid (1,2), (2,2), (1,3), (1,4), hidden sizes
  8/128/256 at (1, 3), LSTM vs memory network at (1, 4), the 3 seeds at (1, 4), and the Santoro
  et al. runs of ``cpu``.
- ``ablation``: the memory network under Santoro et al.'s protocol with one difference from the
  paper's network per run (ABLATION below), seed 123, 12000 steps, scored on 512 validation episodes
  every 500 steps: a table in ``results.md`` and ``ablation.png``.
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
from common.grid import Config, grid_parser, lookup, ran_with, run_experiments, save_figure

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
# Santoro et al. (2016): 5 classes x 10 presentations; K is not a flag there (0 in the key).
SANTORO = [("santoro", model, 0, 5, 200, seed) for model in ("lstm", "memory") for seed in (123, 124, 125)]
# The protocol's own sizes: the paper's meta-batch 16 and hidden 200; every 200 steps 128 val and
# 128 test episodes give the learning curve (by instance, from the same forward).
SANTORO_FLAGS = ["--protocol", "santoro", "--presentations", "10", "--meta_batch_size", "16", "--eval_tasks", "128"]
PRESETS = {  # experiments, training steps (course protocol, Santoro's), eval/checkpoint period, final test tasks
    "smoke": {"runs": SEEDS[:1], "train_steps": 300, "eval_freq": 50, "num_test_tasks": 200},
    "cpu": {"runs": SEEDS + SANTORO, "train_steps": 25000, "santoro_steps": 12000, "eval_freq": 100,
            "num_test_tasks": 1000},
    "course": {"runs": COURSE + SEEDS + SANTORO, "train_steps": 25000, "santoro_steps": 12000, "eval_freq": 100,
               "num_test_tasks": 1000},
}
# Santoro et al. (2016), table 1 (Omniglot, 5 classes, one-hot labels): percent correct on a class's
# 1st, 2nd, 3rd, 4th, 5th and 10th presentation.
INSTANCES = (1, 2, 3, 4, 5, 10)
PAPER = {"lstm": (24.4, 49.5, 55.3, 61.0, 63.6, 62.5), "memory": (36.4, 82.8, 91.0, 92.6, 94.9, 98.1)}
# The ablation preset (issue 25): what each difference from the paper's memory network does, read on
# validation episodes (test only at the end). "paper" is the defaults: --key_strength none, --lru_write paper.
ABLATION = {
    "paper": [],
    "lru_per_head": ["--lru_write", "per_head"],
    "lru_per_head_ks_learned": ["--lru_write", "per_head", "--key_strength", "learned"],
}
ABLATION_FLAGS = ["--protocol", "santoro", "--presentations", "10", "--meta_batch_size", "16", "--eval_tasks", "512",
                  "--model", "memory", "--num_classes", "5", "--hidden_dim", "200", "--random_seed", "123",
                  "--train_steps", "12000", "--eval_freq", "500", "--num_test_tasks", "1000"]
ABLATION_STEPS = (2000, 4000, 8000, 12000)  # the validation columns of the table
GROUP_TITLES = {"grid": "course grid (LSTM)", "hidden": "hidden size, 1-shot 3-way (LSTM)",
                "memory": "LSTM vs memory, 1-shot 4-way", "seeds": "LSTM, 1-shot 4-way, 3 seeds"}


def run_name(model: str, shots: int, ways: int, hidden: int, seed: int) -> str:
    # The memory runs name their --lru_write (the default, the paper's, since 2026-12-04): the grid takes a
    # folder with results as done, and those of the earlier rule (per_head) have the names without it.
    lru = "_lrupaper" if model == "memory" else ""
    if shots == 0:
        return f"{model}_santoro_N{ways}_P10_H{hidden}{lru}_seed{seed}"
    return f"{model}_K{shots}_N{ways}_H{hidden}{lru}_seed{seed}"


def configs(preset: str) -> list[Config]:
    sizes = PRESETS[preset]
    result = []
    for _, model, shots, ways, hidden, seed in sizes["runs"]:
        argv = ["--model", model, "--num_classes", str(ways), "--hidden_dim", str(hidden), "--random_seed", str(seed),
                "--num_test_tasks", str(sizes["num_test_tasks"])]
        if shots == 0:
            argv += [*SANTORO_FLAGS, "--train_steps", str(sizes["santoro_steps"]), "--eval_freq", "200"]
        else:
            argv += ["--num_shot", str(shots), "--train_steps", str(sizes["train_steps"]),
                     "--eval_freq", str(sizes["eval_freq"])]
        result.append(Config(run_name(model, shots, ways, hidden, seed), "hw1_mann.train", argv))
    return result


def report_for(preset: str):
    """The report of ``preset``: a table row per experiment, a plot panel per group."""
    runs = PRESETS[preset]["runs"]

    def report(frame: pd.DataFrame, out: Path) -> str:
        lines = ["| group | model | K | N | hidden | seed | test acc (95%) | by instance | last val acc | steps/s |",
                 "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
        seed_accs = []
        for group, model, shots, ways, hidden, seed in (key for key in runs if key[0] != "santoro"):
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
        names = [run_name(*key[1:]) for key in runs if key[0] != "santoro"]
        header = (f"Runs of {ran_with(frame, names, 'train_steps', PRESETS[preset]['train_steps'])} steps, "
                  f"meta-batch {ran_with(frame, names, 'meta_batch_size', 128)}, lr "
                  f"{ran_with(frame, names, 'learning_rate', 1e-3)}; test accuracy over "
                  f"{ran_with(frame, names, 'num_test_tasks', PRESETS[preset]['num_test_tasks'])} test tasks; by "
                  "instance: query accuracy after 0..K support rows.")
        if len(seed_accs) > 1:
            header += (f" Seeds at (K, N) = (1, 4): mean {np.mean(seed_accs):.3f}, std {np.std(seed_accs, ddof=1):.3f} "
                       f"over {len(seed_accs)} seeds.")
        plot(frame, runs, out / "test_acc_vs_step.png")
        santoro = [key for key in runs if key[0] == "santoro"]
        if santoro:
            plot_santoro(frame, santoro, out / "santoro_by_instance.png")
            return "\n\n".join([header, "\n".join(lines), santoro_table(frame, santoro, preset)])
        return header + "\n\n" + "\n".join(lines)

    return report


def plot(frame: pd.DataFrame, runs: list[tuple], path: Path) -> None:
    groups = [g for g in GROUP_TITLES if any(key[0] == g for key in runs)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        names = [run_name(*key[1:]) for key in runs if key[0] == group]
        for _, model, shots, ways, hidden, seed in (key for key in runs if key[0] == group):
            history = lookup(frame, run_name(model, shots, ways, hidden, seed), "history", [])
            ax.plot([h["step"] for h in history], [h["test_acc"] for h in history],
                    label=f"{model} K={shots} N={ways} H={hidden} seed {seed}")
        ax.set(title=GROUP_TITLES[group], xlabel="training step",
               ylabel=f"test query accuracy ({ran_with(frame, names, 'eval_tasks', 128)} tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def santoro_table(frame: pd.DataFrame, runs: list[tuple], preset: str) -> str:
    """Percent correct by instance per run, mean ± std over seeds per model, and the paper's row."""
    lines = ["| model | seed | 1st | 2nd | 3rd | 4th | 5th | 10th | every step (95%) | steps/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for model in PAPER:
        finals = []
        for _, _, shots, ways, hidden, seed in (key for key in runs if key[1] == model):
            name = run_name(model, shots, ways, hidden, seed)
            by_instance = lookup(frame, name, "test_acc_by_instance")
            if by_instance is None:
                lines.append(f"| {model} | {seed} | not finished | | | | | | | |")
                continue
            finals.append([100 * by_instance[i - 1] for i in INSTANCES])
            acc, ci95 = (100 * lookup(frame, name, key) for key in ("test_acc", "test_acc_ci95"))
            every_step = f"{acc:.1f} ± {ci95:.1f}"
            lines.append(f"| {model} | {seed} | " + " | ".join(f"{a:.1f}" for a in finals[-1])
                         + f" | {every_step} | {lookup(frame, name, 'steps_per_sec', float('nan')):.1f} |")
        if len(finals) > 1:
            mean, std = np.mean(finals, axis=0), np.std(finals, axis=0, ddof=1)
            lines.append(f"| **{model}, mean ± std** | {len(finals)} seeds | "
                         + " | ".join(f"**{m:.1f} ± {d:.1f}**" for m, d in zip(mean, std)) + " | | |")
        paper = " | ".join(f"{a:.1f}" for a in PAPER[model])
        lines.append(f"| {model}, Santoro et al. table 1 | | {paper} | | |")
    return santoro_header(frame, [run_name(*key[1:]) for key in runs], PRESETS[preset]) + "\n\n" + "\n".join(lines)


def santoro_header(frame: pd.DataFrame, names: list[str], sizes: dict) -> str:
    """The protocol's sizes as the finished runs ran them (the preset's while none has finished)."""
    steps, batch, tests = (ran_with(frame, names, column, planned) for column, planned in (
        ("train_steps", sizes["santoro_steps"]), ("meta_batch_size", 16), ("num_test_tasks", sizes["num_test_tasks"])))
    episodes = f" ({batch * steps:,} episodes)" if isinstance(steps, int) and isinstance(batch, int) else ""
    per_instance = (f", each instance column over {5 * tests} presentations (binomial 95% interval at most ± "
                    f"{196 * (0.25 / (5 * tests)) ** 0.5:.1f} points)" if isinstance(tests, int) else "")
    hidden, rate = ran_with(frame, names, "hidden_dim", 200), ran_with(frame, names, "learning_rate", 1e-3)
    return (f"Santoro et al. protocol: 5 classes x 10 presentations, labels one step late, meta-batch {batch}, "
            f"hidden {hidden}, Adam lr {rate}, {steps} steps{episodes}; percent correct on {tests} test "
            f"episodes{per_instance}.")


def plot_santoro(frame: pd.DataFrame, runs: list[tuple], path: Path) -> None:
    """Left: test accuracy at a class's 1st/2nd/5th/10th presentation against episodes seen (mean over
    seeds of the 128-episode test batches). Right: final accuracy by instance (mean ± std over seeds)
    with the paper's points."""
    fig, (curve, final) = plt.subplots(1, 2, figsize=(11, 4))
    for model, colour in (("lstm", "tab:blue"), ("memory", "tab:red")):
        names = [run_name(*key[1:]) for key in runs if key[1] == model]
        histories = [h for h in (lookup(frame, name, "history") for name in names) if h]
        batch = ran_with(frame, names, "meta_batch_size", 16)
        if not histories or not isinstance(batch, int):  # seeds of different meta-batches share no x axis
            continue
        length = min(len(h) for h in histories)
        episodes = [batch * record["step"] for record in histories[0][:length]]
        by_step = np.array([[r["test_acc_by_instance"] for r in h[:length]] for h in histories])  # [seeds, evals, I]
        for instance, style in ((1, ":"), (2, "--"), (5, "-."), (10, "-")):
            curve.plot(episodes, 100 * by_step[:, :, instance - 1].mean(0), style, color=colour,
                       label=f"{model}, instance {instance}")
        finals = 100 * np.array([lookup(frame, name, "test_acc_by_instance") for name in names
                                 if lookup(frame, name, "test_acc_by_instance") is not None])
        if len(finals):
            ticks = np.arange(1, finals.shape[1] + 1)
            final.errorbar(ticks, finals.mean(0), yerr=finals.std(0, ddof=1) if len(finals) > 1 else None,
                           color=colour, marker="o", capsize=3, label=f"{model} ({len(finals)} seeds)")
        final.plot(INSTANCES, PAPER[model], "x", color=colour, markersize=9, label=f"{model}, Santoro et al.")
    names = [run_name(*key[1:]) for key in runs]
    curve.set(title=f"learning curve (test, {ran_with(frame, names, 'eval_tasks', 128)} episodes per point)",
              xlabel="training episodes", ylabel="percent correct")
    final.set(title=f"after training ({ran_with(frame, names, 'num_test_tasks', 1000)} test episodes)",
              xlabel="instance (presentation of a class)", ylabel="percent correct", xticks=range(1, 11))
    for ax in (curve, final):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def ablation_name(variant: str) -> str:
    return f"memory_santoro_{variant}_seed123"


def ablation_configs() -> list[Config]:
    return [Config(ablation_name(variant), "hw1_mann.train", [*ABLATION_FLAGS, *flags], tags={"variant": variant})
            for variant, flags in ABLATION.items()]


def ablation_report(frame: pd.DataFrame, out: Path) -> str:
    """Validation accuracy (every step of an episode) at ABLATION_STEPS and its best, validation by
    instance at the end, the final test, per variant; and ``ablation.png``."""
    lines = ["| variant | flags | validation at " + " / ".join(map(str, ABLATION_STEPS)) + " (best) | validation by "
             "instance at the end: 1st / 2nd / 3rd / 4th / 5th / 10th | test every step (95%) | steps/s |",
             "|---|---|---|---|---|---:|"]
    for variant, flags in ABLATION.items():
        name, shown = ablation_name(variant), " ".join(flags) or "(the defaults)"
        history = lookup(frame, name, "history")
        if not history:
            lines.append(f"| {variant} | {shown} | not finished | | | |")
            continue
        val = {record["step"]: 100 * record["val_acc"] for record in history}
        best = max(val, key=val.get)
        curve = " / ".join(f"{val[step]:.1f}" if step in val else "-" for step in ABLATION_STEPS)
        by_instance = " / ".join(f"{100 * history[-1]['val_acc_by_instance'][i - 1]:.1f}" for i in INSTANCES)
        test = f"{100 * lookup(frame, name, 'test_acc'):.1f} ± {100 * lookup(frame, name, 'test_acc_ci95'):.1f}"
        lines.append(f"| {variant} | {shown} | {curve} ({val[best]:.1f} at {best}) | {by_instance} | {test} | "
                     f"{lookup(frame, name, 'steps_per_sec', float('nan')):.2f} |")
    plot_ablation(frame, out / "ablation.png")
    names = [ablation_name(variant) for variant in ABLATION]
    return (f"Memory network ablation: Santoro et al. protocol, seed 123, "
            f"{ran_with(frame, names, 'train_steps', 12000)} steps; validation on "
            f"{ran_with(frame, names, 'eval_tasks', 512)} episodes per point, test on "
            f"{ran_with(frame, names, 'num_test_tasks', 1000)} episodes at the end.\n\n" + "\n".join(lines))


def plot_ablation(frame: pd.DataFrame, path: Path) -> None:
    """Validation accuracy against step per variant: every step (left), the 1st and 2nd instance (right)."""
    fig, (every, first) = plt.subplots(1, 2, figsize=(11, 4))
    for (variant, _), colour in zip(ABLATION.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        history = lookup(frame, ablation_name(variant), "history")
        if not history:
            continue
        steps = [record["step"] for record in history]
        every.plot(steps, [100 * record["val_acc"] for record in history], color=colour, label=variant)
        for instance, style in ((1, ":"), (2, "-")):
            first.plot(steps, [100 * record["val_acc_by_instance"][instance - 1] for record in history], style,
                       color=colour, label=f"{variant}, instance {instance}")
    every.set(title="validation, every step", xlabel="training step", ylabel="percent correct")
    first.set(title="validation, 1st and 2nd presentation", xlabel="training step", ylabel="percent correct")
    for ax in (every, first):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = grid_parser(__doc__, presets=(*PRESETS, "ablation")).parse_args(argv)
    if args.preset == "ablation":
        run_experiments(args, HOMEWORK, ablation_configs(), ablation_report)
        return
    run_experiments(args, HOMEWORK, configs(args.preset), report_for(args.preset))


if __name__ == "__main__":
    main()
