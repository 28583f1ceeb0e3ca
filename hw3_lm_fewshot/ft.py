"""Few-shot fine-tuning of pre-trained language models: all parameters, two blocks, or LoRA.

    python hw3_lm_fewshot/ft.py --model minilm --dataset amazon --k 1,8,128 --mode all
    python hw3_lm_fewshot/ft.py --model smollm2 --dataset babi --k 0,1,8 --mode lora4

Encoders (and LMs on amazon) get a fresh classification head; causal LMs on xsum/babi are trained
on the prompt + answer text with the loss on the answer tokens only. Modes:
- ``all``: every parameter.
- ``first`` / ``last`` / ``middle``: two transformer blocks (found generically for BERT, GPT-2 and
  Llama-style models); a fresh classification head is trained too, since it starts random.
- ``loraN``: rank-N LoRA adapters (PEFT) on every linear projection inside the transformer blocks
  (attention and MLP), base weights frozen; a classification head is trained too.
Training stops after ``--max_steps`` or once the accuracy on (up to 32 of) the support examples
reaches ``--early_stop_acc`` (for causal LMs: the answer-token accuracy under teacher forcing), as in
the course; ``--min_steps`` delays that check (at k = 1 a 5-example support set passes 0.75 within
5 steps, which says little about the model). A NaN or infinite training loss stops the run with
exit status 2 and no results.json. Runs keep no checkpoints (Ctrl-C saves nothing; rerun instead).

Data-parallel under ``torchrun --nproc_per_node=N hw3_lm_fewshot/ft.py <same flags>``: every rank
draws the same batch and trains on its equal share of it (``--batch_size`` divisible by N), the
gradients are averaged with one all-reduce (``common.distributed``), and the evaluation set is split
across the ranks; rank 0 writes the run folder. The result equals the one-process run's
(tests/test_distributed_hw3.py). torchrun rather than ``accelerate launch``: hw1 and hw2 already
run under it, and one launcher for the whole repository is one thing to learn.
Output: ``runs/hw3_lm_fewshot/<run name>/`` (or ``--log_dir``): hparams.json, TensorBoard, results.json.
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.cli import learning_rate, non_negative_int, positive_int, unit_interval
from common.device import autocast, resolve_device, resolve_precision, setup_compute
from common.distributed import DataParallel, World, leave_after_main
from common.errors import CS330Error, cli_main
from common.memory import peak_memory_mb, reset_peak_memory
from common.run import RunFolder
from common.runlog import RunLogger, build_run_name
from common.seeding import seed_everything
from hw3_lm_fewshot.cli import (
    FP32_BECAUSE,
    add_common_args,
    checked_spec_and_task,
    each_run,
    exits_on_interrupt,
    only_run,
    parse_k_list,
    result_size_parts,
    run_dir_for,
    run_precision,
)
from hw3_lm_fewshot.data import NUM_AMAZON_CLASSES, Example, TaskData, sample_support
from hw3_lm_fewshot.generation import encode_prompt, generate_answers, truncate_left
from hw3_lm_fewshot.metrics import TASK_METRIC, score
from hw3_lm_fewshot.models import ModelSpec, count_parameters, load_model, model_skeleton
from hw3_lm_fewshot.modes import MODE_HELP, apply_mode, check_mode_fits, parse_mode
from hw3_lm_fewshot.prompts import (
    DEFAULT_PROMPT,
    MAX_NEW_TOKENS,
    PROMPTS,
    answer_text,
    build_prompt,
    check_queries_fit,
)
from hw3_lm_fewshot.results import finish_runs


# ---------------------------------------------------------------------------- batches
def classification_batch(tokenizer, examples: list[Example], max_length: int, device) -> dict[str, torch.Tensor]:
    batch = tokenizer([ex.x for ex in examples], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")  # input_ids [B, T]
    batch["labels"] = torch.tensor([int(ex.y) for ex in examples])  # [B]
    return {key: value.to(device) for key, value in batch.items()}


def lm_batch(tokenizer, task: str, prompt: str, examples: list[Example], max_length: int,
             device) -> dict[str, torch.Tensor]:
    """Prompt + answer token ids, right-padded; labels are -100 except on the answer tokens."""
    rows, labels = [], []
    for ex in examples:
        answer_ids = tokenizer(answer_text(task, str(ex.y)))["input_ids"]
        prompt_ids = truncate_left(tokenizer(build_prompt(task, prompt, [], ex.x))["input_ids"],
                                   max(1, max_length - len(answer_ids)), what="training prompt")
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # [B, T]
    label_ids = torch.full((len(rows), width), -100)  # [B, T]
    attention = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, :len(row)] = torch.tensor(row)
        label_ids[i, :len(row)] = torch.tensor(label)
        attention[i, :len(row)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": label_ids.to(device)}


@torch.inference_mode()
def support_accuracy(model, batch: dict[str, torch.Tensor], classifier: bool, precision: str = "fp32") -> float:
    """Classification accuracy, or the answer-token accuracy under teacher forcing."""
    model.eval()
    with autocast(batch["input_ids"].device, precision):
        logits = model(**batch).logits
    model.train()
    if classifier:
        return (logits.argmax(-1) == batch["labels"]).float().mean().item()
    predicted = logits[:, :-1].argmax(-1)  # [B, T-1]: token t+1 predicted at t
    target = batch["labels"][:, 1:]
    mask = target != -100
    return (predicted[mask] == target[mask]).float().mean().item()


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], classifier: bool,
               parallel: DataParallel) -> torch.Tensor:
    """The loss of this rank's share of a batch, scaled so that the ranks' gradients averaged by
    ``DataParallel.sync`` are the gradient of the whole batch's loss.

    Classification: a mean over examples, and the shares are equal, so the mean of the ranks' means is
    the whole batch's mean. A causal LM's loss is a mean over answer tokens, whose count differs
    between shares: each rank divides its token-loss sum by the whole batch's count over N instead.
    """
    if classifier or not parallel.world.enabled:
        return model(**batch).loss
    answer_tokens = (batch["labels"][:, 1:] != -100).sum().float()  # the tokens the loss is taken over
    torch.distributed.all_reduce(answer_tokens)  # the whole batch's count
    return model(**batch, num_items_in_batch=answer_tokens / parallel.world.world_size).loss


def check_finite_loss(value: float, step: int, k: int, mode: str, seed: int, lr: float,
                      parallel: DataParallel) -> None:
    """Stop the run at the first NaN/inf loss. hw3 keeps no checkpoints, so unlike
    :func:`common.checkpoint.ensure_finite` the message offers no ``--resume``. Every rank sees the
    same (averaged) loss; rank 0 prints the error and the others leave quietly after it."""
    if not math.isfinite(value):
        if not parallel.is_main:
            leave_after_main(2)
        raise CS330Error(f"the training loss became {value} at step {step} (k={k}, mode {mode}, seed {seed}); "
                         f"the run stopped and nothing was saved. Lower --lr (it was {lr:g}) or check the data, "
                         "then rerun")


# ---------------------------------------------------------------------------- one run
@dataclass
class Training:
    """What fine-tuning on one support set did: its steps, the last support accuracy checked, the
    training tokens this rank read (padding excluded) and the seconds of the loop."""

    steps: int = 0
    support_acc: float = float("nan")
    tokens: int = 0
    seconds: float = 0.0


def batch_maker(tokenizer, task: str, args: argparse.Namespace,
                device: torch.device) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    """Examples -> a batch on ``device``: a classification batch (amazon) or prompt + answer ids."""
    if task == "amazon":
        return lambda examples: classification_batch(tokenizer, examples, args.max_length, device)
    return lambda examples: lm_batch(tokenizer, task, args.prompt_format, examples, args.max_length, device)


def train_on_support(model: nn.Module, make_batch, support: list[Example], k: int, seed: int,
                     args: argparse.Namespace, precision: str, classifier: bool, logger: RunLogger | None,
                     parallel: DataParallel) -> Training:
    """AdamW on shuffled batches of ``support`` until ``--max_steps`` or until the support accuracy,
    checked every ``--eval_every`` steps from ``--min_steps`` on, reaches ``--early_stop_acc``."""
    start, steps, support_acc, tokens = time.time(), 0, float("nan"), 0
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable_params, lr=args.lr)
    rng = np.random.default_rng(seed)
    check_batch = make_batch([support[i] for i in rng.permutation(len(support))[:32]])
    order: list[int] = []
    model.train()
    for steps in range(1, args.max_steps + 1):
        if len(order) < args.batch_size:  # reshuffle once the epoch runs out
            order += rng.permutation(len(support)).tolist()
        batch_ids, order = order[:args.batch_size], order[args.batch_size:]
        batch = make_batch([support[i] for i in parallel.my_share(batch_ids)])  # this rank's examples
        tokens += int(batch["attention_mask"].sum())
        with autocast(parallel.device, precision):
            loss = batch_loss(model, batch, classifier, parallel)
        loss_value = parallel.mean({"loss": loss})["loss"]  # the whole batch's loss
        check_finite_loss(loss_value, steps, k, args.mode, seed, args.lr, parallel)  # before the update it would poison
        loss.backward()
        parallel.sync(trainable_params)  # the whole batch's gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if logger is not None:
            logger.log({f"train/loss_k{k}_{args.mode}_s{seed}": loss_value}, steps)
        if steps % args.eval_every == 0 or steps == args.max_steps:
            # every rank checks the same examples with the same weights, so all stop at the same step
            support_acc = support_accuracy(model, check_batch, classifier, precision)
            if steps >= args.min_steps and support_acc >= args.early_stop_acc:
                break
    return Training(steps, support_acc, tokens, time.time() - start)


@torch.inference_mode()
def predict(model: nn.Module, tokenizer, task: TaskData, make_batch, args: argparse.Namespace, precision: str,
            parallel: DataParallel) -> list:
    """The predictions for the whole evaluation set, in its order (each rank scores its share)."""
    model.eval()
    my_eval = task.eval[parallel.my_portion(len(task.eval))]
    with autocast(parallel.device, precision):
        if task.name == "amazon":
            predictions = []
            for i in range(0, len(my_eval), args.batch_size):
                predictions += model(**make_batch(my_eval[i:i + args.batch_size])).logits.argmax(-1).tolist()
        else:
            max_new = MAX_NEW_TOKENS[task.name]
            queries = [encode_prompt(tokenizer, model, build_prompt(task.name, args.prompt_format, [], ex.x),
                                     max_new, args.max_context) for ex in my_eval]
            predictions = generate_answers(model, tokenizer, queries, max_new, args.batch_size)
    return parallel.gather(predictions)  # rank order is evaluation-set order


def run_ft(spec: ModelSpec, task: TaskData, k: int, seed: int, args: argparse.Namespace,
           logger: RunLogger | None = None, parallel: DataParallel | None = None) -> dict:
    """Fine-tune a fresh copy of the model (``--mode``) on k support examples, then score it on the
    evaluation set. ``args`` comes from :func:`parse_args`.

    Under torchrun (``parallel``) each rank trains on its share of every batch and scores its share of
    the evaluation set; every rank returns the same result.
    """
    start = time.time()
    parallel = parallel or DataParallel(World(device=resolve_device(args.device)))  # one process
    reset_peak_memory(parallel.device)
    precision, _ = resolve_precision(args.precision, parallel.device, fp32_because=FP32_BECAUSE)  # main prints why
    classifier = task.name == "amazon"
    support = sample_support(task, k, seed)
    seed_everything(seed)  # the fresh head and the batch order depend on it
    model, tokenizer = load_model(spec, classifier, NUM_AMAZON_CLASSES)
    model = apply_mode(model, args.mode, classifier).to(parallel.device)
    trainable, total = count_parameters(model)
    make_batch = batch_maker(tokenizer, task.name, args, parallel.device)
    training = (train_on_support(model, make_batch, support, k, seed, args, precision, classifier, logger, parallel)
                if support else Training())  # k = 0: the pre-trained model as it is
    predictions = predict(model, tokenizer, task, make_batch, args, precision, parallel)
    references = [ex.y for ex in task.eval]
    return {
        "method": "ft", "mode": args.mode, "k": k, "seed": seed, "metric": TASK_METRIC[task.name],
        "score": score(task.name, predictions, references), "trainable_params": trainable, "total_params": total,
        "steps": training.steps, "support_acc": training.support_acc, "seconds": time.time() - start,
        "train_seconds": training.seconds,
        "train_tokens_per_s": training.tokens * parallel.world.world_size / max(training.seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(parallel.device),
        "examples": [{"prediction": p, "reference": r} for p, r in list(zip(predictions, references))[:3]],
    }


# ---------------------------------------------------------------------------- flags and main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, task="ft")
    parser.add_argument("--k", type=parse_k_list, default=[1, 8, 128],
                        help="support sizes, comma-separated (amazon: per class) (default: 1,8,128)")
    parser.add_argument("--mode", default="all",
                        help=f"what to train: {MODE_HELP}; comma-separated for one run per mode, as in the course "
                             "(default: all)")
    parser.add_argument("--prompt_format", default=None, choices=PROMPTS,
                        help="the one text format causal LMs are trained and scored in (icl.py's --prompt "
                             "takes a list of them) (default: qa for babi, tldr for xsum)")
    parser.add_argument("--lr", type=learning_rate, default=None,
                        help="learning rate (default: 1e-4, or 1e-3 for LoRA)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="examples per step (default: 8)")
    parser.add_argument("--max_steps", type=positive_int, default=100, help="step limit per run (default: 100)")
    parser.add_argument("--eval_every", type=positive_int, default=5,
                        help="steps between early-stopping checks (default: 5)")
    parser.add_argument("--min_steps", type=non_negative_int, default=0,
                        help="no early stop before this many steps; set it to --max_steps for a fixed "
                             "number of steps (default: 0, the course's rule)")
    parser.add_argument("--early_stop_acc", type=unit_interval, default=0.75,
                        help="stop once the support accuracy reaches this (default: 0.75)")
    parser.add_argument("--max_length", type=positive_int, default=256,
                        help="token limit per training example; amazon inputs are cut at 100 tokens at most, as "
                             "in the course (default: 256)")
    return parser


def parse_runs(argv: list[str] | None = None) -> list[argparse.Namespace]:
    """The flags of every run the command line asks for (the course's comma-separated ``--dataset``,
    ``--model`` and ``--mode``: one run per combination, in the course's order), with every default
    that depends on another flag resolved here (and nowhere later)."""
    runs = each_run(build_parser().parse_args(argv), ("dataset", "model", "mode"))
    for args in runs:
        kind, _ = parse_mode(args.mode)
        amazon = args.dataset == "amazon"
        args.model = args.model or ("minilm" if amazon else "smollm2")
        args.lr = args.lr or (1e-3 if kind == "lora" else 1e-4)
        args.max_length = min(args.max_length, 100) if amazon else args.max_length
        args.prompt_format = args.prompt_format or DEFAULT_PROMPT.get(args.dataset)  # None: amazon reads no prompt
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of a command line that asks for one run (:func:`parse_runs`)."""
    return only_run(parse_runs(argv))


def run_name(args: argparse.Namespace, precision: str | None = None) -> str:
    """Every flag that changes the result (all but common.cli.RUN_ONLY_FLAGS: device, threads and
    folders), the resolved precision included (resolved here when not given)."""
    precision = precision or run_precision(args)
    parts = {"model": args.model, "data": args.dataset, "mode": args.mode, "k": "-".join(map(str, args.k)),
             "lr": args.lr, "bs": args.batch_size, "steps": args.max_steps, "every": args.eval_every,
             "min": args.min_steps, "stop": args.early_stop_acc, "len": args.max_length}
    if args.dataset != "amazon":  # the classifier reads no prompt format
        parts["prompt"] = args.prompt_format
    return build_run_name("ft", {**parts, **result_size_parts(args), "prec": precision, "seed": args.seed})


def run_folder(args: argparse.Namespace, precision: str | None = None) -> Path:
    return run_dir_for(args, run_name(args, precision))


def load_inputs(args: argparse.Namespace) -> tuple[ModelSpec, TaskData]:
    """The model spec and the task data, with every support size and the model load checked."""
    spec, task = checked_spec_and_task(args)
    check_mode_fits(model_skeleton(spec, args.dataset == "amazon"), args.mode)  # the config alone, no weights
    model, tokenizer = load_model(spec, args.dataset == "amazon", NUM_AMAZON_CLASSES)  # each run loads a fresh copy
    if args.dataset != "amazon":  # the evaluation generates after each bare query
        check_queries_fit(tokenizer, model, task, args.prompt_format, args.max_context)
    return spec, task


def fine_tune(args: argparse.Namespace, spec: ModelSpec, task: TaskData, precision: str,
              parallel: DataParallel) -> list[dict]:
    """One run: every k and seed of ``args`` in its run folder; the results of each."""
    run_dir = run_folder(args, precision)
    results = []
    hparams = {**vars(args), "precision": precision}
    run = parallel.open_run(lambda: RunFolder.open(run_dir, hparams))
    with run, run.logger(total_steps=len(args.k) * args.repeats, desc="ft") as logger:
        for k in args.k:
            for repeat in range(args.repeats):
                results.append(run_ft(spec, task, k, args.seed + repeat, args, logger, parallel))
                logger.advance(len(results), score=results[-1]["score"])
        if parallel.is_main:
            finish_runs(logger, results, task, run_dir)
    return results


@cli_main
@exits_on_interrupt
def main(argv: list[str] | None = None) -> list[dict]:
    runs = parse_runs(argv)
    flags = runs[0]  # the run flags (device, precision, threads, batch size) are the same in every run
    device, precision = setup_compute(flags.device, flags.precision, flags.threads, fp32_because=FP32_BECAUSE)
    parallel = DataParallel.join(device, flags.batch_size)  # torchrun's group; one process: nothing
    # everything that can fail before training fails here, for every run, before a run folder exists
    # (rank 0 says why; the other ranks then leave quietly, else they repeat it)
    inputs = [parallel.main_first(lambda args=args: load_inputs(args)) for args in runs]
    results = [result for args, (spec, task) in zip(runs, inputs)
               for result in fine_tune(args, spec, task, precision, parallel)]
    parallel.close()
    return results


if __name__ == "__main__":
    main()
