"""Prompt formats for in-context learning and for fine-tuning causal LMs.

Every format writes one example as a prompt part followed by its answer; support examples are
joined by blank lines and the query comes last, ending where the answer should begin.

- ``none``:   ``{x} {y}``                      (the bare input, the model continues it)
- ``tldr``:   ``{x} TL;DR: {y}``               (the course's summarization cue)
- ``qa``:     bAbI ``{x} In the {y}.``         (the course's cue: qa1 answers are places);
              XSum ``{x}\\nQ: What is this article about?\\nA: {y}``
- ``custom``: an instruction line, then ``Input: {x}\\nOutput: {y}`` per example; the instruction
              is "Summarize each article in one sentence." (xsum) or "Answer each question with
              one word, the place." (babi). It names the task, so it helps at k = 0, and marks
              where each input ends, which the bare formats leave to the model to guess.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.errors import CS330Error
from hw3_lm_fewshot.data import Example

PROMPTS = ("qa", "none", "tldr", "custom")
GENERATION_TASKS = ("xsum", "babi")
DEFAULT_PROMPT = {"xsum": "tldr", "babi": "qa"}
MAX_NEW_TOKENS = {"xsum": 30, "babi": 6}  # the course's per-task generation limits
EXAMPLE_SEPARATOR = "\n\n"
CUSTOM_INSTRUCTION = {
    "xsum": "Summarize each article in one sentence.",
    "babi": "Answer each question with one word, the place.",
}


def check_prompt(prompt: str) -> str:
    if prompt not in PROMPTS:
        raise CS330Error(f"unknown prompt format {prompt!r}; choose one of: {', '.join(PROMPTS)}")
    return prompt


def check_generation_task(task: str) -> str:
    if task not in GENERATION_TASKS:
        raise CS330Error(f"dataset {task!r} is not a text-generation task; in-context learning and causal-LM "
                         f"fine-tuning support: {', '.join(GENERATION_TASKS)}")
    return task


def query_text(task: str, prompt: str, x: str) -> str:
    """The prompt part of one example: everything before the answer."""
    check_prompt(prompt)
    if prompt == "none":
        return x
    if prompt == "tldr":
        return f"{x} TL;DR:"
    if prompt == "qa":
        return f"{x} In the" if task == "babi" else f"{x}\nQ: What is this article about?\nA:"
    return f"Input: {x}\nOutput:"


def answer_text(task: str, y: str) -> str:
    """The answer as it follows the prompt part: a leading space, and bAbI answers end a sentence."""
    y = str(y).strip()
    if task == "babi" and not y.endswith("."):
        y += "."
    return f" {y}"


def build_prompt(task: str, prompt: str, support: Sequence[Example], query_x: str) -> str:
    """Support examples with answers, then the query without its answer."""
    check_prompt(prompt)
    check_generation_task(task)
    parts = [query_text(task, prompt, ex.x) + answer_text(task, str(ex.y)) for ex in support]
    parts.append(query_text(task, prompt, query_x))
    body = EXAMPLE_SEPARATOR.join(parts)
    if prompt == "custom":
        body = CUSTOM_INSTRUCTION[task] + EXAMPLE_SEPARATOR + body
    return body
