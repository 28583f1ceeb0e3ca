"""What differs by ``--model``: the models train.py can train, their defaults, their ``--model_arg``
hyper-parameters, how each is built from the flags, and the loss each minimises."""

from __future__ import annotations

import argparse
import inspect

import torch
import torch.nn.functional as F

from hw0_recsys.autoencoders import ItemAutoRec, KernelAutoRec, UserAutoRec
from hw0_recsys.data import Ratings
from hw0_recsys.models import MultiTaskNet
from hw0_recsys.neighbourhood import ItemNeighbourhood
from hw0_recsys.svdpp import SVDPlusPlus, TimeBaseline, TimeSVDPlusPlus

# Flags left unset take the default of the chosen model.
MODEL_DEFAULTS = {
    "multitask": {"embedding_dim": 32, "num_epochs": 10, "batch_size": 256, "lr": 1e-3},
    # Chosen on a validation slice of u1.base (see README), never on a test fold.
    "svdpp": {"embedding_dim": 50, "num_epochs": 300, "batch_size": 0, "lr": 0.01},
    "autorec": {"embedding_dim": 300, "num_epochs": 100, "batch_size": 0, "lr": 0.01},
}
# The blend's other predictors (issue 15). Each has predict(Ratings), all_scores() and penalty(); its
# hyper-parameters are its constructor's keyword arguments, set with --model_arg NAME=VALUE, and their
# defaults were chosen on a validation slice of u1.base (README).
RATING_MODELS = {"timebase": TimeBaseline, "timesvdpp": TimeSVDPlusPlus, "neighbourhood": ItemNeighbourhood,
                 "uautorec": UserAutoRec, "kernelnet": KernelAutoRec}
MODEL_DEFAULTS.update({  # run length and Adam rate of each (--embedding_dim does not apply: see --model_arg)
    "timebase": {"embedding_dim": 0, "num_epochs": 300, "batch_size": 0, "lr": 0.01},
    "timesvdpp": {"embedding_dim": 0, "num_epochs": 300, "batch_size": 0, "lr": 0.01},
    "neighbourhood": {"embedding_dim": 0, "num_epochs": 100, "batch_size": 0, "lr": 0.02},
    "uautorec": {"embedding_dim": 0, "num_epochs": 100, "batch_size": 0, "lr": 0.01},
    "kernelnet": {"embedding_dim": 0, "num_epochs": 400, "batch_size": 0, "lr": 0.03, "lr_schedule": "cosine"},
})
FULL_BATCH_MODELS = ("svdpp", "autorec", *RATING_MODELS)


def model_hparams(model: str) -> dict[str, object]:
    """The keyword arguments of a rating model's constructor, with their defaults."""
    signature = inspect.signature(RATING_MODELS[model].__init__)
    return {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def model_args_help() -> str:
    lines = ["--model_arg hyper-parameters (defaults chosen on a validation slice of u1.base):"]
    lines += [f"  {model}: " + ", ".join(f"{name}={value}" for name, value in model_hparams(model).items())
              for model in RATING_MODELS]
    return "\n".join(lines)


def parse_model_args(parser: argparse.ArgumentParser, model: str, pairs: list[str]) -> dict[str, object]:
    """``["hidden_size=500", ...]`` -> ``{"hidden_size": 500}``, typed like each default; a name the
    model does not take, or a value of the wrong type, is a parse error naming the choices."""
    known, parsed = model_hparams(model), {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals or name not in known:
            parser.error(f"--model_arg {pair!r}: expected NAME=VALUE with NAME one of {', '.join(known)} "
                         f"(--model {model})")
        kind = type(known[name])
        try:
            value = {bool: lambda t: {"true": True, "false": False}[t.lower()]}.get(kind, kind)(text)
        except (KeyError, ValueError):
            parser.error(f"--model_arg {pair!r}: {name} must be of type {kind.__name__} (default {known[name]})")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < float("inf"):
            parser.error(f"--model_arg {pair!r}: {name} must be a finite number >= 0")
        parsed[name] = value
    return parsed


def build_model(args: argparse.Namespace, train: Ratings, num_users: int, num_items: int,
                rated: Ratings | None = None) -> torch.nn.Module:
    """``rated``: the (user, item) pairs that make up SVD++'s N(u); the training pairs when None."""
    if args.model == "multitask":
        return MultiTaskNet(num_users, num_items, args.embedding_dim, args.layer_sizes,
                            embedding_sharing=not args.no_embedding_sharing)
    if args.model in RATING_MODELS:
        return RATING_MODELS[args.model](num_users, num_items, train, **args.model_args)
    if args.model == "autorec":
        return ItemAutoRec(num_users, num_items, args.embedding_dim, train.users, train.items, train.ratings)
    rated = rated or train
    model = SVDPlusPlus(num_users, num_items, args.embedding_dim, rated.users, rated.items,
                        float(train.ratings.mean()), reg_exponent=args.reg_exponent, implicit=not args.no_implicit)
    if rated is not train:  # the L2 weights must still count training ratings only
        plain = SVDPlusPlus(num_users, num_items, 1, train.users, train.items, 0.0,
                            reg_exponent=args.reg_exponent, implicit=False)
        for name in ("user_weights", "item_weights", "implicit_weights"):
            getattr(model, name).copy_(getattr(plain, name))
    return model


def training_losses(args: argparse.Namespace, model: torch.nn.Module, batch: Ratings,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The losses of one step; ``loss`` is what is minimised."""
    if args.model != "multitask":  # a rating model: squared error over the batch plus its L2 penalty
        regression = (model.predict(batch) - batch.ratings).square().mean()
        if args.model == "autorec":
            penalty = model.penalty(args.autorec_reg)
        elif args.model == "svdpp":
            penalty = model.penalty(args.factor_reg, args.bias_reg, args.implicit_reg)
        else:
            penalty = model.penalty()
        return {"loss": regression + penalty, "regression_loss": regression}
    # One uniformly drawn negative item per positive, as Spotlight's pointwise loss does.
    negatives = torch.randint(model.item_biases.num_embeddings, (len(batch),), generator=generator)
    positive_logits, predicted_ratings = model(batch.users, batch.items)
    negative_logits, _ = model(batch.users, negatives.to(batch.users.device))
    if args.factorization_loss == "course":
        factorization = (1.0 - torch.sigmoid(positive_logits - negative_logits)).mean()
    elif args.factorization_loss == "bpr":
        factorization = -F.logsigmoid(positive_logits - negative_logits).mean()
    else:
        factorization = ((1.0 - torch.sigmoid(positive_logits)) + torch.sigmoid(negative_logits)).mean()
    regression = F.mse_loss(predicted_ratings, batch.ratings)
    loss = args.factorization_weight * factorization + args.regression_weight * regression
    return {"loss": loss, "factorization_loss": factorization, "regression_loss": regression}
