"""Generation speed, two comparisons, each on identical work (the outputs are checked equal):

    python hw3_lm_fewshot/bench.py --model smollm2 --prompt_tokens 256 --new_tokens 64
    python hw3_lm_fewshot/bench.py --batched --dataset babi --k 4 --n_eval 48

- default: greedy decoding with the KV cache (``model.generate``) against a loop without it, which
  re-runs the whole sequence for every new token; both generate exactly ``--new_tokens`` tokens.
- ``--batched``: the ICL evaluation of ``--n_eval`` questions with one fixed support set, three
  ways: one prompt at a time (``generate_greedy``), left-padded batches of ``--batch_size`` whole
  prompts, and batches after the shared support prefix was read once into a KV cache. Prints
  seconds and answer tokens per second of each; the answers must be identical.
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse

import torch

from common.cli import positive_int
from common.device import DEVICE_CHOICES, configure_threads, resolve_device
from common.errors import CS330Error, cli_main
from common.timing import timed
from hw3_lm_fewshot.data import load_task
from hw3_lm_fewshot.generation import generate_answers, generate_greedy, greedy_no_cache, prefix_cache
from hw3_lm_fewshot.models import MODEL_CHOICES, load_causal_lm, resolve_model
from hw3_lm_fewshot.prompts import (
    DEFAULT_PROMPT,
    GENERATION_TASKS,
    MAX_NEW_TOKENS,
    build_prompt,
    encode_queries,
    ordered_support,
)

TEXT = ("Mary moved to the bathroom. John went to the hallway. Daniel travelled to the office. "
        "Sandra journeyed to the garden. ")


def bench_batched(model, tokenizer, args: argparse.Namespace) -> dict:
    """One-at-a-time against batched against batched-after-a-cached-prefix, on the same questions."""
    task = load_task(args.dataset, seed=0, n_eval=args.n_eval, data_dir=args.data_dir)
    prompt = DEFAULT_PROMPT[args.dataset]
    support = ordered_support(task, args.k, seed=0, ordering=0)
    whole = [build_prompt(task.name, prompt, support, ex.x) for ex in task.eval]
    prefix_ids, queries, _ = encode_queries(tokenizer, model, task, args.k, prompt, 0, True, 0, None)
    new_tokens = MAX_NEW_TOKENS[task.name]
    ways = {
        "one_at_a_time": lambda: [generate_greedy(model, tokenizer, text, new_tokens) for text in whole],
        "batched": lambda: generate_answers(model, tokenizer, [prefix_ids + q for q in queries], new_tokens,
                                            args.batch_size),
        "batched_prefix_cache": lambda: generate_answers(model, tokenizer, queries, new_tokens, args.batch_size,
                                                         prefix_ids, prefix_cache(model, prefix_ids)),
    }
    result, answers = {}, {}
    for name, fn in ways.items():
        answers[name], seconds = timed(fn, model.device)
        generated = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers[name])
        result[f"{name}_seconds"], result[f"{name}_tokens_per_s"] = seconds, generated / seconds
        print(f"{name:>22}: {seconds:6.1f} s, {generated / seconds:6.1f} answer tokens/s")
    if any(a != answers["one_at_a_time"] for a in answers.values()):
        raise CS330Error("the batched answers differ from the one-at-a-time answers; the comparison is invalid")
    print(f"{args.dataset}, k={args.k}, {len(whole)} questions, batch {args.batch_size}, prefix "
          f"{len(prefix_ids)} tokens, threads {torch.get_num_threads()}: answers identical")
    return result


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help=f"causal LM ({', '.join(MODEL_CHOICES)}, hub id, folder)")
    parser.add_argument("--prompt_tokens", type=positive_int, default=256, help="prompt length (default: 256)")
    parser.add_argument("--new_tokens", type=positive_int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs each, best kept (default: 1)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where to run (default: auto)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    batched = parser.add_argument_group("--batched: the ICL evaluation one at a time against batched")
    batched.add_argument("--batched", action="store_true", help="run this comparison instead")
    batched.add_argument("--dataset", default="babi", choices=GENERATION_TASKS, help="(default: babi)")
    batched.add_argument("--k", type=positive_int, default=4, help="support examples (default: 4)")
    batched.add_argument("--n_eval", type=positive_int, default=48, help="questions (default: 48)")
    batched.add_argument("--batch_size", type=positive_int, default=8, help="(default: 8)")
    batched.add_argument("--data_dir", default=None, help="hw3 data folder (default: data/ or $CS330_DATA_MIRROR)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    configure_threads(args.threads)
    model, tokenizer = load_causal_lm(resolve_model(args.model, args.data_dir))
    model.to(device).eval()
    if args.batched:
        return bench_batched(model, tokenizer, args)
    ids = tokenizer(TEXT * (args.prompt_tokens // 8 + 1))["input_ids"][:args.prompt_tokens]
    input_ids = torch.tensor([ids], device=device)  # [1, T]

    def with_cache() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                                  pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)

    with torch.inference_mode():
        model(input_ids=input_ids[:, :16])  # warm-up: first-call allocations are not part of either timing
    timings: dict[str, float] = {}
    outputs = {}
    for name, fn in [("cache", with_cache), ("no_cache", lambda: greedy_no_cache(model, input_ids, args.new_tokens))]:
        best = float("inf")
        for _ in range(args.repeats):
            outputs[name], seconds = timed(fn, device)
            best = min(best, seconds)
        timings[name] = best
    if not torch.equal(outputs["cache"], outputs["no_cache"]):
        raise CS330Error("the cached and uncached greedy loops produced different tokens; the comparison is invalid")
    result = {f"{name}_tokens_per_s": args.new_tokens / seconds for name, seconds in timings.items()}
    result["speedup"] = timings["no_cache"] / timings["cache"]
    print(f"model {args.model}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"with KV cache: {result['cache_tokens_per_s']:.1f} tokens/s; "
          f"without: {result['no_cache_tokens_per_s']:.1f} tokens/s; speed-up {result['speedup']:.1f}x")
    return result


if __name__ == "__main__":
    main()
