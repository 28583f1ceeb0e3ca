"""Greedy decoding with the KV cache, stopping at the end of the first sentence or a token limit."""

from __future__ import annotations

import copy
import warnings

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from common.errors import CS330Error
from hw3_lm_fewshot.models import context_length

SENTENCE_ENDS = (".", "!", "?", "\n")


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the model's context and lost tokens on the left."""


class SentenceEnd(StoppingCriteria):
    """Stop once the generated text (after the prompt) holds a sentence end after some non-space text."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = [ends_sentence(self.tokenizer.decode(row[self.prompt_length:], skip_special_tokens=True))
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def ends_sentence(text: str) -> bool:
    stripped = text.lstrip()
    return bool(stripped) and any(end in stripped for end in SENTENCE_ENDS)


def first_sentence(text: str) -> str:
    """The generated text up to and including its first sentence end ("" stays "")."""
    text = text.lstrip()
    cut = min((text.find(end) for end in SENTENCE_ENDS if end in text), default=len(text))
    return text[:cut + 1].strip()


def truncate_left(input_ids: list[int], max_tokens: int, what: str = "prompt") -> list[int]:
    """Keep the last ``max_tokens`` tokens, warning (never silently) when anything is cut."""
    if max_tokens < 1:  # input_ids[-0:] would keep everything, input_ids[-(-5):] all but 5
        raise CS330Error(f"the context limit leaves {max_tokens} tokens for the {what}: raise --max_context")
    if len(input_ids) <= max_tokens:
        return input_ids
    warnings.warn(f"{what} has {len(input_ids)} tokens, more than the {max_tokens} that fit in the model's "
                  f"context; dropped {len(input_ids) - max_tokens} tokens from the left",
                  PromptTruncatedWarning, stacklevel=2)
    return input_ids[-max_tokens:]


def context_limit(model, max_context: int | None = None) -> int:
    """Tokens a prompt plus its answer may take: the model's context, or ``--max_context`` if smaller."""
    return min(context_length(model), max_context or context_length(model))


def encode_prompt(tokenizer, model, prompt: str, max_new_tokens: int, max_context: int | None = None) -> list[int]:
    """Token ids of ``prompt``, left-truncated so that prompt + generation fit the context."""
    limit = context_limit(model, max_context) - max_new_tokens
    return truncate_left(tokenizer(prompt)["input_ids"], limit)


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompt: str, max_new_tokens: int, max_context: int | None = None,
                    stop_at_sentence_end: bool = True) -> str:
    """Greedy continuation of ``prompt`` with the KV cache; returns the first generated sentence."""
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, model, prompt, max_new_tokens, max_context)
    input_ids = torch.tensor([ids], device=device)  # [1, T]
    stopping = StoppingCriteriaList([SentenceEnd(tokenizer, len(ids))]) if stop_at_sentence_end else None
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, use_cache=True, stopping_criteria=stopping, pad_token_id=tokenizer.pad_token_id,
        temperature=None, top_p=None, top_k=None,
    )  # [1, T + new]
    text = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
    return first_sentence(text) if stop_at_sentence_end else text


@torch.inference_mode()
def greedy_no_cache(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The naive loop the KV cache replaces: every step re-runs the whole sequence. [1, T] -> [1, T + new]."""
    for _ in range(max_new_tokens):
        logits = model(input_ids=input_ids, use_cache=False).logits  # [1, T, V]
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
        input_ids = torch.cat([input_ids, next_token], dim=1)
    return input_ids


# ---------------------------------------------------------------------------- batched, with a shared prefix
# The plain loop above reads the whole prompt for every query. When every query of an evaluation
# shares its first tokens (the same support examples, in the same order), those are read once into
# a KV cache and paid once instead of once per query; queries then go through the model in
# left-padded batches, which share each read of the weights while decoding (bench.py --batched
# measures both: the prefix is what pays on a CPU).
def prefix_cache(model, prefix_ids: list[int]):
    """The KV cache of ``prefix_ids`` (None for an empty prefix)."""
    if not prefix_ids:
        return None
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1).cache


def _padded(prefix_ids: list[int], queries: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """[prefix][pads][query] rows: input ids [B, P + L] and the attention mask that hides the pads."""
    width = max(len(q) for q in queries)
    rows = [prefix_ids + [pad_id] * (width - len(q)) + q for q in queries]
    mask = [[1] * len(prefix_ids) + [0] * (width - len(q)) + [1] * len(q) for q in queries]
    return torch.tensor(rows, device=device), torch.tensor(mask, device=device)  # [B, P + L] each


def _batch_cache(cache, size: int):
    """A copy of the prefix cache for ``size`` rows (generation appends to the cache it is given)."""
    if cache is None:
        return None
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(size)
    return cache


@torch.inference_mode()
def generate_batch(model, tokenizer, queries: list[list[int]], max_new_tokens: int, prefix_ids: list[int] = (),
                   cache=None) -> list[str]:
    """Greedy first sentences for a batch of query token ids that all follow ``prefix_ids``
    (``cache`` = :func:`prefix_cache` of it, or None to read the prefix with the batch)."""
    prefix_ids = list(prefix_ids)
    device = next(model.parameters()).device
    input_ids, mask = _padded(prefix_ids, queries, tokenizer.pad_token_id, device)
    prompt_length = input_ids.shape[1]
    output = model.generate(
        input_ids=input_ids, attention_mask=mask, cache=_batch_cache(cache, len(queries)),
        max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([SentenceEnd(tokenizer, prompt_length)]),
        temperature=None, top_p=None, top_k=None,
    )  # [B, P + L + new]
    return [first_sentence(tokenizer.decode(row[prompt_length:], skip_special_tokens=True)) for row in output]


@torch.inference_mode()
def next_token_logits(model, tokenizer, queries: list[list[int]], prefix_ids: list[int] = (),
                      cache=None) -> torch.Tensor:
    """Logits of the token after each query (which follows ``prefix_ids``): [B, V]."""
    prefix_ids = list(prefix_ids)
    device = next(model.parameters()).device
    input_ids, mask = _padded(prefix_ids, queries, tokenizer.pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the pads do not move the queries' positions
    start = len(prefix_ids) if cache is not None else 0  # the cached tokens are not read again
    logits = model(input_ids=input_ids[:, start:], attention_mask=mask, position_ids=positions[:, start:],
                   cache=_batch_cache(cache, len(queries)), use_cache=cache is not None, logits_to_keep=1).logits
    return logits[:, -1].float()  # [B, V]


def generate_answers(model, tokenizer, queries: list[list[int]], max_new_tokens: int, batch_size: int,
                     prefix_ids: list[int] = (), cache=None) -> list[str]:
    """:func:`generate_batch` over ``queries`` in batches of ``batch_size``, answers in query order."""
    answers = []
    for i in range(0, len(queries), batch_size):
        answers += generate_batch(model, tokenizer, queries[i:i + batch_size], max_new_tokens, prefix_ids, cache)
    return answers
