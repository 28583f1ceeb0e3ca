"""Greedy decoding with the KV cache, stopping at the end of the first sentence or a token limit."""

from __future__ import annotations

import warnings

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

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
    if len(input_ids) <= max_tokens:
        return input_ids
    warnings.warn(f"{what} has {len(input_ids)} tokens, more than the {max_tokens} that fit in the model's "
                  f"context; dropped {len(input_ids) - max_tokens} tokens from the left",
                  PromptTruncatedWarning, stacklevel=2)
    return input_ids[-max_tokens:]


def encode_prompt(tokenizer, model, prompt: str, max_new_tokens: int, max_context: int | None = None) -> list[int]:
    """Token ids of ``prompt``, left-truncated so that prompt + generation fit the context."""
    limit = min(context_length(model), max_context or context_length(model)) - max_new_tokens
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
