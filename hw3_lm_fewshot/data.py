"""The three few-shot tasks: Amazon star ratings, XSum summaries, bAbI task 1 (qa1).

Each task comes from local files when present (the data directory, then the read-only mirror
``$CS330_DATA_MIRROR``) and otherwise from the Hugging Face hub, as in the course. A task is a
*pool* that support/training examples are drawn from and a disjoint *evaluation set*. The
evaluation set is drawn first, with the seed, and the pool is all the rest of the data: no cap,
so the largest k is what the data holds (an input that also appears in the evaluation set is
left out of the pool, so no evaluation answer can be shown as a support example).

Local stand-ins (see the mirror's SOURCE.md files) and how they are split:
- amazon: ``amazon_review_full_test_999.jsonl`` (5 classes), shuffled with the seed, then per class the
  first ``n_eval // 5`` reviews are the evaluation set and the rest of the class is the pool.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.data import find_local
from common.errors import CS330Error

TASKS = ("amazon", "xsum", "babi")
NUM_AMAZON_CLASSES = 5
AMAZON_RELPATH = "lm_fewshot/amazon/amazon_review_full_test_999.jsonl"
AMAZON_FIELDS = ("text", "label")
XSUM_RELPATHS = ("lm_fewshot/xsum/validation_999.jsonl", "lm_fewshot/xsum/test_1000.jsonl")
XSUM_FIELDS = ("document", "summary")
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
    pool_note: str = ""  # what bounds the pool, for the error when a k does not fit


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


def parse_babi(lines: Sequence[str], source: str = "bAbI") -> list[BabiQuestion]:
    """Parse the original bAbI text format (``source`` names the file in errors).

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
            raise CS330Error(f"{source} line {number} does not start with a line id: {line!r}")
        if int(line_id) == 1:
            statements = []
        if "\t" in text:
            fields = text.split("\t")
            if len(fields) != 3 or not all(s.isdigit() for s in fields[2].split()):
                raise CS330Error(f"{source} line {number}: a question needs 3 tab-separated fields "
                                 f"(question, answer, supporting line ids), got {line!r}")
            question, answer, support = (field.strip() for field in fields)
            questions.append(BabiQuestion(
                story=tuple(s for _, s in statements), question=question, answer=answer,
                supporting=tuple(int(i) for i in support.split()), story_lines=tuple(statements),
            ))
        else:
            statements.append((int(line_id), text.strip()))
    return questions


def read_jsonl(path: Path, fields: Sequence[str], make: Callable[[dict], Example]) -> list[Example]:
    """One :class:`Example` per line of a JSONL file. A line that is not a JSON object holding
    ``fields``, or whose values ``make`` rejects (ValueError/TypeError), is an error naming the
    file and the line."""
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
                row = json.loads(line) if line.strip() else None
            except UnicodeDecodeError as err:
                raise CS330Error(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise CS330Error(f"{where}: not valid JSON ({err.msg}: column {err.colno})") from None
            if row is None:
                continue
            if not isinstance(row, dict):
                raise CS330Error(f"{where}: expected a JSON object with the fields {', '.join(fields)}, "
                                 f"got a {type(row).__name__}")
            missing = [name for name in fields if name not in row]
            if missing:
                raise CS330Error(f"{where}: missing field {', '.join(map(repr, missing))} "
                                 f"(every row needs {', '.join(fields)})")
            try:
                examples.append(make(row))
            except (TypeError, ValueError) as err:
                raise CS330Error(f"{where}: {err}") from None
    return examples


def _text(row: dict, field: str) -> str:
    if not isinstance(row[field], str):
        raise TypeError(f"field {field!r} must be a string, got {row[field]!r}")
    return row[field]


def _amazon_example(row: dict) -> Example:
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_AMAZON_CLASSES:
        raise ValueError(f"field 'label' must be an integer 0..{NUM_AMAZON_CLASSES - 1} (stars - 1), got {label!r}")
    return Example(_text(row, "text"), label)


def _xsum_example(row: dict) -> Example:
    return Example(_text(row, "document"), _text(row, "summary"))


def _disjoint(pool: list[Example], evaluation: list[Example]) -> tuple[list[Example], int]:
    """The pool without the examples whose input is also an evaluation input, and how many went."""
    seen = {ex.x for ex in evaluation}
    kept = [ex for ex in pool if ex.x not in seen]
    return kept, len(pool) - len(kept)


def _overlap_note(removed: int, what: str) -> str:
    return f" minus {removed} whose input is also an evaluation {what}" if removed else ""


def _take_eval(rows: list, n_eval: int, what: str) -> list:
    if len(rows) < n_eval:
        raise CS330Error(f"--n_eval {n_eval}: the {what} holds only {len(rows)} examples; lower --n_eval")
    return rows[:n_eval]


def _split_balanced(rows: list[Example], seed: int, n_eval: int) -> tuple[list[Example], list[Example], str]:
    """Per class (after a seeded shuffle): the first ``n_eval`` reviews are evaluated, the rest is the pool."""
    by_class: dict[int, list[Example]] = defaultdict(list)
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    for row in shuffled:
        by_class[int(row.y)].append(row)
    smallest = min(len(by_class[c]) for c in range(NUM_AMAZON_CLASSES))
    if n_eval > smallest:
        raise CS330Error(f"amazon: --n_eval asks for {n_eval} evaluation reviews per class, but the smallest class "
                         f"has {smallest}; lower --n_eval")
    evaluation = [ex for c in range(NUM_AMAZON_CLASSES) for ex in by_class[c][:n_eval]]
    pool, removed = _disjoint([ex for c in range(NUM_AMAZON_CLASSES) for ex in by_class[c][n_eval:]], evaluation)
    note = f"{smallest} in the smallest class minus {n_eval} evaluation reviews" + _overlap_note(removed, "review")
    return pool, evaluation, note


def _hub(*args, **kwargs):
    """``datasets.load_dataset`` with a clear error when the hub cannot be reached."""
    try:
        import datasets

        return datasets.load_dataset(*args, **kwargs)
    except Exception as err:  # the hub raises many different types (connection, 404, script errors)
        raise CS330Error(f"no local copy of the data and the hub failed ({type(err).__name__}: {err}). "
                         "Set CS330_DATA_MIRROR or --data_dir to a folder holding lm_fewshot/") from None


# The hub's rows -> Examples. The loaders keep lists of Examples rather than ``datasets.Dataset``s:
# pools hold at most 10k short rows, drawn from by index with a seeded ``random.Random``, and the
# local JSONL files are read line by line so that a broken line is named (file and line); a Dataset
# would add a conversion at every draw and buy nothing at this size. ``datasets`` fetches the hub
# splits, and these functions turn its rows into the Examples the local files give (tests check it).
def amazon_hub_examples(rows: Iterable[dict]) -> list[Example]:
    """amazon_us_reviews rows (``review_body``, ``star_rating`` 1..5), reviews mentioning "sex" left out
    as in the course."""
    return [Example(r["review_body"], int(r["star_rating"]) - 1) for r in rows if "sex" not in r["review_body"].lower()]


def xsum_hub_examples(rows: Iterable[dict]) -> list[Example]:
    return [Example(r["document"], r["summary"]) for r in rows]


def babi_hub_examples(rows: Iterable[dict]) -> list[Example]:
    """babi_qa rows: one story each, its lines as lists (``id``, ``text``, ``answer``,
    ``supporting_ids``, ``type`` 0 = statement, 1 = question), written back in the original format
    and parsed like the local files."""
    examples = []
    for row in rows:
        story = row["story"]
        lines = [f"{i} {t}" + (f"\t{a}\t{' '.join(s)}" if kind == 1 else "")
                 for i, t, a, s, kind in zip(story["id"], story["text"], story["answer"], story["supporting_ids"],
                                             story["type"])]
        examples.extend(Example(q.x, q.answer) for q in parse_babi(lines, source="hub babi_qa"))
    return examples


def _load_amazon(seed: int, n_eval: int, data_dir: str | None) -> TaskData:
    path = find_local(AMAZON_RELPATH, data_dir)
    if path is not None:
        rows = read_jsonl(path, AMAZON_FIELDS, _amazon_example)
        source = str(path)
    else:  # the course's data: Amazon US reviews of videos, reviews mentioning "sex" removed
        rows = amazon_hub_examples(_hub("amazon_us_reviews", "Video_v1_00", split="train"))
        source = "hub:amazon_us_reviews/Video_v1_00"
    pool, evaluation, note = _split_balanced(rows, seed, n_eval)
    return TaskData("amazon", pool, evaluation, source, note)


def _load_xsum(seed: int, n_eval: int, data_dir: str | None, max_words: int) -> TaskData:
    def short(ex: Example) -> bool:
        return len(ex.x.split(" ")) + len(str(ex.y).split(" ")) < max_words

    local = [find_local(relpath, data_dir) for relpath in XSUM_RELPATHS]
    if all(path is not None for path in local):
        pool_all, eval_all = (read_jsonl(path, XSUM_FIELDS, _xsum_example) for path in local)
        pool_rows, eval_rows = [ex for ex in pool_all if short(ex)], [ex for ex in eval_all if short(ex)]
        random.Random(seed + 1).shuffle(eval_rows)
        eval_rows = _take_eval(eval_rows, n_eval, f"xsum evaluation file (rows under {max_words} words)")
        pool_rows, removed = _disjoint(pool_rows, eval_all)
        note = (f"the {len(pool_rows) + removed} of {len(pool_all)} rows of {local[0].name} whose document + "
                f"summary have fewer than {max_words} words" + _overlap_note(removed, "document"))
        source = " + ".join(str(p) for p in local)
    else:
        rows = [ex for ex in xsum_hub_examples(_hub("xsum", split="train")) if short(ex)]
        random.Random(seed).shuffle(rows)
        eval_rows = _take_eval(rows, n_eval, f"xsum train split (rows under {max_words} words)")
        pool_rows, removed = _disjoint(rows[n_eval:], eval_rows)
        note = (f"{len(rows)} rows of xsum train under {max_words} words minus {n_eval} evaluation rows"
                + _overlap_note(removed, "document"))
        source = "hub:xsum/train"
    return TaskData("xsum", pool_rows, eval_rows, source, note)


def _load_babi(seed: int, n_eval: int, data_dir: str | None) -> TaskData:
    pool_path = next((p for f in BABI_POOL_FILES if (p := find_local(f"{BABI_DIR}/{f}", data_dir))), None)
    eval_path = find_local(f"{BABI_DIR}/{BABI_EVAL_FILE}", data_dir)
    to_example = lambda q: Example(q.x, q.answer)  # noqa: E731
    if pool_path is not None and eval_path is not None:
        pool_all, eval_all = ([to_example(q) for q in parse_babi(path.read_text(encoding="utf-8").splitlines(),
                                                                 source=str(path))]
                              for path in (pool_path, eval_path))
        eval_rows = eval_all[:]
        random.Random(seed + 1).shuffle(eval_rows)
        eval_rows = _take_eval(eval_rows, n_eval, f"bAbI evaluation file {eval_path.name}")
        # short stories repeat across the files: 16 of the 1,000 test inputs are also in en-10k train
        pool_rows, removed = _disjoint(pool_all, eval_all)
        note = f"the {len(pool_all)} questions of {pool_path.name}" + _overlap_note(removed, "question")
        source = f"{pool_path} + {eval_path}"
    else:  # the course's config; the hub's story format holds statements (type 0) and questions (type 1)
        questions = babi_hub_examples(_hub("babi_qa", "en-valid-10k-qa1", split="train"))
        random.Random(seed).shuffle(questions)
        eval_rows = _take_eval(questions, n_eval, "hub bAbI split")
        pool_rows, removed = _disjoint(questions[n_eval:], eval_rows)
        note = f"{len(questions)} questions minus {n_eval} evaluation questions" + _overlap_note(removed, "question")
        source = "hub:babi_qa/en-valid-10k-qa1"
    return TaskData("babi", pool_rows, eval_rows, source, note)


def load_task(name: str, seed: int = 0, n_eval: int = 50, data_dir: str | None = None,
              xsum_max_words: int = 150) -> TaskData:
    """Evaluation set (``n_eval`` examples, drawn with the seed) and pool (all the rest) of a task.
    For amazon, ``n_eval`` is split evenly over the 5 classes."""
    check_task(name)
    if name == "amazon":
        return _load_amazon(seed, max(1, n_eval // NUM_AMAZON_CLASSES), data_dir)
    if name == "xsum":
        return _load_xsum(seed, n_eval, data_dir, xsum_max_words)
    return _load_babi(seed, n_eval, data_dir)


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
            where = f" ({task.pool_note})" if task.pool_note else " in its smallest class"
            raise CS330Error(f"k={k} per class needs {k} reviews per class in the pool; the pool holds "
                             f"{smallest}{where}; choose a smaller k")
        chosen = [ex for c in range(NUM_AMAZON_CLASSES) for ex in rng.sample(by_class[c], k)]
    else:
        if k > len(task.pool):
            where = f" ({task.pool_note})" if task.pool_note else ""
            raise CS330Error(f"k={k} needs {k} {task.name} examples in the pool; the pool holds "
                             f"{len(task.pool)}{where}; choose a smaller k")
        chosen = rng.sample(task.pool, k)
    rng.shuffle(chosen)
    return chosen
