"""Train a recommender on MovieLens 100K and report ranking (MRR, Recall@10, NDCG@10) and rating
(MSE, RMSE) metrics.

  python hw0_recsys/train.py                                   # course multi-task model, 0.5/0.5
  python hw0_recsys/train.py --factorization_weight 0.99 --regression_weight 0.01
  python hw0_recsys/train.py --no_shared_embeddings            # separate embeddings per task
  python hw0_recsys/train.py --model svdpp --split u1          # SVD++ on the official u1 fold

Each run writes TensorBoard logs, checkpoints and results.json to runs/hw0_recsys/<run name>
(or --log_dir); --resume continues a killed run from its last checkpoint with identical results.
Every flag of a resumed run must equal the run's, except the run length and intervals
(--epochs, --eval_every, --checkpoint_every), --save_predictions, --device and --threads; as
--epochs is part of the run name, extending a run goes through an explicit --log_dir:
  python hw0_recsys/train.py --epochs 5 --log_dir runs/hw0_recsys/mine
  python hw0_recsys/train.py --epochs 10 --log_dir runs/hw0_recsys/mine --resume
A run with --lr_schedule cosine cannot be extended (its rate decays over --epochs, so a longer
run is another schedule): there --epochs must equal the run's too.
The course's flags are accepted as they are: --epochs (also --num_epochs), --shared_embeddings /
--no_shared_embeddings (also --no_embedding_sharing), --logdir (an alias of --log_dir); hparams.json keeps
the names num_epochs, no_embedding_sharing and log_dir, so earlier run folders still resume.
With --val_fraction > 0 a slice of the training ratings is held out and all metrics are computed
on it instead of the test set, so hyper-parameters can be chosen without looking at the test data.
Add --early_stopping to keep, for each task, the model of the epoch it was best at on that slice
(ranking: highest validation MRR; ratings: lowest validation MSE) and report those two models' test
metrics at the end: the multi-task model's tasks peak at different epochs (README).
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.checkpoint import capture_rng_state, restore_rng_state
from common.cli import (
    add_run_args,
    int_list,
    learning_rate,
    non_negative_float,
    non_negative_int,
    positive_int,
    unit_interval,
)
from common.device import autocast, resolve_precision, setup_compute
from common.errors import cli_main
from common.limits import check_fits
from common.run import RunFolder
from common.runlog import RunLogger, build_run_name, resolve_run_dir
from common.seeding import seed_everything
from hw0_recsys.data import SPLIT_CHOICES, VAL_SPLIT_SEED, Ratings, Split, holdout, load_split
from hw0_recsys.evaluate import early_stopped_metrics, evaluate, update_best
from hw0_recsys.predictors import (
    FULL_BATCH_MODELS,
    MODEL_DEFAULTS,
    RATING_MODELS,
    build_model,
    model_args_help,
    model_hparams,
    parse_model_args,
    training_losses,
)

HOMEWORK = "hw0_recsys"
# Flags a --resume may change (besides common.cli.RUN_ONLY_FLAGS): the run length, the intervals and
# whether the final predictions are saved. Every other flag must equal the run's.
RESUMABLE_FLAGS = ("num_epochs", "eval_every", "checkpoint_every", "save_predictions")
FP32_BECAUSE = "hw0's models are small embedding/MLP models; bf16 was not measured faster"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=model_args_help())
    parser.add_argument("--model", choices=("multitask", "svdpp", "autorec", *RATING_MODELS), default="multitask",
                        help="multitask: the course's two-headed model; svdpp: SVD++; autorec: I-AutoRec; "
                             "timebase: baseline with time effects; timesvdpp: timeSVD++; neighbourhood: "
                             "item-item model with learned weights; uautorec: U-AutoRec; kernelnet: "
                             "kernelized autoencoder (GLocal-K's local kernel)")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="random",
                        help="random: 95/5 random split of u.data (the course's); u1..u5/ua/ub: official folds")
    parser.add_argument("--test_fraction", type=unit_interval, default=0.05, help="test share of the random split")
    parser.add_argument("--val_fraction", type=unit_interval, default=0.0,
                        help="if > 0, hold out this share of the training ratings and evaluate on it, not on test")
    parser.add_argument("--early_stopping", action="store_true",
                        help="with --val_fraction: report test metrics of each task's best validation epoch "
                             "(ranking by MRR, ratings by MSE), evaluated every --eval_every epochs")
    parser.add_argument("--embedding_dim", type=positive_int, default=None,
                        help="factors per user/item, or autorec's hidden units (32 | 50 | 300)")
    parser.add_argument("--epochs", "--num_epochs", dest="num_epochs", type=positive_int, default=None,
                        help="passes over the training ratings (multitask 10; svdpp 300, autorec 100 full-batch "
                             "steps); --epochs is the course's name, --num_epochs the same flag")
    parser.add_argument("--batch_size", type=non_negative_int, default=None,
                        help="ratings per step; 0 = full batch (256 | 0)")
    parser.add_argument("--lr", type=learning_rate, default=None, help="Adam learning rate (1e-3 | 0.01 | 0.01)")
    parser.add_argument("--lr_schedule", choices=("constant", "cosine"), default=None,
                        help="constant, or cosine decay to 0 over --num_epochs, which a --resume then cannot "
                             "change (default: cosine for kernelnet, whose full-batch training oscillates at a "
                             "constant rate; constant otherwise)")
    add_model_groups(parser)
    parser.add_argument("--model_arg", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a hyper-parameter of --model {'/'.join(RATING_MODELS)} (repeatable; listed below)")
    parser.add_argument("--save_predictions", action="store_true",
                        help="write the final predicted ratings of the evaluation pairs to predictions.pt (for blends)")
    parser.add_argument("--eval_every", type=positive_int, default=None, help="epochs between evaluations")
    parser.add_argument("--checkpoint_every", type=positive_int, default=None, help="epochs between checkpoints")
    add_run_args(parser, log_dir_aliases=("--logdir",))
    return parser


def add_model_groups(parser: argparse.ArgumentParser) -> None:
    """The flags of one model each: the course's multi-task model, SVD++ and I-AutoRec."""
    mt = parser.add_argument_group("multitask model")
    mt.add_argument("--factorization_weight", type=non_negative_float, default=0.5,
                    help="weight of the interaction (ranking) loss")
    mt.add_argument("--regression_weight", type=non_negative_float, default=0.5, help="weight of the rating loss")
    mt.add_argument("--no_shared_embeddings", "--no_embedding_sharing", dest="no_embedding_sharing",
                    action="store_true", default=False,
                    help="give the rating head its own embeddings (the course's flag; --no_embedding_sharing is "
                         "the same flag)")
    mt.add_argument("--shared_embeddings", dest="no_embedding_sharing", action="store_false", default=False,
                    help="one pair of embeddings for both heads: the default (the course's flag)")
    mt.add_argument("--layer_sizes", type=int_list(1, "96,64"), default=[96, 64], help="MLP widths of the rating head")
    mt.add_argument("--weight_decay", type=non_negative_float, default=0.0, help="Adam L2 weight decay")
    mt.add_argument("--factorization_loss", choices=("course", "bpr", "pointwise"), default="course",
                    help="course: 1 - sigmoid(pos - neg) (the course's and Spotlight's bpr_loss); "
                         "bpr: -log sigmoid(pos - neg) (Rendle's BPR); pointwise: 1 - sigmoid(pos) + sigmoid(neg)")
    sv = parser.add_argument_group("svdpp model")
    sv.add_argument("--factor_reg", type=non_negative_float, default=0.3, help="L2 on p_u and q_i, per rating")
    sv.add_argument("--implicit_reg", type=non_negative_float, default=0.6, help="L2 on y_j, per rating")
    sv.add_argument("--bias_reg", type=non_negative_float, default=0.1, help="L2 on b_u and b_i, per rating")
    sv.add_argument("--reg_exponent", type=non_negative_float, default=0.0,
                    help="a parameter used by n ratings is penalised in proportion to n**exponent (1: as SGD)")
    sv.add_argument("--no_implicit", action="store_true", help="drop the y_j term: plain biased MF")
    sv.add_argument("--implicit_from_test", action="store_true",
                    help="BellKor's transductive N(u): also count the items of the test pairs (their ids, never "
                         "their ratings) as items the user rated, as BellKor used the Netflix qualifying set")
    ar = parser.add_argument_group("autorec model")
    ar.add_argument("--autorec_reg", type=non_negative_float, default=100.0,
                    help="the paper's lambda: L2 on the encoder and decoder weights")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in {"lr_schedule": "constant", **MODEL_DEFAULTS[args.model]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.test_fraction in (0.0, 1.0):
        parser.error(f"--test_fraction must be strictly between 0 and 1, got {args.test_fraction}")
    if args.val_fraction == 1.0:
        parser.error("--val_fraction must be below 1: nothing would be left to train on")
    if args.early_stopping and args.val_fraction == 0:
        parser.error("--early_stopping selects epochs on a validation slice: also pass --val_fraction (e.g. 0.05)")
    if args.implicit_from_test and args.model != "svdpp":
        parser.error("--implicit_from_test only applies to --model svdpp")
    if args.precision == "bf16" and args.model == "svdpp":
        parser.error("--precision bf16: SVD++'s sparse N(u) product (torch.sparse.mm) has no bf16 CPU kernel "
                     "and bf16 was not measured for it elsewhere; train it in fp32")
    if args.model == "multitask" and args.factorization_weight + args.regression_weight == 0:
        parser.error("--factorization_weight and --regression_weight are both 0: nothing would be trained")
    if args.model in RATING_MODELS:
        if args.embedding_dim != MODEL_DEFAULTS[args.model]["embedding_dim"]:
            parser.error(f"--embedding_dim does not apply to --model {args.model}: its sizes are --model_arg "
                         f"hyper-parameters ({', '.join(model_hparams(args.model))})")
        if args.precision == "bf16":
            parser.error(f"--precision bf16 was not measured for --model {args.model}; train it in fp32")
    elif args.model_arg:
        parser.error(f"--model_arg applies to --model {'/'.join(RATING_MODELS)}, not to {args.model}")
    args.model_args = parse_model_args(parser, args.model, args.model_arg) if args.model in RATING_MODELS else {}
    del args.model_arg  # stored parsed, as model_args
    full_batch = args.model in FULL_BATCH_MODELS and args.batch_size == 0
    args.eval_every = args.eval_every or (25 if full_batch else 1)
    args.checkpoint_every = args.checkpoint_every or (25 if full_batch else 1)
    return args


def resumable_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags a --resume may change: not the run length under a cosine schedule, whose rate at
    every epoch depends on it (extending a 4-epoch run to 8 would switch schedules mid-run)."""
    if args.lr_schedule == "cosine":
        return tuple(flag for flag in RESUMABLE_FLAGS if flag != "num_epochs")
    return RESUMABLE_FLAGS


def resolved_precision(requested: str) -> str:
    """The precision a run uses. hw0's ``auto`` is fp32 on every device (``FP32_BECAUSE``), so it is
    known from the flags alone, and ``run_hparams(parse_args(argv))`` equals the stored hparams
    (``experiments.py`` reuses a finished run by that comparison); the device is never consulted."""
    return resolve_precision(requested, torch.device("cpu"), fp32_because=FP32_BECAUSE)[0]


def run_hparams(args: argparse.Namespace) -> dict:
    """Every flag of the run, by name, as hparams.json stores it and ``--resume`` compares it: the
    resolved precision replaces the requested one, and ``--resume`` itself is no property of a run."""
    hparams = {key: value for key, value in vars(args).items() if key != "resume"}
    return {**hparams, "precision": resolved_precision(args.precision)}


def run_name_parts(args: argparse.Namespace) -> dict:
    """The flags that change the result, in the run name's order."""
    common = {"split": args.split, "dim": args.embedding_dim, "ep": args.num_epochs, "bs": args.batch_size,
              "lr": args.lr}
    if args.lr_schedule != "constant":
        common["sched"] = args.lr_schedule
    if args.split == "random":
        common["testfrac"] = args.test_fraction
    if args.val_fraction > 0:
        common["val"] = args.val_fraction
    if args.early_stopping:  # the best epochs are chosen among those evaluated: every --eval_every
        common["es"] = args.eval_every
    if args.model == "multitask":
        specific = {"fw": args.factorization_weight, "rw": args.regression_weight,
                    "share": int(not args.no_embedding_sharing), "mlp": "-".join(map(str, args.layer_sizes)),
                    "wd": args.weight_decay, "floss": args.factorization_loss}
    elif args.model == "svdpp":
        specific = {"freg": args.factor_reg, "yreg": args.implicit_reg, "breg": args.bias_reg,
                    "regexp": args.reg_exponent, "implicit": int(not args.no_implicit)}
        if args.implicit_from_test:
            specific["nutest"] = 1
    elif args.model == "autorec":
        specific = {"reg": args.autorec_reg}
    else:  # only the hyper-parameters set on the command line: hparams.json has them all
        specific = dict(sorted(args.model_args.items()))
        del common["dim"]
    return {**common, **specific, "prec": resolved_precision(args.precision), "seed": args.seed}


def run_name(args: argparse.Namespace) -> str:
    return build_run_name(args.model, run_name_parts(args))


def run_folder(args: argparse.Namespace) -> Path:
    """``--log_dir``, or ``runs/hw0_recsys/<run name>``."""
    return resolve_run_dir(args.log_dir, HOMEWORK, run_name(args))


def train_epoch(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                train: Ratings, generator: torch.Generator, device: torch.device, precision: str) -> dict[str, float]:
    """One pass over the training ratings; returns each loss averaged over the batches (``train/<name>``)."""
    batch_size = args.batch_size or len(train)
    order = torch.randperm(len(train), generator=generator).to(device) if batch_size < len(train) else None
    sums: dict[str, torch.Tensor] = {}
    num_batches = 0
    for start in range(0, len(train), batch_size):
        batch = train if order is None else train.subset(order[start:start + batch_size])
        with autocast(device, precision):  # a no-op unless --precision bf16
            losses = training_losses(args, model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        for key, value in losses.items():
            # Summed as detached fp32 tensors: float() of a tensor that requires grad warns, and a
            # float() per batch would wait for the GPU at every step.
            sums[key] = sums.get(key, 0.0) + value.detach().float()
        num_batches += 1
    return {f"train/{key}": float(total) / num_batches for key, total in sums.items()}


@dataclass
class Training:
    """What a run trains and scores, built before its folder exists: a bad input fails with nothing written."""

    split: Split  # the whole split: early stopping scores its test pairs once, at the end
    train: Ratings  # the ratings trained on (the split's, less the validation slice)
    evaluation: Ratings  # what every evaluation scores: the validation slice, or the test pairs
    eval_name: str  # "val" or "test", the prefix of those metrics
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # data order and negative samples

    def evaluate(self, predictions_path: Path | None = None) -> dict:
        return evaluate(self.model, self.train, self.evaluation, self.split.num_users, self.split.num_items,
                        predictions_path)

    def state(self, best: dict) -> dict:
        """A checkpoint's contents: everything :meth:`restore` needs to continue the run exactly."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "rng": capture_rng_state(), "best": best}

    def restore(self, state: dict) -> tuple[int, dict]:
        """Load a checkpoint; returns its epoch and the early-stopping record."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints from before --lr_schedule: constant rate
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        restore_rng_state(state["rng"])
        return state["step"], state.get("best", {})


def build_training(args: argparse.Namespace, device: torch.device) -> Training:
    """Load the split and build the model and its optimizer, seeded, on ``device``."""
    split = load_split(args.split, args.data_dir, args.test_fraction)
    train, evaluation, eval_name = split.train, split.test, "test"
    if args.val_fraction > 0:
        train, evaluation = holdout(train, args.val_fraction, VAL_SPLIT_SEED)
        eval_name = "val"
    rated = None
    if args.implicit_from_test:
        # Who rated what, over the whole split: ids of the test pairs, never their ratings.
        rated = Ratings(torch.cat([split.train.users, split.test.users]), torch.cat([split.train.items,
                        split.test.items]), torch.zeros(len(split.train) + len(split.test)))
    # Embeddings of every user and item (up to two tables), each weight with its gradient and Adam's two moments.
    check_fits(16 * 2 * (split.num_users + split.num_items) * args.embedding_dim,
               f"--embedding_dim {args.embedding_dim} ({split.num_users} users, {split.num_items} items)",
               "lower --embedding_dim")
    seed_everything(args.seed)
    model = build_model(args, train, split.num_users, split.num_items, rated).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                 weight_decay=args.weight_decay if args.model == "multitask" else 0.0)
    # cosine: the rate of epoch e (0-based) is lr * (1 + cos(pi e / num_epochs)) / 2, down to ~0 at the end
    decay = (lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / args.num_epochs))) if args.lr_schedule == "cosine" \
        else (lambda epoch: 1.0)
    return Training(split, train.to(device), evaluation.to(device), eval_name, model, optimizer,
                    torch.optim.lr_scheduler.LambdaLR(optimizer, decay), torch.Generator().manual_seed(args.seed))


def train_epochs(args: argparse.Namespace, training: Training, run: RunFolder, logger: RunLogger, start_epoch: int,
                 best: dict, device: torch.device, precision: str) -> None:
    """Epochs ``start_epoch + 1 .. --epochs``: train, evaluate every --eval_every epochs (and keep each
    task's best weights under --early_stopping), checkpoint every --checkpoint_every epochs."""
    for epoch in range(start_epoch + 1, args.num_epochs + 1):
        epoch_losses = train_epoch(args, training.model, training.optimizer, training.train, training.generator,
                                   device, precision)
        training.scheduler.step()
        run.check_loss(epoch_losses["train/loss"], epoch)
        logger.log(epoch_losses, epoch)
        if epoch % args.eval_every == 0 or epoch == args.num_epochs:
            metrics = training.evaluate()
            logger.log({f"{training.eval_name}/{key}": value for key, value in metrics.items()}, epoch)
            logger.advance(epoch, loss=epoch_losses["train/loss"], mrr=metrics["mrr"], rmse=metrics["rmse"])
            if args.early_stopping:
                update_best(best, metrics, epoch, training.model)
        else:
            logger.advance(epoch, loss=epoch_losses["train/loss"])
        if epoch % args.checkpoint_every == 0 or epoch == args.num_epochs:
            run.save(epoch, training.state(best), keep_last=2)


def final_results(args: argparse.Namespace, training: Training, best: dict, run_dir: Path,
                  device: torch.device) -> dict:
    """The final model's metrics (and, under --early_stopping, the test metrics of each task's best epoch)."""
    metrics = training.evaluate(run_dir / "predictions.pt" if args.save_predictions else None)
    results = {f"{training.eval_name}/{key}": value for key, value in metrics.items()}
    if args.early_stopping:
        # Ranked among all items the user has not rated: the validation slice's are rated too, so
        # they are left out of the candidates (README: what leaving them in cost).
        split = training.split
        results.update(early_stopped_metrics(training.model, best, split.train.to(device), split.test.to(device),
                                             split.num_users, split.num_items))
    return results


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, precision = setup_compute(args.device, args.precision, args.threads, fp32_because=FP32_BECAUSE)
    # Adam with weight decay drives the moments of rarely used embedding rows into subnormal floats, on
    # which a CPU is many times slower; flushed to zero, the metrics are the same (README).
    torch.set_flush_denormal(True)
    training = build_training(args, device)  # the data and the model first: bad input fails before a run folder
    name, run_dir = run_name(args), run_folder(args)
    with RunFolder.open(run_dir, run_hparams(args), resume=args.resume, resumable=resumable_flags(args),
                        length_flag="num_epochs") as run:
        state = run.resume_state(map_location=device, model=training.model)
        start_epoch, best = training.restore(state) if state is not None else (0, {})
        with run.logger(start_epoch, args.num_epochs, desc=name) as logger:
            logger.write(f"{args.model}: {len(training.train)} training and {len(training.evaluation)} "
                         f"{training.eval_name} ratings on {device}")
            started = time.perf_counter()
            train_epochs(args, training, run, logger, start_epoch, best, device, precision)
            results = final_results(args, training, best, run_dir, device)
            results["train_seconds"] = time.perf_counter() - started  # this session only, if resumed
            logger.finish(results)
            logger.write(" ".join(f"{key}={value:.4f}" for key, value in results.items()) + f"  ({run_dir})")
    return results


if __name__ == "__main__":
    main()
