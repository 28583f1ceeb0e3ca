"""Generated tokens per second: greedy decoding with the KV cache (``model.generate``) against a
greedy loop without it, which re-runs the whole sequence for every new token.

    python hw3_lm_fewshot/bench.py --model smollm2 --prompt_tokens 256 --new_tokens 64

Both generate exactly ``--new_tokens`` tokens (no early stop) from the same prompt, and the
outputs are checked to be the same tokens, so the speed-up is for identical work.
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse

import torch

from common.cli import positive_int
from common.device import DEVICE_CHOICES, resolve_device
from common.errors import CS330Error, cli_main
from common.timing import timed
from hw3_lm_fewshot.generation import greedy_no_cache
from hw3_lm_fewshot.models import MODEL_CHOICES, load_causal_lm, resolve_model

TEXT = ("Mary moved to the bathroom. John went to the hallway. Daniel travelled to the office. "
        "Sandra journeyed to the garden. ")


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help=f"causal LM ({', '.join(MODEL_CHOICES)}, hub id, folder)")
    parser.add_argument("--prompt_tokens", type=positive_int, default=256, help="prompt length (default: 256)")
    parser.add_argument("--new_tokens", type=positive_int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs each, best kept (default: 1)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where to run (default: auto)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model, tokenizer = load_causal_lm(resolve_model(args.model))
    model.to(device).eval()
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
