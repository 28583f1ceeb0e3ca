"""The hw2 experiments: ProtoNet task composition and MAML inner-loop settings, with tables and plots.

    python hw2_protonet_maml/experiments.py --preset cpu --dry_run   # what would run, and what is done
    python hw2_protonet_maml/experiments.py --preset cpu             # run times: README, "Grid sizes"
    python hw2_protonet_maml/experiments.py --preset course --device cuda

- ProtoNet, task composition: trained (and validated) on tasks of N_train in {5, 10, 20} classes with
  K_train in {1, 5} support examples each; every model is trained once and meta-tested twice with
  ``--test``: 5-way 1-shot and 5-way 5-shot, 15 queries per class.
- MAML, 5-way 1-shot, inner loop: (inner lr 0.4, 1 step), (0.04, 1 step), (0.04, 5 steps) and learned
  per-parameter rates started at 0.4; each model meta-tested with K = 1, 2, 4, 6, 8, 10 support
  examples (10 queries per class).
Presets: ``course`` = the course's 5000 ProtoNet / 15000 MAML iterations with the course network;
``cpu`` = 300 / 1000 iterations, MAML with ``--conv_stride 2``.
``smoke`` (``--quick``) = a few iterations, to check the pipeline.
``paper`` = another grid: Snell et al.'s ProtoNet table on Omniglot under the Vinyals protocol
(PAPER below: 60-way training episodes, the paper's schedule and early stopping; 5- and 20-way,
1- and 5-shot, 1000 test tasks; 3 seeds of the 1-shot model), ``protonet_paper.png``.
Every run is ``protonet.py`` / ``maml.py`` in ``runs/hw2_protonet_maml/experiments/<preset>/<name>``
(see common/grid.py: finished runs are reused, killed ones resumed). Writes ``results.md``,
``results.json``, ``protonet_composition.png``, ``accuracy_vs_k.png`` and ``val_curves.png``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pandas as pd

from common.errors import cli_main
from common.grid import Config, grid_parser, lookup, run_experiments, save_figure
from common.omniglot import PROTOCOLS
from common.runlog import scalar_curve, write_json
from common.stats import paired_difference_ci95

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HOMEWORK = "hw2_protonet_maml"
PRESETS = {  # iterations, validation and test sizes, MAML's conv stride
    "smoke": {"protonet": 20, "maml": 10, "val_interval": 10, "num_val_tasks": 16, "num_test_tasks": 32, "stride": 2},
    "cpu": {"protonet": 300, "maml": 1000, "val_interval": 100, "num_val_tasks": 128, "num_test_tasks": 600,
            "stride": 2},
    "course": {"protonet": 5000, "maml": 15000, "val_interval": 100, "num_val_tasks": 128, "num_test_tasks": 600,
               "stride": 1},
}
PROTONET_WAYS = (5, 10, 20)  # N_train
PROTONET_SHOTS = (1, 5)  # K_train, and K at meta-test
PROTONET_QUERIES = 15
MAML_SETTINGS = {  # name -> inner-loop flags
    "lr0.4_1step": ["--inner_lr", "0.4", "--num_inner_steps", "1"],
    "lr0.04_1step": ["--inner_lr", "0.04", "--num_inner_steps", "1"],
    "lr0.04_5steps": ["--inner_lr", "0.04", "--num_inner_steps", "5"],
    "learned_lr0.4": ["--inner_lr", "0.4", "--num_inner_steps", "1", "--learn_inner_lrs"],
}
MAML_TEST_SHOTS = (1, 2, 4, 6, 8, 10)
MAML_QUERIES = 10
# Snell et al. 2017 on Omniglot: 60-way training episodes with 5 queries per class, one episode per
# step, Adam at 1e-3 halved every 2000 episodes, trained until validation stops improving (here:
# --patience validations of --val_interval episodes each, at most "iterations"); tested on 1000 tasks.
PAPER = {"train_way": 60, "query": 5, "lr_step": 2000, "val_interval": 500, "num_val_tasks": 100, "patience": 10,
         "iterations": 40000, "num_test_tasks": 1000, "test_query": 15}
PAPER_TABLE = {(5, 1): 98.8, (5, 5): 99.7, (20, 1): 96.0, (20, 5): 98.9}  # (N, K) -> the paper's accuracy, %
PAPER_SEEDS = {1: (0, 1, 2), 5: (0,)}  # K -> seeds: three for the 1-shot cells


def evaluation_configs(train: Config, shots: tuple[int, ...], queries: int, iterations: int,
                       tags: dict) -> list[Config]:
    """``--test`` evaluations of the final checkpoint of ``train``, in its run folder."""
    return [Config(f"{train.name}_test{k}shot", train.main,
                   [*train.argv, "--test", "--test_num_support", str(k), "--test_num_query", str(queries)],
                   tags={**tags, "test_shot": k}, folder=train.name, resume=False,
                   results=f"test_way5_shot{k}_query{queries}_step{iterations}.json")
            for k in shots]


def configs(preset: str, protocol: str) -> list[Config]:
    sizes = PRESETS[preset]
    common = ["--num_way", "5", "--protocol", protocol, "--val_interval", str(sizes["val_interval"]),
              "--num_val_tasks", str(sizes["num_val_tasks"]), "--num_test_tasks", str(sizes["num_test_tasks"])]
    grid = []
    for way in PROTONET_WAYS:
        for shot in PROTONET_SHOTS:
            tags = {"algorithm": "protonet", "train_way": way, "train_shot": shot}
            train = Config(f"protonet_N{way}_K{shot}", "hw2_protonet_maml.protonet",
                           [*common, "--train_num_way", str(way), "--num_support", str(shot),
                            "--num_query", str(PROTONET_QUERIES), "--num_train_iterations", str(sizes["protonet"])],
                           tags=tags)
            grid += [train, *evaluation_configs(train, PROTONET_SHOTS, PROTONET_QUERIES, sizes["protonet"], tags)]
    for setting, flags in MAML_SETTINGS.items():
        tags = {"algorithm": "maml", "setting": setting}
        train = Config(f"maml_{setting}", "hw2_protonet_maml.maml",
                       [*common, *flags, "--num_support", "1", "--conv_stride", str(sizes["stride"]),
                        "--num_train_iterations", str(sizes["maml"])], tags=tags)
        grid += [train, *evaluation_configs(train, MAML_TEST_SHOTS, MAML_QUERIES, sizes["maml"], tags)]
    return grid


def paper_configs() -> list[Config]:
    """One 60-way model per K and seed (its own test: 20-way), and its 5-way ``--test``; every test on
    the best validation's weights."""
    grid = []
    for shot, seeds in PAPER_SEEDS.items():
        for seed in seeds:
            tags = {"algorithm": "protonet", "train_shot": shot, "seed": seed}
            train = Config(f"protonet_paper_K{shot}_s{seed}", "hw2_protonet_maml.protonet", [
                "--protocol", "vinyals", "--train_num_way", str(PAPER["train_way"]), "--num_way", "20",
                "--num_support", str(shot), "--num_query", str(PAPER["query"]), "--batch_size", "1",
                "--learning_rate", "0.001", "--lr_step_size", str(PAPER["lr_step"]), "--patience",
                str(PAPER["patience"]), "--num_train_iterations", str(PAPER["iterations"]),
                "--val_interval", str(PAPER["val_interval"]), "--save_interval", str(PAPER["val_interval"]),
                "--num_val_tasks", str(PAPER["num_val_tasks"]), "--num_test_tasks", str(PAPER["num_test_tasks"]),
                "--test_num_query", str(PAPER["test_query"]), "--seed", str(seed)], tags={**tags, "test_way": 20})
            five_way = Config(f"{train.name}_test5way", train.main,
                              [*train.argv, "--test", "--test_num_way", "5"], tags={**tags, "test_way": 5},
                              folder=train.name, resume=False,
                              results=f"test_way5_shot{shot}_query{PAPER['test_query']}_best.json")
            grid += [train, five_way]
    return grid


def paper_report(frame: pd.DataFrame, out: Path) -> str:
    """The paper's table beside ours: each cell's first seed with its 95% interval over the test tasks,
    and the mean and spread over seeds where there are several."""
    rows = []
    for (way, shot), paper in PAPER_TABLE.items():
        names = [f"protonet_paper_K{shot}_s{seed}" + ("_test5way" if way == 5 else "") for seed in PAPER_SEEDS[shot]]
        finished = [lookup(frame, name, "test_accuracy") for name in names]
        finished = [100 * acc for acc in finished if acc is not None]
        train = f"protonet_paper_K{shot}_s{PAPER_SEEDS[shot][0]}"
        rows.append({"cell": f"{way}-way {shot}-shot", "paper %": paper, "ours % (seed 0, 95% interval)":
                     accuracy(frame, names[0]),
                     "seeds: mean ± std %": (f"{pd.Series(finished).mean():.2f} ± {pd.Series(finished).std():.2f} "
                                             f"({len(finished)})" if len(finished) > 1 else ""),
                     "best val step": lookup(frame, train, "best_val_step"),
                     "stopped at": lookup(frame, train, "stopped_at_step"),
                     "train s": lookup(frame, train, "train_seconds")})
    table = pd.DataFrame(rows)
    write_json(out / "results.json", {"protonet_paper": table.to_dict(orient="records")})
    plot_curves(frame[frame["test_way"] == 20] if "test_way" in frame else frame, out / "protonet_paper.png")
    return ("## ProtoNet, Snell et al.'s Omniglot table (Vinyals protocol; 60-way training, 1000 test tasks, "
            "15 queries per class)\n\n" + table.to_markdown(index=False, floatfmt=".1f"))


def accuracy(frame: pd.DataFrame, name: str) -> str:
    """``98.43 ± 0.24`` (test accuracy in %, 95% interval) of a finished run or evaluation, else empty."""
    mean, ci = lookup(frame, name, "test_accuracy"), lookup(frame, name, "test_ci95")
    return "" if mean is None else f"{100 * mean:.2f} ± {100 * ci:.2f}"


def paired(frame: pd.DataFrame, name: str, baseline: str) -> str:
    """``+1.20 ± 0.35`` (points): ``name`` minus ``baseline`` on the same test tasks, with the 95%
    interval of the per-task differences; empty when either lacks per-task accuracies."""
    if name == baseline:
        return "(reference)"
    a, b = (lookup(frame, n, "test_task_accuracies") for n in (name, baseline))
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):  # not the same tasks: no pairs
        return ""
    mean, ci = paired_difference_ci95(a, b)
    return f"{100 * mean:+.2f} ± {100 * ci:.2f}"


def paired_note(frame: pd.DataFrame) -> str:
    """The sentence under the tables, with the number of test tasks the runs were scored on (from their
    per-task accuracies, never from the preset); empty when no run has them."""
    lists = frame["test_task_accuracies"] if "test_task_accuracies" in frame else []
    counts = sorted({len(values) for values in lists if isinstance(values, list)})
    if not counts:
        return ""
    tasks = " or ".join(map(str, counts))
    return (f"\n\nPaired columns: accuracy difference in points on the same {tasks} test tasks, with the 95% "
            "interval of the per-task differences (the settings separate where it excludes 0)"
            + ("; runs scored on different task counts are not paired." if len(counts) > 1 else "."))


def report(frame: pd.DataFrame, out: Path) -> str:
    base = f"protonet_N{PROTONET_WAYS[0]}_K{PROTONET_SHOTS[0]}"  # the course's training tasks: 5-way 1-shot
    proto = pd.DataFrame([
        {"N_train": way, "K_train": shot,
         **{f"5-way {k}-shot test %": accuracy(frame, f"protonet_N{way}_K{shot}_test{k}shot") for k in PROTONET_SHOTS},
         **{f"{k}-shot: vs N5 K1 (paired)": paired(frame, f"protonet_N{way}_K{shot}_test{k}shot", f"{base}_test{k}shot")
            for k in PROTONET_SHOTS},
         "train s": lookup(frame, f"protonet_N{way}_K{shot}", "train_seconds")}
        for way in PROTONET_WAYS for shot in PROTONET_SHOTS])
    maml_rows = []
    for setting in MAML_SETTINGS:
        name = f"maml_{setting}"
        pre, post = (lookup(frame, name, f"test_support_acc_{when}") for when in ("pre", "post"))
        maml_rows.append({
            "setting": setting, "5-way 1-shot test % (15 queries)": accuracy(frame, name),
            "support acc pre/post": "" if pre is None else f"{pre:.3f}/{post:.3f}",
            **{f"K={k} %": accuracy(frame, f"{name}_test{k}shot") for k in MAML_TEST_SHOTS},
            "train s": lookup(frame, name, "train_seconds")})
    maml = pd.DataFrame(maml_rows)
    write_json(out / "results.json", {"protonet": proto.to_dict(orient="records"),
                                      "maml": maml.to_dict(orient="records")})
    plot_composition(frame, out / "protonet_composition.png")
    plot_accuracy_vs_k(frame, out / "accuracy_vs_k.png")
    plot_curves(frame[frame["test_shot"].isna()] if "test_shot" in frame else frame, out / "val_curves.png")
    return ("## ProtoNet: training task composition (meta-test 5-way, 15 queries, 95% interval)\n\n"
            + proto.to_markdown(index=False, floatfmt=".1f")
            + "\n\n## MAML 5-way 1-shot: inner-loop settings, meta-tested with K support examples (10 queries)\n\n"
            + maml.to_markdown(index=False, floatfmt=".1f")
            + paired_note(frame))


def plot_points(ax: plt.Axes, frame: pd.DataFrame, xs: tuple[int, ...], names: list[str], label: str) -> None:
    """Test accuracy with its 95% interval against ``xs``, for the finished ones of ``names``."""
    points = [(x, lookup(frame, name, "test_accuracy"), lookup(frame, name, "test_ci95")) for x, name in zip(xs, names)]
    points = [point for point in points if point[1] is not None]
    if points:
        x, y, ci = zip(*points)
        ax.errorbar(x, y, yerr=ci, marker="o", capsize=3, label=label)


def plot_composition(frame: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, len(PROTONET_SHOTS), figsize=(10, 4), sharey=True)
    for axis, test_shot in zip(axes, PROTONET_SHOTS):
        for shot in PROTONET_SHOTS:
            plot_points(axis, frame, PROTONET_WAYS,
                        [f"protonet_N{way}_K{shot}_test{test_shot}shot" for way in PROTONET_WAYS], f"K_train = {shot}")
        axis.set(xlabel="N_train (classes per training task)", title=f"meta-test 5-way {test_shot}-shot",
                 xticks=PROTONET_WAYS)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy (95% interval)")
    save_figure(fig, path)


def plot_accuracy_vs_k(frame: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in MAML_SETTINGS:
        plot_points(ax, frame, MAML_TEST_SHOTS, [f"maml_{setting}_test{k}shot" for k in MAML_TEST_SHOTS], setting)
    ax.set(xlabel="support examples per class at meta-test (K)", ylabel="test accuracy (10 queries/class)",
           title="MAML meta-trained with K=1, tested with more support")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no finished MAML run yet: nothing to label
        ax.legend(fontsize=8)
    save_figure(fig, path)


def val_curve(run_dir: Path) -> pd.Series:
    return pd.Series(scalar_curve(run_dir, "val/query_acc"), dtype=float)


def plot_curves(trained: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run_dir in zip(trained["name"], trained["run_dir"]):
        curve = val_curve(run_dir)
        if len(curve):
            ax.plot(curve.index, curve.values, marker=".", label=name)
    ax.set(xlabel="meta-training iteration", ylabel="validation query accuracy (training N and K)",
           title="Validation during training")
    ax.grid(alpha=0.3)
    if ax.lines:  # no TensorBoard events (e.g. the runs were copied without them): an empty plot
        ax.legend(fontsize=7)
    save_figure(fig, path)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = grid_parser(__doc__, presets=(*PRESETS, "paper"))
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cs330",
                        help="class split passed to every run (default: cs330; the paper preset is vinyals)")
    args = parser.parse_args(argv)
    if args.preset == "paper":
        run_experiments(args, HOMEWORK, paper_configs(), paper_report)
    else:
        run_experiments(args, HOMEWORK, configs(args.preset, args.protocol), report)


if __name__ == "__main__":
    main()
