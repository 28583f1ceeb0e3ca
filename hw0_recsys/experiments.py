"""The homework's experiments, each a set of ``train.py`` runs, summarised as markdown tables and PNG plots.

  python hw0_recsys/experiments.py                    # course grid + 5-fold u1..u5 RMSE
  python hw0_recsys/experiments.py --stages tune      # the validation grid behind the SVD++ defaults
  python hw0_recsys/experiments.py --quick            # a few epochs of everything, to check the pipeline

* course: the multi-task model on the course's 95/5 random split, shared vs separate embeddings x loss
  weights (factorization, regression) = (0.99, 0.01), (0.5, 0.5), at Adam lr 1e-3 (the course's) and
  1e-2; test MRR, Recall@10, NDCG@10 and MSE.
* folds: SVD++, SVD++ with the transductive N(u) (``--implicit_from_test``), biased MF (SVD++ without
  y_j), I-AutoRec, and the blend ``w * AutoRec + (1 - w) * SVD++`` on the official folds u1..u5; test
  RMSE per fold, mean and 95% interval, training time per fold (a blend's is the sum of its two runs).
* tune: SVD++ and AutoRec variants scored on a 10% validation slice of u1.base, and the blend weight w
  that minimises the validation RMSE of the default SVD++ and AutoRec runs (the test folds are never
  used); the folds stage runs it first, to get w.

Finished runs (results.json present with the same flags) are reused, so an interrupted sweep
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from common.errors import cli_main  # noqa: E402
from common.runlog import runs_root  # noqa: E402
from common.stats import mean_ci95  # noqa: E402
from hw0_recsys import train as train_script  # noqa: E402
from hw0_recsys.metrics import rating_metrics  # noqa: E402

STAGES = ("course", "folds", "tune")
COURSE_GRID = [  # (label, flags): shared vs separate embeddings x loss weights, as in the course
    ("fw0.99 rw0.01 shared", ["--factorization_weight", "0.99", "--regression_weight", "0.01"]),
    ("fw0.5 rw0.5 shared", ["--factorization_weight", "0.5", "--regression_weight", "0.5"]),
    ("fw0.99 rw0.01 separate", ["--factorization_weight", "0.99", "--regression_weight", "0.01",
                                "--no_embedding_sharing"]),
    ("fw0.5 rw0.5 separate", ["--factorization_weight", "0.5", "--regression_weight", "0.5",
                              "--no_embedding_sharing"]),
]
# The course's Adam lr 1e-3, and 1e-2, which gave a higher MRR on a validation slice of the training
# data (lr and epochs were compared with --val_fraction 0.05, never on the test set; see README).
COURSE_LRS = ("0.001", "0.01")
FOLDS = ("u1", "u2", "u3", "u4", "u5")
FOLD_MODELS = [  # (label, flags); every run saves its test predictions for the blend
    ("SVD++", ["--model", "svdpp"]),
    ("SVD++ N(u) with test ids", ["--model", "svdpp", "--implicit_from_test"]),
    ("biased MF", ["--model", "svdpp", "--no_implicit"]),
    ("I-AutoRec", ["--model", "autorec"]),
]
BLEND = ("SVD++", "I-AutoRec")  # blended as w * second + (1 - w) * first, w chosen on validation
BLEND_WEIGHTS = [round(0.1 * step, 1) for step in range(11)]
VAL_FRACTION = "0.1"
TUNE_GRID = [  # flags varied around each model's defaults; the first of each model feeds the blend
    ["--model", "svdpp"], ["--model", "svdpp", "--implicit_reg", "0.3"], ["--model", "svdpp", "--no_implicit"],
    ["--model", "autorec"], ["--model", "autorec", "--embedding_dim", "500"],
    ["--model", "autorec", "--autorec_reg", "30"], ["--model", "autorec", "--autorec_reg", "300"],
    ["--model", "autorec", "--num_epochs", "150"],
]


def run(out_dir: Path, name: str, flags: list[str], extra: list[str]) -> dict:
    """One training run in ``out_dir/name``; reuses its results.json if the flags match."""
    run_dir = out_dir / name
    argv = [*flags, *extra, "--log_dir", str(run_dir), "--save_predictions"]
    expected = {"model": train_script.parse_args(argv).model, **train_script.run_hparams(train_script.parse_args(argv))}
    results_path = run_dir / "results.json"
    if results_path.exists():
        saved = json.loads(results_path.read_text())
        if saved["hparams"] == json.loads(json.dumps(expected)) and (run_dir / "predictions.pt").exists():
            return saved["metrics"]
    if (run_dir / "checkpoints").is_dir():
        argv.append("--resume")
    return train_script.main(argv)


def load_predictions(out_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(out_dir / name / "predictions.pt", weights_only=True)


def blended_rmse(first: dict, second: dict, weight: float) -> float:
    """RMSE of ``weight * second + (1 - weight) * first`` (same evaluation pairs in the same order)."""
    if not (torch.equal(first["users"], second["users"]) and torch.equal(first["items"], second["items"])):
        raise RuntimeError("blended runs were evaluated on different pairs")
    blend = weight * second["predicted"] + (1 - weight) * first["predicted"]
    return rating_metrics(blend, first["ratings"])["rmse"]


def course_stage(out_dir: Path, extra: list[str], quick: bool) -> str:
    epochs = ["--num_epochs", "2"] if quick else []
    rows = []
    for lr in COURSE_LRS:
        for label, flags in COURSE_GRID:
            metrics = run(out_dir, f"course_lr{lr}_" + label.replace(" ", "_"), [*flags, "--lr", lr, *epochs], extra)
            rows.append({"run": f"lr{lr} {label}", "MRR": metrics["test/mrr"], "Recall@10": metrics["test/recall@10"],
                         "NDCG@10": metrics["test/ndcg@10"], "MSE": metrics["test/mse"],
                         "train s": metrics["train_seconds"]})
    table = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for axis, column in zip(axes, ("MRR", "MSE")):
        axis.barh(table["run"], table[column])
        axis.set_xlabel(f"test {column}")
    axes[1].set_yticks([])
    fig.suptitle("Multi-task model on the 95/5 random split of ml-100k")
    fig.tight_layout()
    fig.savefig(out_dir / "course_grid.png", dpi=120)
    plt.close(fig)
    return "## Course grid (multi-task model, random 95/5 split)\n\n" + table.to_markdown(index=False, floatfmt=".4f")


def fold_run_name(label: str, fold: str) -> str:
    return "folds_" + "".join(ch if ch.isalnum() else "_" for ch in label.replace("+", "p")) + "_" + fold


def folds_stage(out_dir: Path, extra: list[str], quick: bool) -> str:
    epochs = ["--num_epochs", "25"] if quick else []
    weight, _ = blend_weight(out_dir, extra, quick)
    rows = []
    for label, flags in FOLD_MODELS:
        for fold in FOLDS:
            metrics = run(out_dir, fold_run_name(label, fold), flags + ["--split", fold] + epochs, extra)
            rows.append({"model": label, "fold": fold, "RMSE": metrics["test/rmse"],
                         "train s": metrics["train_seconds"]})
    seconds = {(row["model"], row["fold"]): row["train s"] for row in rows}
    blend_label = f"blend {1 - weight:.1f} {BLEND[0]} + {weight:.1f} {BLEND[1]}"
    for fold in FOLDS:
        first, second = (load_predictions(out_dir, fold_run_name(label, fold)) for label in BLEND)
        rows.append({"model": blend_label, "fold": fold, "RMSE": blended_rmse(first, second, weight),
                     "train s": seconds[(BLEND[0], fold)] + seconds[(BLEND[1], fold)]})
    frame = pd.DataFrame(rows)
    labels = list(dict.fromkeys(frame["model"]))
    table = frame.pivot(index="model", columns="fold", values="RMSE")
    summary = []
    for label in labels:
        mean, half_width = mean_ci95(table.loc[label].to_numpy())
        summary.append({"model": label, **table.loc[label].to_dict(), "mean RMSE": mean, "95% CI +-": half_width,
                        "max train s per fold": frame[frame["model"] == label]["train s"].max()})
    fig, axis = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        axis.bar([position + index * width for position in range(len(FOLDS))], table.loc[label, list(FOLDS)], width,
                 label=label)
    axis.set_xticks([position + width * (len(labels) - 1) / 2 for position in range(len(FOLDS))], FOLDS)
    axis.axhline(0.905, color="black", linestyle="--", linewidth=1, label="target 0.905")
    axis.set_ylim(0.85, float(table.to_numpy().max()) + 0.02)
    axis.set_ylabel("test RMSE")
    axis.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "folds_rmse.png", dpi=120)
    plt.close(fig)
    return ("## 5-fold RMSE on the official u1..u5 folds\n\n"
            + pd.DataFrame(summary).to_markdown(index=False, floatfmt=".4f"))


def tune_name(flags: list[str]) -> str:
    return "tune_" + "_".join(flag.lstrip("-") for flag in flags)


def tune_run(out_dir: Path, flags: list[str], extra: list[str], quick: bool) -> dict:
    epochs = ["--num_epochs", "25"] if quick else []
    return run(out_dir, tune_name(flags), [*flags, "--split", "u1", "--val_fraction", VAL_FRACTION, *epochs], extra)


def blend_weight(out_dir: Path, extra: list[str], quick: bool) -> tuple[float, dict[float, float]]:
    """The blend weight with the lowest RMSE on the validation slice of u1.base, and every weight's RMSE."""
    first_flags, second_flags = (next(flags for flags in TUNE_GRID if flags == ["--model", model])
                                 for model in ("svdpp", "autorec"))
    for flags in (first_flags, second_flags):
        tune_run(out_dir, flags, extra, quick)
    first, second = (load_predictions(out_dir, tune_name(flags)) for flags in (first_flags, second_flags))
    scores = {weight: blended_rmse(first, second, weight) for weight in BLEND_WEIGHTS}
    return min(scores, key=scores.get), scores


def tune_stage(out_dir: Path, extra: list[str], quick: bool) -> str:
    rows = []
    for flags in TUNE_GRID:
        metrics = tune_run(out_dir, flags, extra, quick)
        rows.append({"flags": " ".join(flags), "val RMSE": metrics["val/rmse"], "train s": metrics["train_seconds"]})
    weight, scores = blend_weight(out_dir, extra, quick)
    blend_rows = [{"w (AutoRec share)": w, "val RMSE": rmse} for w, rmse in scores.items()]
    return (f"## Validation grid ({VAL_FRACTION} of u1.base held out; test folds unused)\n\n"
            + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f")
            + f"\n\n## Blend weight on the same validation slice (chosen: w = {weight})\n\n"
            + pd.DataFrame(blend_rows).to_markdown(index=False, floatfmt=".4f"))


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
