"""Task metrics: accuracy (amazon), ROUGE-1 F with stemming (xsum), exact match (babi)."""

from __future__ import annotations

import string
from collections.abc import Sequence

from rouge_score import rouge_scorer

from common.errors import CS330Error

TASK_METRIC = {"amazon": "accuracy", "xsum": "rouge1", "babi": "exact_match"}
_ROUGE = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise CS330Error(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise CS330Error("no examples to score: the evaluation set is empty")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    _check_lengths(predictions, labels)
    return sum(int(p) == int(y) for p, y in zip(predictions, labels)) / len(labels)


def rouge1_f(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-1 F-measure (Porter stemming, as in the course); an empty prediction scores 0."""
    _check_lengths(predictions, references)
    return sum(_ROUGE.score(ref, pred)["rouge1"].fmeasure for pred, ref in zip(predictions, references)) / len(
        references
    )


def normalize_answer(text: str) -> str:
    """Lower case, without surrounding whitespace and punctuation: "Bathroom." -> "bathroom"."""
    return text.strip().strip(string.punctuation + string.whitespace).lower()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to the reference after :func:`normalize_answer`."""
    _check_lengths(predictions, references)
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(references)


def score(task: str, predictions: Sequence, references: Sequence) -> float:
    """The task's metric (see ``TASK_METRIC``)."""
    metric = TASK_METRIC[task]
    if metric == "accuracy":
        return accuracy(predictions, references)
    if metric == "rouge1":
        return rouge1_f(predictions, references)
    return exact_match(predictions, references)
