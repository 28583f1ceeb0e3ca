"""Prompt formats for in-context learning and for fine-tuning causal LMs.

Every format writes one example as a prompt part followed by its answer; support examples are
joined by blank lines and the query comes last, ending where the answer should begin.

- ``none``:   ``{x} {y}``                      (the bare input, the model continues it)
- ``tldr``:   ``{x} TL;DR: {y}``               (the course's summarization cue)
- ``qa``:     bAbI ``{x} In the {y}.``         (the course's cue: qa1 answers are places);
              XSum ``{x}\\nQ: What is this article about?\\nA: {y}``;
              amazon ``Review: {x}\\nStars: {stars}`` (scored by the likelihood of " 1" .. " 5")
- ``custom``: XSum ``Article: {x}\\n\\nOne-sentence summary: {y}``: it names the article and what
              follows it as a one-sentence summary right where the answer begins (the README's
              "Prompt custom" says what this wording replaced, and why). bAbI: the instruction
              "Answer each question with one word, the place.", then ``Input: {x}\\nOutput: {y}`` per
              example (the answer is one word).
A prompt is :func:`prompt_prefix` (the support examples) followed by :func:`prompt_query`, so the
evaluation can read a prefix shared by every query once (generation.prefix_cache).
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Sequence

from common.errors import CS330Error
from hw3_lm_fewshot.data import NUM_AMAZON_CLASSES, Example, TaskData, sample_support
from hw3_lm_fewshot.generation import PromptTruncatedWarning, context_limit, encode_prompt

PROMPTS = ("qa", "none", "tldr", "custom")
GENERATION_TASKS = ("xsum", "babi")
ICL_TASKS = ("amazon", *GENERATION_TASKS)  # amazon: the label is scored, not generated
DEFAULT_PROMPT = {"xsum": "tldr", "babi": "qa"}
MAX_NEW_TOKENS = {"xsum": 30, "babi": 6}  # the course's per-task generation limits
EXAMPLE_SEPARATOR = "\n\n"
CUSTOM_INSTRUCTION = {"babi": "Answer each question with one word, the place."}


def check_prompt(prompt: str) -> str:
    if prompt not in PROMPTS:
        raise CS330Error(f"unknown prompt format {prompt!r}; choose one of: {', '.join(PROMPTS)}")
    return prompt


def check_icl_task(task: str, prompt: str) -> str:
    if task not in ICL_TASKS:
        raise CS330Error(f"dataset {task!r} has no in-context format; choose from: {', '.join(ICL_TASKS)}")
    if task == "amazon" and prompt != "qa":
        raise CS330Error(f"amazon in-context learning has one format, qa ('Review: ...\\nStars: 4'); got {prompt!r}")
    return task


def query_text(task: str, prompt: str, x: str) -> str:
    """The prompt part of one example: everything before the answer."""
    check_prompt(prompt)
    if task == "amazon":
        return f"Review: {x}\nStars:"
    if prompt == "none":
        return x
    if prompt == "tldr":
        return f"{x} TL;DR:"
    if prompt == "qa":
        return f"{x} In the" if task == "babi" else f"{x}\nQ: What is this article about?\nA:"
    if task == "xsum":
        return f"Article: {x}\n\nOne-sentence summary:"
    return f"Input: {x}\nOutput:"


def answer_text(task: str, y: str) -> str:
    """The answer as it follows the prompt part: a leading space, and bAbI answers end a sentence."""
    if task == "amazon":
        return f" {int(y) + 1}"  # labels are stars - 1
    y = str(y).strip()
    if task == "babi" and not y.endswith("."):
        y += "."
    return f" {y}"


def prompt_prefix(task: str, prompt: str, support: Sequence[Example]) -> str:
    """Everything before the query: the instruction (``custom`` on bAbI) and the solved support examples."""
    check_prompt(prompt)
    parts = [query_text(task, prompt, ex.x) + answer_text(task, ex.y) for ex in support]
    instruction = [CUSTOM_INSTRUCTION[task]] if prompt == "custom" and task in CUSTOM_INSTRUCTION else []
    return EXAMPLE_SEPARATOR.join(instruction + parts)


def prompt_query(task: str, prompt: str, query_x: str, prefix: str) -> str:
    """The query part, which follows ``prefix`` (separated from it when there is one)."""
    return (EXAMPLE_SEPARATOR if prefix else "") + query_text(task, prompt, query_x)


def build_prompt(task: str, prompt: str, support: Sequence[Example], query_x: str) -> str:
    """Support examples with answers, then the query without its answer."""
    check_icl_task(task, prompt)
    prefix = prompt_prefix(task, prompt, support)
    return prefix + prompt_query(task, prompt, query_x, prefix)


# ---------------------------------------------------------------------------- token ids for an evaluation
def task_labels(task: TaskData) -> list:
    """The answers a label-scored evaluation chooses from: amazon's 5 classes (stars - 1), bAbI's
    places (every answer in the pool: qa1 has 6)."""
    if task.name == "amazon":
        return list(range(NUM_AMAZON_CLASSES))
    if task.name == "babi":
        return sorted({str(ex.y) for ex in task.pool})
    raise CS330Error(f"{task.name} answers are free text, not labels: label scoring (--calibrate) applies to "
                     "amazon and babi")


def label_candidates(tokenizer, task: str, labels: Sequence | None = None) -> tuple[list[int], list[int]]:
    """The labels' answers as tokens (amazon " 1" .. " 5" by default): the tokens they all begin with
    (SmolLM2: the space) and the first token of each after those, which must differ. A label is scored
    by the likelihood of that token after the shared part (the whole label when it is one token:
    amazon's digits, bAbI's places for SmolLM2)."""
    labels = range(NUM_AMAZON_CLASSES) if labels is None else labels
    ids = [tokenizer(answer_text(task, y), add_special_tokens=False)["input_ids"] for y in labels]
    shared = os.path.commonprefix(ids)  # of lists, element by element
    firsts = [row[len(shared)] if len(row) > len(shared) else None for row in ids]
    if None in firsts or len(set(firsts)) != len(firsts):
        raise CS330Error(f"this tokenizer writes the labels as {ids}: after the tokens they share, each must begin "
                         "with a token of its own for likelihood scoring")
    return shared, firsts


def ordered_support(task: TaskData, k: int, seed: int, ordering: int) -> list[Example]:
    """The seed's support set; ordering 0 keeps its drawn order, ordering i > 0 is a seeded permutation."""
    support = sample_support(task, k, seed)
    if ordering:
        random.Random(f"{seed}-{ordering}").shuffle(support)
    return support


def query_ids(tokenizer, task: str, prompt: str, x: str, prefix: str) -> list[int]:
    """Token ids of one query after the text ``prefix`` (whose ids come first; special tokens only
    when there is no prefix to carry them)."""
    return tokenizer(prompt_query(task, prompt, x, prefix), add_special_tokens=not prefix)["input_ids"]


def check_queries_fit(tokenizer, model, task: TaskData, prompt: str, max_context: int | None) -> None:
    """Refuse a context limit that cannot hold the longest evaluation query alone (no support examples)
    with its answer: cutting it from the left would cut the query itself."""
    limit = context_limit(model, max_context)
    need = MAX_NEW_TOKENS.get(task.name, 1) + max(len(tokenizer(build_prompt(task.name, prompt, [], ex.x))["input_ids"])
                                                  for ex in task.eval)
    if need > limit:
        raise CS330Error(f"the longest {task.name} query needs {need} tokens with its answer, more than the context "
                         f"limit of {limit} (the model's context or --max_context): raise --max_context")


def encode_queries(tokenizer, model, task: TaskData, k: int, prompt: str, seed: int, fixed_support: bool,
                   ordering: int, max_context: int | None) -> tuple[list[int], list[list[int]], int]:
    """Token ids of the shared prefix (empty unless ``fixed_support``) and of each query, and how many
    prompts lost tokens on the left (per-query supports only; a fixed prefix that does not fit stops)."""
    check_queries_fit(tokenizer, model, task, prompt, max_context)
    max_new = MAX_NEW_TOKENS.get(task.name, 1)
    if fixed_support:
        prefix = prompt_prefix(task.name, prompt, ordered_support(task, k, seed, ordering))
        prefix_ids = tokenizer(prefix)["input_ids"] if prefix else []
        queries = [query_ids(tokenizer, task.name, prompt, ex.x, prefix) for ex in task.eval]
        limit = context_limit(model, max_context)
        longest = len(prefix_ids) + max(len(q) for q in queries) + max_new
        if longest > limit:
            raise CS330Error(f"k={k} with a fixed support set needs {longest} tokens of context, the limit is "
                             f"{limit}: lower k, raise --max_context, or use --support per_query (which truncates)")
        return prefix_ids, queries, 0
    rng = random.Random(seed)
    queries, truncated = [], 0
    for ex in task.eval:
        text = build_prompt(task.name, prompt, sample_support(task, k, rng.randrange(2**31)), ex.x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            queries.append(encode_prompt(tokenizer, model, text, max_new, max_context))
        for warning in caught:  # count, and pass the warning on so it is never silent
            truncated += 1
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return [], queries, truncated
