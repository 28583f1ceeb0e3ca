"""The three few-shot tasks: Amazon star ratings, XSum summaries, bAbI task 1 (qa1).

Each task comes from local files when present (the data directory, then the read-only mirror
``$CS330_DATA_MIRROR``) and otherwise from the Hugging Face hub, as in the course. A task is a
*pool* that support/training examples are drawn from and a disjoint *evaluation set*; both are
sampled with a seed.

Local stand-ins (see the mirror's SOURCE.md files) and how they are split:
- amazon: ``amazon_review_full_test_999.jsonl`` (5 classes), shuffled with the seed, then per class the
  first ``n_pool_per_class`` reviews are the pool and the next ``n_eval_per_class`` the evaluation set.
- xsum: pool = ``validation_999.jsonl``, evaluation = ``test_1000.jsonl``, both filtered to
  document + summary shorter than ``xsum_max_words`` words (course: 100 on the train split; the local
  files hold only 102 such rows, too few for k = 128, so the default here is 150).
- babi: pool = ``en-10k/qa1`` train, evaluation = ``en/qa1`` test; one example per question, the
  input being the story's statements up to the question plus the question.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common.data import find_local
from common.errors import CS330Error

TASKS = ("amazon", "xsum", "babi")
NUM_AMAZON_CLASSES = 5
AMAZON_RELPATH = "lm_fewshot/amazon/amazon_review_full_test_999.jsonl"
XSUM_RELPATHS = ("lm_fewshot/xsum/validation_999.jsonl", "lm_fewshot/xsum/test_1000.jsonl")
BABI_DIR = "lm_fewshot/babi/tasks_1-20_v1-2"
BABI_POOL_FILES = ("en-10k/qa1_single-supporting-fact_train.txt", "en/qa1_single-supporting-fact_train.txt")
BABI_EVAL_FILE = "en/qa1_single-supporting-fact_test.txt"


@dataclass(frozen=True)
class Example:
    x: str
    y: str | int  # amazon: label 0..4 (stars - 1); xsum: summary; babi: one-word answer


@dataclass
class TaskData:
    name: str
    pool: list[Example]
    eval: list[Example]
    source: str  # where the examples came from, for the results files


@dataclass(frozen=True)
class BabiQuestion:
    story: tuple[str, ...]  # the statements before the question, in order
    question: str
    answer: str
    supporting: tuple[int, ...]  # line ids of the supporting facts
    story_lines: tuple[tuple[int, str], ...] = ()  # (line id, statement), to resolve supporting ids

    @property
    def x(self) -> str:
        return " ".join([*self.story, self.question])


def check_task(name: str) -> str:
    if name not in TASKS:
        raise CS330Error(f"unknown dataset {name!r}; choose one of: {', '.join(TASKS)}")
    return name


def parse_babi(lines: list[str]) -> list[BabiQuestion]:
    """Parse the original bAbI text format.

    ``ID text`` lines; a question line is ``ID question<TAB>answer<TAB>supporting ids``; the ID
    resets to 1 at the start of every story. Earlier questions are not part of later inputs.
    """
    questions: list[BabiQuestion] = []
    statements: list[tuple[int, str]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        line_id, _, text = line.partition(" ")
        if not line_id.isdigit():
            raise CS330Error(f"bAbI line {number} does not start with a line id: {line!r}")
        if int(line_id) == 1:
            statements = []
        if "\t" in text:
            fields = text.split("\t")
            if len(fields) != 3:
                raise CS330Error(f"bAbI line {number}: a question needs 3 tab-separated fields, got {line!r}")
            question, answer, support = (field.strip() for field in fields)
            questions.append(BabiQuestion(
                story=tuple(s for _, s in statements), question=question, answer=answer,
                supporting=tuple(int(i) for i in support.split()), story_lines=tuple(statements),
            ))
        else:
            statements.append((int(line_id), text.strip()))
    return questions


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split_balanced(rows: list[Example], seed: int, n_pool: int, n_eval: int) -> tuple[list[Example], list[Example]]:
    by_class: dict[int, list[Example]] = defaultdict(list)
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    for row in shuffled:
        by_class[int(row.y)].append(row)
    smallest = min(len(by_class[c]) for c in range(NUM_AMAZON_CLASSES))
    if n_pool + n_eval > smallest:
        raise CS330Error(f"amazon: {n_pool} pool + {n_eval} evaluation reviews per class requested, but the "
                         f"smallest class has {smallest}; lower --n_eval or the largest k")
    pool = [ex for c in range(NUM_AMAZON_CLASSES) for ex in by_class[c][:n_pool]]
    evaluation = [ex for c in range(NUM_AMAZON_CLASSES) for ex in by_class[c][n_pool:n_pool + n_eval]]
    return pool, evaluation


def _hub(*args, **kwargs):
    """``datasets.load_dataset`` with a clear error when the hub cannot be reached."""
    try:
        import datasets

        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # the hub raises many different types (connection, 404, script errors)
        raise CS330Error(f"no local copy of the data and the hub failed ({type(err).__name__}: {err}). "
                         "Set CS330_DATA_MIRROR or --data_dir to a folder holding lm_fewshot/") from None


def _load_amazon(seed: int, n_pool: int, n_eval: int, data_dir: str | None) -> TaskData:
    path = find_local(AMAZON_RELPATH, data_dir)
    if path is not None:
        rows = [Example(r["text"], int(r["label"])) for r in _read_jsonl(path)]
        source = str(path)
    else:  # the course's data: Amazon US reviews of videos, reviews mentioning "sex" removed
        hub = _hub("amazon_us_reviews", "Video_v1_00", split="train")
        rows = [Example(r["review_body"], int(r["star_rating"]) - 1) for r in hub
                if "sex" not in r["review_body"].lower()]
        source = "hub:amazon_us_reviews/Video_v1_00"
    pool, evaluation = _split_balanced(rows, seed, n_pool, n_eval)
    return TaskData("amazon", pool, evaluation, source)


def _load_xsum(seed: int, n_pool: int, n_eval: int, data_dir: str | None, max_words: int) -> TaskData:
    def short(doc: str, summary: str) -> bool:
        return len(doc.split(" ")) + len(summary.split(" ")) < max_words

    local = [find_local(relpath, data_dir) for relpath in XSUM_RELPATHS]
    if all(path is not None for path in local):
        pool_rows, eval_rows = ([Example(r["document"], r["summary"]) for r in _read_jsonl(path)
                                 if short(r["document"], r["summary"])] for path in local)
        random.Random(seed).shuffle(pool_rows)
        random.Random(seed + 1).shuffle(eval_rows)
        source = " + ".join(str(p) for p in local)
    else:
        hub = _hub("xsum", split="train")
        rows = [Example(r["document"], r["summary"]) for r in hub if short(r["document"], r["summary"])]
        random.Random(seed).shuffle(rows)
        pool_rows, eval_rows = rows[:n_pool], rows[n_pool:]
        source = "hub:xsum/train"
    return TaskData("xsum", pool_rows[:n_pool], eval_rows[:n_eval], source)


def _load_babi(seed: int, n_pool: int, n_eval: int, data_dir: str | None) -> TaskData:
    pool_path = next((p for f in BABI_POOL_FILES if (p := find_local(f"{BABI_DIR}/{f}", data_dir))), None)
    eval_path = find_local(f"{BABI_DIR}/{BABI_EVAL_FILE}", data_dir)
    if pool_path is not None and eval_path is not None:
        pool_q, eval_q = (parse_babi(path.read_text(encoding="utf-8").splitlines()) for path in (pool_path, eval_path))
        source = f"{pool_path} + {eval_path}"
    else:  # the course's config; the hub's story format holds statements (type 0) and questions (type 1)
        hub = _hub("babi_qa", "en-valid-10k-qa1", split="train")
        questions = []
        for row in hub:
            story = row["story"]
            lines = [f"{i} {t}" + (f"\t{a}\t{' '.join(s)}" if kind == 1 else "")
                     for i, t, a, s, kind in zip(story["id"], story["text"], story["answer"],
                                                 story["supporting_ids"], story["type"])]
            questions.extend(parse_babi(lines))
        random.Random(seed).shuffle(questions)
        pool_q, eval_q = questions[:n_pool], questions[n_pool:]
        source = "hub:babi_qa/en-valid-10k-qa1"
    pool_q, eval_q = pool_q[:], eval_q[:]
    random.Random(seed).shuffle(pool_q)
    random.Random(seed + 1).shuffle(eval_q)
    to_example = lambda q: Example(q.x, q.answer)  # noqa: E731
    return TaskData("babi", [to_example(q) for q in pool_q[:n_pool]], [to_example(q) for q in eval_q[:n_eval]], source)


def load_task(name: str, seed: int = 0, n_eval: int = 50, n_pool: int = 256, data_dir: str | None = None,
              xsum_max_words: int = 150) -> TaskData:
    """Pool and evaluation set of a task. For amazon, ``n_pool`` and ``n_eval`` are split evenly over
    the 5 classes (pool: ``n_pool // 5`` per class, at least 128 so that k = 128 per class fits)."""
    check_task(name)
    if name == "amazon":
        per_class_eval = max(1, n_eval // NUM_AMAZON_CLASSES)
        return _load_amazon(seed, max(n_pool // NUM_AMAZON_CLASSES, 128), per_class_eval, data_dir)
    if name == "xsum":
        return _load_xsum(seed, n_pool, n_eval, data_dir, xsum_max_words)
    return _load_babi(seed, n_pool, n_eval, data_dir)


def sample_support(task: TaskData, k: int, seed: int) -> list[Example]:
    """k support examples from the pool (amazon: k per class, class-balanced), shuffled with the seed."""
    if k < 0:
        raise CS330Error(f"k must be >= 0, got {k}")
    rng = random.Random(seed)
    if task.name == "amazon":
        by_class: dict[int, list[Example]] = defaultdict(list)
        for ex in task.pool:
            by_class[int(ex.y)].append(ex)
        smallest = min((len(by_class[c]) for c in range(NUM_AMAZON_CLASSES)), default=0)
        if k > smallest:
            raise CS330Error(f"k = {k} per class is larger than the amazon pool ({smallest} reviews in its "
                             "smallest class); choose a smaller k")
        chosen = [ex for c in range(NUM_AMAZON_CLASSES) for ex in rng.sample(by_class[c], k)]
    else:
        if k > len(task.pool):
            raise CS330Error(f"k = {k} is larger than the {task.name} pool ({len(task.pool)} examples); "
                             "choose a smaller k")
        chosen = rng.sample(task.pool, k)
    rng.shuffle(chosen)
    return chosen
