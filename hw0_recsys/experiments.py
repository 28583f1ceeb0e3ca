"""The homework's experiments, each a set of ``train.py`` runs, summarised as markdown tables and PNG plots.

  python hw0_recsys/experiments.py                    # course grid + 5-fold u1..u5 RMSE
  python hw0_recsys/experiments.py --stages tune      # the validation grid behind the SVD++ defaults
  python hw0_recsys/experiments.py --quick            # a few epochs of everything, to check the pipeline

* course: the multi-task model on the course's 95/5 random split with loss weights
  (factorization, regression) = (0.99, 0.01), (0.5, 0.5), (0.01, 0.99) and shared embeddings, plus
  (0.5, 0.5) with separate embeddings; test MRR, Recall@10, NDCG@10 and MSE.
* folds: SVD++ and biased MF (SVD++ without y_j) on the official folds u1..u5; test RMSE per fold,
  mean and 95% interval, training time per fold.
* tune: SVD++ variants scored on a 5% validation slice of u1.base (the test folds are never used).

Finished runs (results.json present with the same flags) are reused, so an interrupted sweep
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from common.errors import cli_main  # noqa: E402
from common.runlog import runs_root  # noqa: E402
from common.stats import mean_ci95  # noqa: E402
from hw0_recsys import train as train_script  # noqa: E402

STAGES = ("course", "folds", "tune")
COURSE_GRID = [  # (label, flags)
    ("fw0.99 rw0.01 shared", ["--factorization_weight", "0.99", "--regression_weight", "0.01"]),
    ("fw0.5 rw0.5 shared", ["--factorization_weight", "0.5", "--regression_weight", "0.5"]),
    ("fw0.01 rw0.99 shared", ["--factorization_weight", "0.01", "--regression_weight", "0.99"]),
    ("fw0.5 rw0.5 separate", ["--factorization_weight", "0.5", "--regression_weight", "0.5",
                              "--no_embedding_sharing"]),
]
FOLDS = ("u1", "u2", "u3", "u4", "u5")
FOLD_MODELS = [("SVD++", ["--model", "svdpp"]), ("biased MF", ["--model", "svdpp", "--no_implicit"])]
TUNE_GRID = [  # SVD++ flags varied around the defaults (factor/implicit/bias reg, exponent, dim)
    [], ["--factor_reg", "0.2", "--implicit_reg", "0.2"], ["--factor_reg", "0.4", "--implicit_reg", "0.4"],
    ["--bias_reg", "0.01"], ["--reg_exponent", "0.5"], ["--reg_exponent", "1", "--factor_reg", "0.1",
                                                        "--implicit_reg", "0.1"],
    ["--embedding_dim", "128"], ["--no_implicit"],
]


def run(out_dir: Path, name: str, flags: list[str], extra: list[str]) -> dict:
    """One training run in ``out_dir/name``; reuses its results.json if the flags match."""
    run_dir = out_dir / name
    argv = [*flags, *extra, "--log_dir", str(run_dir)]
    expected = {"model": train_script.parse_args(argv).model, **train_script.run_hparams(train_script.parse_args(argv))}
    results_path = run_dir / "results.json"
    if results_path.exists():
        saved = json.loads(results_path.read_text())
        if saved["hparams"] == json.loads(json.dumps(expected)):
            return saved["metrics"]
    if (run_dir / "checkpoints").is_dir():
        argv.append("--resume")
    return train_script.main(argv)


def course_stage(out_dir: Path, extra: list[str], quick: bool) -> str:
    epochs = ["--num_epochs", "2"] if quick else []
    rows = []
    for label, flags in COURSE_GRID:
        metrics = run(out_dir, "course_" + label.replace(" ", "_"), flags + epochs, extra)
        rows.append({"run": label, "MRR": metrics["test/mrr"], "Recall@10": metrics["test/recall@10"],
                     "NDCG@10": metrics["test/ndcg@10"], "MSE": metrics["test/mse"],
                     "train s": metrics["train_seconds"]})
    table = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, column in zip(axes, ("MRR", "MSE")):
        axis.barh(table["run"], table[column])
        axis.set_xlabel(f"test {column}")
    axes[1].set_yticks([])
    fig.suptitle("Multi-task model on the 95/5 random split of ml-100k")
    fig.tight_layout()
    fig.savefig(out_dir / "course_grid.png", dpi=120)
    plt.close(fig)
    return "## Course grid (multi-task model, random 95/5 split)\n\n" + table.to_markdown(index=False, floatfmt=".4f")


def folds_stage(out_dir: Path, extra: list[str], quick: bool) -> str:
    epochs = ["--num_epochs", "25"] if quick else []
    rows, per_model = [], {}
    for label, flags in FOLD_MODELS:
        for fold in FOLDS:
            metrics = run(out_dir, f"folds_{label.replace(' ', '_').replace('+', 'p')}_{fold}",
                          flags + ["--split", fold] + epochs, extra)
            rows.append({"model": label, "fold": fold, "RMSE": metrics["test/rmse"],
                         "MRR": metrics["test/mrr"], "train s": metrics["train_seconds"]})
            per_model.setdefault(label, []).append(metrics["test/rmse"])
    table = pd.DataFrame(rows).pivot(index="model", columns="fold", values="RMSE")
    seconds = pd.DataFrame(rows).groupby("model")["train s"].max()
    summary = []
    for label, values in per_model.items():
        mean, half_width = mean_ci95(values)
        summary.append({"model": label, **table.loc[label].to_dict(), "mean RMSE": mean, "95% CI +-": half_width,
                        "max train s per fold": seconds[label]})
    summary_table = pd.DataFrame(summary)
    fig, axis = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(per_model)
    for index, (label, values) in enumerate(per_model.items()):
        axis.bar([position + index * width for position in range(len(FOLDS))], values, width, label=label)
    axis.set_xticks([position + width * (len(per_model) - 1) / 2 for position in range(len(FOLDS))], FOLDS)
    axis.axhline(0.905, color="black", linestyle="--", linewidth=1, label="target 0.905")
    axis.set_ylim(0.85, max(max(v) for v in per_model.values()) + 0.02)
    axis.set_ylabel("test RMSE")
    axis.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "folds_rmse.png", dpi=120)
    plt.close(fig)
    return ("## 5-fold RMSE on the official u1..u5 folds\n\n"
            + summary_table.to_markdown(index=False, floatfmt=".4f"))


def tune_stage(out_dir: Path, extra: list[str], quick: bool) -> str:
    epochs = ["--num_epochs", "25"] if quick else []
    rows = []
    for flags in TUNE_GRID:
        label = " ".join(flags) or "(defaults)"
        name = "tune_" + ("_".join(flag.lstrip("-") for flag in flags) or "defaults")
        metrics = run(out_dir, name, ["--model", "svdpp", "--split", "u1", "--val_fraction", "0.05", *flags, *epochs],
                      extra)
        rows.append({"flags (vs defaults)": label, "val RMSE": metrics["val/rmse"],
                     "train s": metrics["train_seconds"]})
    return ("## Validation grid (SVD++, 5% of u1.base held out; test folds unused)\n\n"
            + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"))


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="course,folds",
                        help=f"comma-separated stages to run, from {', '.join(STAGES)} (default: course,folds)")
    parser.add_argument("--quick", action="store_true", help="a few epochs per run: checks the pipeline, not results")
    parser.add_argument("--out_dir", default=None,
                        help="where runs, tables and plots go (default: runs/hw0_recsys/experiments[_quick])")
    parser.add_argument("--device", default="auto", help="passed to every run (default: auto)")
    parser.add_argument("--data_dir", default=None, help="passed to every run")
    args = parser.parse_args(argv)
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    out_dir = Path(args.out_dir) if args.out_dir else runs_root() / "hw0_recsys" / (
        "experiments_quick" if args.quick else "experiments")
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = ["--device", args.device] + (["--data_dir", args.data_dir] if args.data_dir else [])
    builders = {"course": course_stage, "folds": folds_stage, "tune": tune_stage}
    sections = [builders[stage](out_dir, extra, args.quick) for stage in stages]
    report = "\n\n".join(sections) + "\n"
    (out_dir / f"results_{'_'.join(stages)}.md").write_text(report)
    print(report)
    print(f"tables and plots in {out_dir}")


if __name__ == "__main__":
    main()
