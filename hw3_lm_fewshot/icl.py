"""In-context learning: k solved examples in the prompt, then greedy generation for the query.

    python hw3_lm_fewshot/icl.py --model smollm2 --dataset babi --k 0,1,4 --prompt qa
    python hw3_lm_fewshot/icl.py --model smollm2 --dataset xsum --k 0,1,4 --prompt tldr,custom

Support examples are drawn from the pool with the seed (a new draw per evaluation example, as in
the course). Decoding is greedy with the KV cache and stops at the end of the first sentence or
after the task's token limit (bAbI 6, XSum 30). A prompt longer than the model's context (or
``--max_context``) loses tokens on the left, with a warning. See prompts.py for the formats.
Nothing is trained, so nothing is checkpointed: results.json is written at the end (Ctrl-C saves
nothing). Output: ``runs/hw3_lm_fewshot/<run name>/`` (or ``--log_dir``).
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import random
import time
import warnings

import torch

from common.device import autocast, setup_compute
from common.errors import cli_main
from common.run import RunFolder
from common.runlog import build_run_name
from common.seeding import seed_everything
from hw3_lm_fewshot.cli import (
    FP32_BECAUSE,
    add_common_args,
    exits_on_interrupt,
    finish_runs,
    load_model,
    parse_k_list,
    run_dir_for,
)
from hw3_lm_fewshot.data import TaskData, load_task, sample_support
from hw3_lm_fewshot.generation import PromptTruncatedWarning, generate_greedy
from hw3_lm_fewshot.metrics import TASK_METRIC, score
from hw3_lm_fewshot.models import resolve_model
from hw3_lm_fewshot.prompts import MAX_NEW_TOKENS, PROMPTS, build_prompt, check_generation_task, check_prompt


def run_icl(model, tokenizer, task: TaskData, k: int, prompt: str, seed: int, max_context: int | None = None,
            precision: str = "fp32") -> dict:
    """Score the model on the evaluation set with k in-context examples per query (bf16 autocast
    when ``precision`` is "bf16")."""
    start = time.time()
    device = next(model.parameters()).device
    check_prompt(prompt)
    sample_support(task, k, seed)  # a clear error now if k does not fit the pool
    rng = random.Random(seed)
    predictions, truncated = [], 0
    for ex in task.eval:
        support = sample_support(task, k, rng.randrange(2**31))
        text = build_prompt(task.name, prompt, support, ex.x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            with autocast(device, precision):
                predictions.append(generate_greedy(model, tokenizer, text, MAX_NEW_TOKENS[task.name], max_context))
        for warning in caught:  # count, and pass the warning on so it is never silent
            truncated += 1
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    references = [ex.y for ex in task.eval]
    seconds = time.time() - start
    # the answers re-tokenized (the stop token and stripped spaces are not counted); the time includes prefill
    generated = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions)
    return {
        "method": "icl", "prompt": prompt, "k": k, "seed": seed, "metric": TASK_METRIC[task.name],
        "score": score(task.name, predictions, references), "truncated_prompts": truncated,
        "seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / max(seconds, 1e-9),
        "examples": [{"prediction": p, "reference": r} for p, r in list(zip(predictions, references))[:3]],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.set_defaults(dataset="babi")
    parser.add_argument("--k", type=parse_k_list, default=[0, 1, 4],
                        help="in-context examples per query, comma-separated (default: 0,1,4)")
    parser.add_argument("--prompt", default="qa",
                        help=f"prompt formats, comma-separated, from {', '.join(PROMPTS)} (default: qa)")
    return parser


@cli_main
@exits_on_interrupt
def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    prompts = [check_prompt(p.strip()) for p in args.prompt.split(",")]
    check_generation_task(args.dataset)
    device, args.precision = setup_compute(args.device, args.precision, args.threads, fp32_because=FP32_BECAUSE)
    # everything that can fail before the evaluation fails here, before a run folder exists
    spec = resolve_model(args.model or "smollm2")
    task = load_task(args.dataset, seed=args.seed, n_eval=args.n_eval, data_dir=args.data_dir)
    for k in args.k:
        sample_support(task, k, args.seed)
    seed_everything(args.seed)
    model, tokenizer = load_model(spec, classifier=False)
    model.to(device).eval()
    run_name = build_run_name("icl", {"model": spec.name, "data": args.dataset, "prompt": "-".join(prompts),
                                      "k": "-".join(map(str, args.k)), "prec": args.precision, "seed": args.seed})
    run_dir = run_dir_for(args, run_name)
    results = []
    total = len(args.k) * len(prompts) * args.repeats
    with RunFolder.open(run_dir, vars(args)) as run, run.logger(total_steps=total, desc="icl") as logger, \
            torch.inference_mode():
        for prompt in prompts:
            for k in args.k:
                for repeat in range(args.repeats):
                    results.append(run_icl(model, tokenizer, task, k, prompt, args.seed + repeat, args.max_context,
                                           args.precision))
                    logger.advance(len(results), score=results[-1]["score"])
        return finish_runs(logger, results, task, run_dir)


if __name__ == "__main__":
    main()
