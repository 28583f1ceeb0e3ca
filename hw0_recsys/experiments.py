"""The homework's experiments, each a set of ``train.py`` runs, summarised as markdown tables and PNG plots.

  python hw0_recsys/experiments.py --preset cpu --dry_run      # what would run, and what is done
  python hw0_recsys/experiments.py --preset cpu                # course grid + 5-fold table, about an hour
  python hw0_recsys/experiments.py --stages tune               # the validation grid behind the SVD++ defaults
  python hw0_recsys/experiments.py --stages blend              # every predictor and the BellKor blend, 5 folds
  python hw0_recsys/experiments.py --quick                     # a few epochs of everything (--preset smoke)

Stages (``--stages``):
* course: the multi-task model on the course's 95/5 random split, shared vs separate embeddings x loss
  weights (factorization, regression) = (0.99, 0.01), (0.5, 0.5), Adam lr 1e-3, the course's 200
  epochs, 3 seeds; plus the fixes for the overfitting of long runs on the best setting (shared,
  0.99/0.01), 3 seeds each: Adam weight decay 1e-5 and 1e-4, and per-task early stopping on a 5%
  validation slice of the training ratings (``--early_stopping``). Test MRR, Recall@10,
  NDCG@10 and MSE, mean ± std over seeds.
* folds: SVD++, SVD++ with the transductive N(u) (``--implicit_from_test``), biased MF (SVD++ without
  y_j), I-AutoRec, the time models, the neighbourhood model, U-AutoRec, the kernel autoencoder, and
  the blend ``w * AutoRec + (1 - w) * SVD++`` on the official folds u1..u5; test RMSE per fold, mean
  and 95% interval, training time per fold (a blend's is the sum of its runs).
* blend: the folds stage plus BellKor's blend of every deployable predictor (all but the transductive
  N(u)): each is also trained without a probe slice (``PROBE_FRACTION`` of the training fold), a ridge
  regression from the probe predictions to the probe ratings is fitted (``blend.py``), and applied to
  the test predictions of the runs on the whole fold. The test ratings are never read to fit it.
* tune: SVD++ and AutoRec variants scored on a 10% validation slice of u1.base, and the blend weight w
  that minimises the validation RMSE of the default SVD++ and AutoRec runs (the test folds are never
  used); the folds stage runs the two default runs too, to get w.

Presets: ``cpu`` is the same grid as ``course`` (the course's 200 epochs, evaluated every 10), which
a CPU runs in reasonable time (README, "Run times"). ``smoke`` (``--quick``) trains 2 / 25 epochs per
run. Every run is ``hw0_recsys/train.py`` in ``runs/hw0_recsys/experiments/<preset>/<name>`` (see
common/grid.py: finished runs are reused, killed ones resumed).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib
import pandas as pd
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.errors import CS330Error, cli_main  # noqa: E402
from common.grid import Config, grid_parser, lookup, ran_with, run_experiments, save_figure  # noqa: E402
from common.readback import describe, read_torch  # noqa: E402
from common.runlog import scalar_curve  # noqa: E402
from common.stats import mean_ci95  # noqa: E402
from hw0_recsys.blend import blend_fold, stacked_predictions  # noqa: E402
from hw0_recsys.data import load_split  # noqa: E402
from hw0_recsys.metrics import rating_metrics  # noqa: E402

HOMEWORK = "hw0_recsys"
TRAIN = "hw0_recsys.train"
STAGES = ("course", "folds", "blend", "tune")
COURSE_GRID = [  # (label, flags): shared vs separate embeddings x loss weights, as in the course
    ("fw0.99_rw0.01_shared", ["--factorization_weight", "0.99", "--regression_weight", "0.01"]),
    ("fw0.5_rw0.5_shared", ["--factorization_weight", "0.5", "--regression_weight", "0.5"]),
    ("fw0.99_rw0.01_separate", ["--factorization_weight", "0.99", "--regression_weight", "0.01",
                                "--no_embedding_sharing"]),
    ("fw0.5_rw0.5_separate", ["--factorization_weight", "0.5", "--regression_weight", "0.5",
                              "--no_embedding_sharing"]),
]
COURSE_LR = "0.001"
EARLY_STOPPING_VAL = "0.05"  # share of the training ratings held out to choose each task's epoch
PRESETS = {  # multi-task epochs and evaluation period, seeds, weight decays; epochs of the fold/tune runs
    "smoke": {"epochs": 2, "eval_every": 1, "seeds": (0,), "weight_decays": ("1e-4",), "fold_epochs": 25},
    "cpu": {"epochs": 200, "eval_every": 10, "seeds": (0, 1, 2), "weight_decays": ("1e-5", "1e-4"),
            "fold_epochs": None},
    "course": {"epochs": 200, "eval_every": 10, "seeds": (0, 1, 2), "weight_decays": ("1e-5", "1e-4"),
               "fold_epochs": None},
}
FOLDS = ("u1", "u2", "u3", "u4", "u5")
FOLD_MODELS = [  # (label, flags); every run saves its test predictions for the blend
    ("SVD++", ["--model", "svdpp"]),
    ("SVD++ N(u) with test ids", ["--model", "svdpp", "--implicit_from_test"]),
    ("biased MF", ["--model", "svdpp", "--no_implicit"]),
    ("I-AutoRec", ["--model", "autorec"]),
    ("time baseline", ["--model", "timebase"]),
    ("timeSVD++", ["--model", "timesvdpp"]),
    ("item-item neighbourhood", ["--model", "neighbourhood"]),
    ("U-AutoRec", ["--model", "uautorec"]),
    ("kernel AutoRec", ["--model", "kernelnet"]),
]
# BellKor's blend takes every predictor a deployed recommender could use: not the transductive N(u)
BELLKOR_MODELS = [(label, flags) for label, flags in FOLD_MODELS if "--implicit_from_test" not in flags]
PROBE_FRACTION = "0.1"  # of each training fold, held out to fit the blend (the tune stage's slice size)
BLEND = ("SVD++", "I-AutoRec")  # blended as w * second + (1 - w) * first, w chosen on validation
BLEND_WEIGHTS = [round(0.1 * step, 1) for step in range(11)]
VAL_FRACTION = "0.1"
TUNE_GRID = [  # flags varied around each model's defaults; the first of each model feeds the blend
    ["--model", "svdpp"], ["--model", "svdpp", "--implicit_reg", "0.3"], ["--model", "svdpp", "--no_implicit"],
    ["--model", "autorec"], ["--model", "autorec", "--embedding_dim", "500"],
    ["--model", "autorec", "--autorec_reg", "30"], ["--model", "autorec", "--autorec_reg", "300"],
    ["--model", "autorec", "--num_epochs", "150"],
]


# ---------------------------------------------------------------------------- configurations
def course_configs(sizes: dict) -> list[Config]:
    length = ["--num_epochs", str(sizes["epochs"]), "--eval_every", str(sizes["eval_every"]),
              "--checkpoint_every", str(sizes["eval_every"]), "--lr", COURSE_LR]
    runs = [(label, flags, "0", seed) for label, flags in COURSE_GRID for seed in sizes["seeds"]]
    # the fix, on the one setting worth fixing (shared, 0.99/0.01: the best MRR and MSE), seeded like the grid
    label, flags = COURSE_GRID[0]
    runs += [(label, flags, wd, seed) for wd in sizes["weight_decays"] for seed in sizes["seeds"]]
    configs = [Config(f"course_{label}" + (f"_wd{wd}" if wd != "0" else "") + f"_seed{seed}", TRAIN,
                      [*flags, *length, "--weight_decay", wd, "--seed", str(seed)],
                      tags={"setting": label + (f" wd{wd}" if wd != "0" else "")})
               for label, flags, wd, seed in runs]
    return configs + [Config(f"course_{label}_es_seed{seed}", TRAIN,
                             [*flags, *length, "--weight_decay", "0", "--seed", str(seed),
                              "--val_fraction", EARLY_STOPPING_VAL, "--early_stopping"],
                             tags={"setting": label + " early stopping"}) for seed in sizes["seeds"]]


def fold_name(label: str, fold: str) -> str:
    return "folds_" + "".join(ch if ch.isalnum() else "_" for ch in label.replace("+", "p")) + "_" + fold


def tune_name(flags: list[str]) -> str:
    return "tune_" + "_".join(flag.lstrip("-") for flag in flags)


def epochs(sizes: dict) -> list[str]:
    return ["--num_epochs", str(sizes["fold_epochs"])] if sizes["fold_epochs"] else []


def fold_configs(sizes: dict) -> list[Config]:
    return [Config(fold_name(label, fold), TRAIN, [*flags, "--split", fold, "--save_predictions", *epochs(sizes)])
            for label, flags in FOLD_MODELS for fold in FOLDS]


def probe_name(label: str, fold: str) -> str:
    return "probe" + fold_name(label, fold).removeprefix("folds")


def probe_configs(sizes: dict) -> list[Config]:
    """Each blended predictor trained without the probe slice, predicting it (``predictions.pt``)."""
    return [Config(probe_name(label, fold), TRAIN, [*flags, "--split", fold, "--val_fraction", PROBE_FRACTION,
                                                    "--save_predictions", *epochs(sizes)])
            for label, flags in BELLKOR_MODELS for fold in FOLDS]


def tune_configs(sizes: dict, flag_sets: list[list[str]] = TUNE_GRID) -> list[Config]:
    return [Config(tune_name(flags), TRAIN, [*flags, "--split", "u1", "--val_fraction", VAL_FRACTION,
                                             "--save_predictions", *epochs(sizes)])
            for flags in flag_sets]


def blend_flag_sets() -> list[list[str]]:
    """The tune runs whose validation predictions choose the blend weight: each blended model's defaults."""
    return [["--model", "svdpp"], ["--model", "autorec"]]


def configs(stages: list[str], preset: str) -> list[Config]:
    sizes = PRESETS[preset]
    grid: list[Config] = []
    if "course" in stages:
        grid += course_configs(sizes)
    if "folds" in stages or "blend" in stages:
        grid += tune_configs(sizes, blend_flag_sets()) + fold_configs(sizes)
    if "blend" in stages:
        grid += probe_configs(sizes)
    if "tune" in stages:
        grid += tune_configs(sizes)
    return grid


# ---------------------------------------------------------------------------- tables and plots
PREDICTION_FIELDS = ("users", "items", "ratings", "predicted")


def predictions(frame: pd.DataFrame, name: str) -> dict[str, torch.Tensor] | None:
    """The saved predictions of run ``name`` (``train.py --save_predictions``), or None when it has none."""
    run_dir = lookup(frame, name, "run_dir")
    path = None if run_dir is None else Path(run_dir) / "predictions.pt"
    if path is None or not path.exists():
        return None
    fix = f"delete {run_dir} to run {name} again"
    saved = read_torch(path, fix)
    fields = saved if isinstance(saved, dict) else {}
    if not all(isinstance(fields.get(key), torch.Tensor) for key in PREDICTION_FIELDS):
        raise CS330Error(f"{path}: holds {describe(saved)}, not the tensors {', '.join(PREDICTION_FIELDS)}; {fix}")
    if len({fields[key].shape for key in PREDICTION_FIELDS}) != 1:
        raise CS330Error(f"{path}: its tensors differ in shape; {fix}")
    return saved


def blended_rmse(first: dict, second: dict, weight: float) -> float:
    """RMSE of ``weight * second + (1 - weight) * first`` (same evaluation pairs in the same order)."""
    both = stacked_predictions([first, second], first["users"], first["items"])  # [R, 2], pairs checked
    return rating_metrics(weight * both[:, 1] + (1 - weight) * both[:, 0], first["ratings"])["rmse"]


def blend_weight(frame: pd.DataFrame) -> tuple[float | None, dict[float, float]]:
    """The blend weight with the lowest RMSE on the validation slice of u1.base, and every weight's RMSE."""
    first, second = (predictions(frame, tune_name(flags)) for flags in blend_flag_sets())
    if first is None or second is None:
        return None, {}
    scores = {weight: blended_rmse(first, second, weight) for weight in BLEND_WEIGHTS}
    return min(scores, key=scores.get), scores


def course_section(frame: pd.DataFrame, sizes: dict, out: Path) -> str:
    columns = {"MRR": "test/mrr", "Recall@10": "test/recall@10", "NDCG@10": "test/ndcg@10", "MSE": "test/mse",
               "train s": "train_seconds"}
    runs = frame[frame["name"].str.startswith("course_")] if "setting" in frame else frame.iloc[:0]
    if runs.empty:
        return "## Course grid\n\nno finished runs"
    table = runs.groupby("setting", sort=False)[list(columns.values())].agg(["mean", "std", "count"])

    def cell(setting: str, key: str) -> str:
        mean, std, count = (table.loc[setting, (key, stat)] for stat in ("mean", "std", "count"))
        return f"{mean:.4f}" + (f" ± {std:.4f}" if count > 1 else "")

    rows = [{"setting": setting, "seeds": int(table.loc[setting, ("test/mrr", "count")]),
             **{label: cell(setting, key) for label, key in columns.items() if key != "train_seconds"},
             "train s": table.loc[setting, ("train_seconds", "mean")]} for setting in table.index]
    curves = {key: {setting: mean_curve(runs[runs["setting"] == setting]["run_dir"], key) for setting in table.index}
              for key in ("test/mrr", "test/mse")}
    for row in rows:  # the best evaluated epoch of the mean curve: where the rating head stops improving
        mse, mrr = curves["test/mse"][row["setting"]], curves["test/mrr"][row["setting"]]
        row["best MSE (epoch)"] = f"{mse.min():.4f} ({mse.idxmin()})" if len(mse) else "-"
        row["best MRR (epoch)"] = f"{mrr.max():.4f} ({mrr.idxmax()})" if len(mrr) else "-"
        chosen = runs[runs["setting"] == row["setting"]]
        row["epochs chosen on val (MRR; MSE)"] = "; ".join(
            ",".join(str(int(e)) for e in chosen[f"best_epoch/{m}"]) for m in ("mrr", "mse")
        ) if "best_epoch/mrr" in chosen and chosen["best_epoch/mrr"].notna().all() else "-"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, (label, key) in zip(axes, (("MRR", "test/mrr"), ("MSE", "test/mse"))):
        for setting, curve in curves[key].items():
            axis.plot(curve.index, curve.values, marker=".", label=setting)
        axis.set(xlabel="epoch", ylabel=f"test {label} (mean over seeds)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    # The runs' own length and rate (results.json), not the preset's: finished runs may be of another one.
    epochs, lr = (ran_with(frame, runs["name"], flag, planned) for flag, planned in (
        ("num_epochs", sizes["epochs"]), ("lr", float(COURSE_LR))))
    fig.suptitle(f"Multi-task model on the 95/5 random split of ml-100k, {epochs} epochs, lr {lr}")
    save_figure(fig, out / "course_grid.png")
    return (f"## Course grid (multi-task model, random 95/5 split, {epochs} epochs, lr {lr}; "
            "final values mean ± std over seeds; best = best evaluated epoch of the mean curve; "
            "wd = Adam weight decay; early stopping: test metrics of the epochs chosen on a validation slice)\n\n"
            + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f"))


def mean_curve(run_dirs: Iterable[Path], tag: str) -> pd.Series:
    """The mean over runs of a TensorBoard scalar, by step (evaluated epochs)."""
    frame = pd.DataFrame({str(run_dir): pd.Series(scalar_curve(run_dir, tag), dtype=float) for run_dir in run_dirs})
    return frame.mean(axis=1).sort_index()


def bellkor_blends(frame: pd.DataFrame, data_dir: str | None) -> tuple[list[dict], str]:
    """Rows of the 5-fold table for BellKor's blend (folds whose runs are all finished), and tables of
    each fold's chosen blend with its weights, and of the blend without each predictor in turn."""
    labels = [label for label, _ in BELLKOR_MODELS]
    rows, weights, without = [], [], {label: {} for label in labels}
    for fold in FOLDS:
        probe_runs = [predictions(frame, probe_name(label, fold)) for label in labels]
        full_runs = [predictions(frame, fold_name(label, fold)) for label in labels]
        if any(run is None for run in probe_runs + full_runs):
            continue
        split = load_split(fold, data_dir)
        blend, blended = blend_fold(probe_runs, full_runs, split, float(PROBE_FRACTION))
        test_ratings = full_runs[0]["ratings"]  # scoring only: blend_fold never reads them
        seconds = [lookup(frame, fold_name(label, fold), "train_seconds") for label in labels]
        probe_seconds = [lookup(frame, probe_name(label, fold), "train_seconds") for label in labels]
        rows.append({"model": f"BellKor blend ({len(labels)} predictors, ridge)", "fold": fold,
                     "RMSE": rating_metrics(blended, test_ratings)["rmse"],
                     "train s": sum(seconds) + sum(probe_seconds)})
        # the predictors' own coefficients (columns 1..M); with meta-features each also has support terms
        weights.append({"fold": fold, "meta-features": blend.meta, "ridge": blend.ridge,
                        "probe CV RMSE": blend.cv_rmse[(blend.meta, blend.ridge)],
                        "train s (whole fold; probe runs)": f"{sum(seconds):.0f}; {sum(probe_seconds):.0f}",
                        "intercept": float(blend.weights[0]),
                        **{label: float(w) for label, w in zip(labels, blend.weights[1:1 + len(labels)])}})
        for left_out, label in enumerate(labels):  # what each predictor adds: the blend without it
            keep = [k for k in range(len(labels)) if k != left_out]
            _, rest = blend_fold([probe_runs[k] for k in keep], [full_runs[k] for k in keep], split,
                                 float(PROBE_FRACTION))
            without[label][fold] = rating_metrics(rest, test_ratings)["rmse"]
    if not weights:
        return rows, "not finished"
    full = pd.Series({row["fold"]: row["RMSE"] for row in rows})
    loo = pd.DataFrame(without).T  # [predictor, fold]
    loo["mean"] = loo.mean(axis=1)
    loo["mean change vs all"] = loo["mean"] - full.mean()
    return rows, (pd.DataFrame(weights).to_markdown(index=False, floatfmt=".3f")
                  + "\n\nThe blend without each predictor (test RMSE; change > 0: the predictor helps):\n\n"
                  + loo.rename_axis("left out").to_markdown(floatfmt=".4f"))


def folds_section(frame: pd.DataFrame, out: Path, data_dir: str | None = None, bellkor: bool = False) -> str:
    weight, _ = blend_weight(frame)
    rows = [{"model": label, "fold": fold, "RMSE": lookup(frame, fold_name(label, fold), "test/rmse"),
             "train s": lookup(frame, fold_name(label, fold), "train_seconds")}
            for label, _ in FOLD_MODELS for fold in FOLDS]
    if weight is not None:
        for fold in FOLDS:
            first, second = (predictions(frame, fold_name(label, fold)) for label in BLEND)
            if first is not None and second is not None:
                seconds = sum(lookup(frame, fold_name(label, fold), "train_seconds") for label in BLEND)
                rows.append({"model": f"blend {1 - weight:.1f} {BLEND[0]} + {weight:.1f} {BLEND[1]}", "fold": fold,
                             "RMSE": blended_rmse(first, second, weight), "train s": seconds})
    blend_rows, weights_table = bellkor_blends(frame, data_dir) if bellkor else ([], "")
    frame = pd.DataFrame(rows + blend_rows).dropna(subset=["RMSE"])
    if frame.empty:
        return "## 5-fold RMSE\n\nno finished runs"
    labels = list(dict.fromkeys(frame["model"]))
    table = frame.pivot(index="model", columns="fold", values="RMSE").reindex(index=labels, columns=list(FOLDS))
    summary = []
    for label in labels:
        mean, half_width = mean_ci95(table.loc[label].dropna().to_numpy())
        summary.append({"model": label, **table.loc[label].to_dict(), "mean RMSE": mean, "95% CI +-": half_width,
                        "max train s per fold": frame[frame["model"] == label]["train s"].max()})
    fig, axis = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(labels)
    for index, label in enumerate(labels):
        axis.bar([position + index * width for position in range(len(FOLDS))], table.loc[label], width, label=label,
                 color=plt.cm.tab20(index % 20))  # the default cycle has 10 colours: two bars would share one
    axis.set_xticks([position + width * (len(labels) - 1) / 2 for position in range(len(FOLDS))], FOLDS)
    axis.axhline(0.8889, color="black", linestyle="--", linewidth=1, label="GLocal-K u1 0.8889")
    axis.set_ylim(0.85, float(table.max().max()) + 0.02)
    axis.set_ylabel("test RMSE")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, out / "folds_rmse.png")
    text = ("## 5-fold RMSE on the official u1..u5 folds (a blend's train s: all its runs, probe runs included)\n\n"
            + pd.DataFrame(summary).to_markdown(index=False, floatfmt=".4f"))
    if bellkor:
        text += (f"\n\n## BellKor blend per fold ({PROBE_FRACTION} of each training fold as probe; settings "
                 "chosen by 5-fold cross-validation on the probe)\n\n" + weights_table)
    return text


def tune_section(frame: pd.DataFrame) -> str:
    rows = [{"flags": " ".join(flags), "val RMSE": lookup(frame, tune_name(flags), "val/rmse"),
             "train s": lookup(frame, tune_name(flags), "train_seconds")} for flags in TUNE_GRID]
    weight, scores = blend_weight(frame)
    blend_rows = [{"w (AutoRec share)": w, "val RMSE": rmse} for w, rmse in scores.items()]
    return (f"## Validation grid ({VAL_FRACTION} of u1.base held out; test folds unused)\n\n"
            + pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f")
            + f"\n\n## Blend weight on the same validation slice (chosen: w = {weight})\n\n"
            + (pd.DataFrame(blend_rows).to_markdown(index=False, floatfmt=".4f") if blend_rows else "not finished"))


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = grid_parser(__doc__, presets=tuple(PRESETS))
    parser.add_argument("--stages", default="course,folds",
                        help=f"comma-separated stages to run, from {', '.join(STAGES)} (default: course,folds)")
    args = parser.parse_args(argv)
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")

    def report(frame: pd.DataFrame, out: Path) -> str:
        sections = {"course": lambda: course_section(frame, PRESETS[args.preset], out),
                    "folds": lambda: folds_section(frame, out, args.data_dir),
                    "blend": lambda: folds_section(frame, out, args.data_dir, bellkor=True),
                    "tune": lambda: tune_section(frame)}
        shown = [stage for stage in stages if not (stage == "folds" and "blend" in stages)]  # blend has folds' table
        return "\n\n".join(sections[stage]() for stage in shown)

    run_experiments(args, HOMEWORK, configs(stages, args.preset), report)


if __name__ == "__main__":
    main()
