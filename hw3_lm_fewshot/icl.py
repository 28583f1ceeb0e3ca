"""In-context learning: k solved examples in the prompt, then the model's answer for the query.

    python hw3_lm_fewshot/icl.py --model smollm2 --dataset babi --k 0,1,4 --prompt qa
    python hw3_lm_fewshot/icl.py --model smollm2 --dataset xsum --k 0,1,4 --prompt tldr,custom
    python hw3_lm_fewshot/icl.py --dataset amazon --k 0,1,4 --support fixed --orderings 5

Support examples are drawn from the pool with the seed: a new draw per evaluation example
(``--support per_query``), or one set per seed shared by every query (``--support fixed``: read
once into a KV cache, then each query costs only its own tokens; ``--orderings N`` scores N
orderings of it; the course's starter code draws one set per repeat and shuffles its order for
each query). xsum / babi: greedy decoding with the KV cache, in
left-padded batches, stopping at the end of the first sentence or after the task's token limit
(bAbI 6, XSum 30). amazon: the most likely label of " 1" .. " 5" after "Stars:" (one forward pass,
nothing generated). A per-query prompt longer than the model's context (or ``--max_context``) loses
tokens on the left, with a warning; a fixed prefix that does not fit stops with an error. See
prompts.py for the formats.
Nothing is trained, so nothing is checkpointed: results.json is written at the end (Ctrl-C saves
nothing). Output: ``runs/hw3_lm_fewshot/<run name>/`` (or ``--log_dir``).
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import time
from pathlib import Path

import torch

from common.cli import positive_int
from common.device import autocast, setup_compute
from common.errors import CS330Error, cli_main
from common.memory import peak_memory_mb, reset_peak_memory
from common.run import RunFolder
from common.runlog import build_run_name
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
from hw3_lm_fewshot.data import TaskData, sample_support
from hw3_lm_fewshot.generation import generate_answers, next_token_logits, prefix_cache
from hw3_lm_fewshot.metrics import TASK_METRIC, score
from hw3_lm_fewshot.models import ModelSpec, load_model, model_skeleton
from hw3_lm_fewshot.prompts import (
    MAX_NEW_TOKENS,
    PROMPTS,
    check_icl_task,
    check_prompt,
    check_queries_fit,
    encode_queries,
    label_candidates,
    ordered_support,
    prompt_prefix,
    query_ids,
    task_labels,
)
from hw3_lm_fewshot.results import finish_runs

CONTENT_FREE = "N/A"  # Zhao et al. 2021's content-free input


def check_calibrate(dataset: str, fixed_support: bool) -> None:
    """Calibration scores labels (amazon, babi) against one content-free read per prompt (a fixed support set)."""
    if dataset not in ("amazon", "babi") or not fixed_support:
        raise CS330Error("--calibrate scores labels under one prompt per support set: it needs --support fixed and "
                         f"--dataset amazon or babi (got {'fixed' if fixed_support else 'per_query'}, {dataset})")


def contextual_calibration(label_probs: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """Zhao et al. 2021: each row of label probabilities [N, C] divided by the probabilities the same
    prompt gives a content-free input [C], then renormalised. A label the prompt favours whatever
    the input says (SmolLM2 on amazon: one label for every review) loses that advantage."""
    calibrated = label_probs / content_free
    return calibrated / calibrated.sum(-1, keepdim=True)


def label_probabilities(model, tokenizer, task: TaskData, labels: list, queries: list[list[int]],
                        prefix_ids: list[int], cache, batch_size: int) -> torch.Tensor:
    """[N, C]: the probability of each label after each query, renormalised over the labels."""
    shared, candidates = label_candidates(tokenizer, task.name, labels)
    rows = []
    for i in range(0, len(queries), batch_size):
        logits = next_token_logits(model, tokenizer, [q + shared for q in queries[i:i + batch_size]], prefix_ids,
                                   cache)  # [B, V]
        rows.append(logits[:, candidates].softmax(-1))
    return torch.cat(rows)


def score_labels(model, tokenizer, task: TaskData, k: int, prompt: str, seed: int, ordering: int,
                 queries: list[list[int]], prefix_ids: list[int], cache, batch_size: int,
                 calibrate: bool) -> tuple[list, dict]:
    """The most likely label for each query (divided by the content-free input's when ``calibrate``),
    and what the result records about it."""
    labels = task_labels(task)
    probs = label_probabilities(model, tokenizer, task, labels, queries, prefix_ids, cache, batch_size)  # [N, C]
    chosen = probs.argmax(-1).tolist()
    extra = {"labels": labels, "predicted_label_counts": [chosen.count(c) for c in range(len(labels))]}
    if calibrate:
        prefix = prompt_prefix(task.name, prompt, ordered_support(task, k, seed, ordering))
        free = [query_ids(tokenizer, task.name, prompt, CONTENT_FREE, prefix)]
        content_free = label_probabilities(model, tokenizer, task, labels, free, prefix_ids, cache, 1)[0]  # [C]
        extra.update(content_free_probs=content_free.tolist(),
                     uncalibrated_label_counts=extra["predicted_label_counts"],
                     uncalibrated_score=score(task.name, [labels[c] for c in chosen], [ex.y for ex in task.eval]))
        chosen = contextual_calibration(probs, content_free).argmax(-1).tolist()
        extra["predicted_label_counts"] = [chosen.count(c) for c in range(len(labels))]
    return [labels[c] for c in chosen], extra


def run_icl(model, tokenizer, task: TaskData, k: int, prompt: str, seed: int, max_context: int | None = None,
            precision: str = "fp32", fixed_support: bool = False, ordering: int = 0, batch_size: int = 8,
            calibrate: bool = False) -> dict:
    """Score the model on the evaluation set with k in-context examples per query.

    ``fixed_support``: one support set per seed (in its ``ordering``), read once into a KV cache and
    shared by every query; else a fresh draw per query. Amazon's label is the
    most likely of " 1" .. " 5"; xsum and babi answers are greedy first sentences, or with
    ``calibrate`` (amazon and babi, fixed support) the most likely label after contextual calibration.
    bf16 autocast when ``precision`` is "bf16".
    """
    start = time.time()
    device = next(model.parameters()).device
    reset_peak_memory(device)
    check_prompt(prompt)
    by_label = task.name == "amazon" or calibrate
    if calibrate:
        check_calibrate(task.name, fixed_support)
    sample_support(task, k, seed)  # a clear error now if k does not fit the pool
    prefix_ids, queries, truncated = encode_queries(tokenizer, model, task, k, prompt, seed, fixed_support,
                                                    ordering, max_context)
    extra: dict = {}
    with autocast(device, precision):
        cache = prefix_cache(model, prefix_ids)
        if by_label:
            predictions, extra = score_labels(model, tokenizer, task, k, prompt, seed, ordering, queries, prefix_ids,
                                              cache, batch_size, calibrate)
        else:
            predictions = generate_answers(model, tokenizer, queries, MAX_NEW_TOKENS[task.name], batch_size,
                                           prefix_ids, cache)
    references = [ex.y for ex in task.eval]
    seconds = time.time() - start
    read = len(prefix_ids) + sum(len(q) for q in queries)  # prompt tokens the model read
    # the answers re-tokenized (the stop token and stripped spaces are not counted)
    generated = 0 if by_label else sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions)
    return {
        "method": "icl", "prompt": prompt + ("+calibrated" if calibrate else ""), "k": k, "seed": seed,
        "ordering": ordering, "support": "fixed" if fixed_support else "per_query", "metric": TASK_METRIC[task.name],
        "score": score(task.name, predictions, references), "truncated_prompts": truncated, "seconds": seconds,
        "prompt_tokens": read, "generated_tokens": generated, "tokens_per_s": (read + generated) / max(seconds, 1e-9),
        "trainable_params": 0, "peak_memory_mb": peak_memory_mb(device),
        "examples": [{"prediction": p, "reference": r} for p, r in list(zip(predictions, references))[:3]],
        **extra,  # label scoring: the labels and how often each was chosen (a label bias shows at a glance)
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, task="icl")
    parser.set_defaults(dataset="babi")
    parser.add_argument("--k", type=parse_k_list, default=[0, 1, 4],
                        help="in-context examples per query, comma-separated (default: 0,1,4)")
    parser.add_argument("--prompt", type=prompt_list, default=["qa"],
                        help=f"prompt formats, comma-separated (the course's), from {', '.join(PROMPTS)} "
                             "(default: qa; amazon has only qa)")
    parser.add_argument("--support", default="per_query", choices=("per_query", "fixed"),
                        help="per_query: a fresh support draw for every question; fixed: one support set per "
                             "seed, shared by every question and read once (KV cache), as fine-tuning trains on "
                             "one support set per seed (the course draws one set per repeat and shuffles it for "
                             "each question) (default: per_query)")
    parser.add_argument("--orderings", type=positive_int, default=1,
                        help="with --support fixed: also score N-1 seeded permutations of each support set "
                             "(prompt-order sensitivity) (default: 1)")
    parser.add_argument("--batch_size", type=positive_int, default=8,
                        help="queries per forward pass (left-padded; greedy answers as one at a time) (default: 8)")
    parser.add_argument("--calibrate", action="store_true",
                        help="contextual calibration (Zhao et al. 2021), amazon and babi with --support fixed: "
                             "choose the label (amazon: stars, babi: the places of the pool) whose probability, "
                             f"divided by its probability for the content-free input {CONTENT_FREE!r} under the same "
                             "prompt, is largest; results.json keeps the uncalibrated score beside it")
    return parser


def prompt_list(text: str) -> list[str]:
    """``--prompt qa,tldr`` -> ``["qa", "tldr"]``, each a known format."""
    try:
        return [check_prompt(part.strip()) for part in text.split(",")]
    except CS330Error as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_runs(argv: list[str] | None = None) -> list[argparse.Namespace]:
    """The flags of every run the command line asks for (the course's comma-separated ``--model`` and
    ``--dataset``: one run per combination, in the course's order; the prompts and k of a run share
    its folder), checked against each other, the default model resolved here (and nothing later)."""
    runs = each_run(build_parser().parse_args(argv), ("model", "dataset"))
    for args in runs:
        for prompt in args.prompt:
            check_icl_task(args.dataset, prompt)
        if args.orderings > 1 and args.support != "fixed":
            raise CS330Error("--orderings permutes a fixed support set: add --support fixed")
        if args.calibrate:
            check_calibrate(args.dataset, args.support == "fixed")
        args.model = args.model or "smollm2"
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags of a command line that asks for one run (:func:`parse_runs`)."""
    return only_run(parse_runs(argv))


def run_name(args: argparse.Namespace, precision: str | None = None) -> str:
    """Every flag that changes the result (all but common.cli.RUN_ONLY_FLAGS and ``--batch_size``,
    whose batches give the answers of one query at a time), the resolved precision included
    (resolved here when not given)."""
    precision = precision or run_precision(args)
    parts = {"model": args.model, "data": args.dataset, "prompt": "-".join(args.prompt),
             "k": "-".join(map(str, args.k)), "support": args.support, "orders": args.orderings}
    return build_run_name("icl", {**parts, **result_size_parts(args), "prec": precision, "seed": args.seed}
                          | ({"calib": 1} if args.calibrate else {}))


def run_folder(args: argparse.Namespace, precision: str | None = None) -> Path:
    return run_dir_for(args, run_name(args, precision))


def checked_inputs(args: argparse.Namespace) -> tuple[ModelSpec, TaskData]:
    """The model spec (a causal LM, from its config alone) and the task data, every k checked."""
    spec, task = checked_spec_and_task(args)
    model_skeleton(spec, classifier=False)  # a causal LM? from the config alone, before any weights
    return spec, task


def evaluate_in_context(args: argparse.Namespace, spec: ModelSpec, task: TaskData, device: torch.device,
                        precision: str) -> list[dict]:
    """One run: every prompt, k, seed and ordering of ``args`` in its run folder; the results of each."""
    seed_everything(args.seed)
    model, tokenizer = load_model(spec, classifier=False)
    model.to(device).eval()
    for prompt in args.prompt:  # before the run folder exists
        check_queries_fit(tokenizer, model, task, prompt, args.max_context)
    run_dir = run_folder(args, precision)
    results = []
    total = len(args.k) * len(args.prompt) * args.repeats * args.orderings
    with RunFolder.open(run_dir, {**vars(args), "precision": precision}) as run, \
            run.logger(total_steps=total, desc="icl") as logger, torch.inference_mode():
        for prompt in args.prompt:
            for k in args.k:
                for repeat in range(args.repeats):
                    for ordering in range(args.orderings):
                        results.append(run_icl(model, tokenizer, task, k, prompt, args.seed + repeat,
                                               args.max_context, precision, fixed_support=args.support == "fixed",
                                               ordering=ordering, batch_size=args.batch_size,
                                               calibrate=args.calibrate))
                        logger.advance(len(results), score=results[-1]["score"])
        return finish_runs(logger, results, task, run_dir)


@cli_main
@exits_on_interrupt
def main(argv: list[str] | None = None) -> list[dict]:
    runs = parse_runs(argv)
    flags = runs[0]  # the run flags (device, precision, threads) are the same in every run
    device, precision = setup_compute(flags.device, flags.precision, flags.threads, fp32_because=FP32_BECAUSE)
    # what can fail before the evaluation fails here, for every run, before a run folder exists
    inputs = [checked_inputs(args) for args in runs]
    return [result for args, (spec, task) in zip(runs, inputs)
            for result in evaluate_in_context(args, spec, task, device, precision)]


if __name__ == "__main__":
    main()
