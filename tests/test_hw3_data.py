"""hw3's hub path against its offline copies: the rows ``datasets`` gives in the hub's schema (amazon_us_reviews,
xsum, babi_qa), built here as ``datasets.Dataset``s from the local files, become the Examples the local
files give, and load_task through the hub path (``_hub`` answering with them) splits the same rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hw3_lm_fewshot import data
from hw3_lm_fewshot.data import (
    AMAZON_FIELDS,
    AMAZON_RELPATH,
    BABI_DIR,
    BABI_POOL_FILES,
    XSUM_FIELDS,
    XSUM_RELPATHS,
    amazon_hub_examples,
    babi_hub_examples,
    parse_babi,
    read_jsonl,
    xsum_hub_examples,
)
from tests.test_hw3_unit import FIXTURE, write_tiny_data


def hub_babi(lines: list[str]):
    """The babi_qa schema: one row per story, its lines as parallel lists (type 0 statement, 1 question)."""
    import datasets

    stories: list[dict] = []
    for line in filter(str.strip, lines):
        line_id, _, text = line.partition(" ")
        if line_id == "1":
            stories.append({"id": [], "text": [], "answer": [], "supporting_ids": [], "type": []})
        question, _, rest = text.partition("\t")
        answer, _, supporting = rest.partition("\t")
        story = stories[-1]
        story["id"].append(line_id)
        story["text"].append(question.strip())
        story["answer"].append(answer)
        story["supporting_ids"].append(supporting.split())
        story["type"].append(1 if rest else 0)
    return datasets.Dataset.from_list([{"story": story} for story in stories])


def local_babi_file() -> Path:
    """The real en-10k qa1 train file when the mirror holds it (10k questions), else the fixture."""
    mirror = os.environ.get("CS330_DATA_MIRROR")
    real = Path(mirror or "/nonexistent") / BABI_DIR / BABI_POOL_FILES[0]
    return real if real.exists() else FIXTURE


def test_babi_hub_rows_are_the_local_questions():
    lines = local_babi_file().read_text().splitlines()
    local = [(q.x, q.answer) for q in parse_babi(lines)]
    hub = babi_hub_examples(hub_babi(lines))
    assert len(hub) == len(local) > 0 and [(ex.x, ex.y) for ex in hub] == local


def test_amazon_and_xsum_hub_rows_are_the_local_rows(tmp_path):
    import datasets

    root = write_tiny_data(tmp_path)
    reviews = [json.loads(line) for line in (root / AMAZON_RELPATH).read_text().splitlines()]
    hub = datasets.Dataset.from_list([{"review_body": r["text"], "star_rating": r["label"] + 1, "review_id": str(i)}
                                      for i, r in enumerate(reviews)])
    local = read_jsonl(root / AMAZON_RELPATH, AMAZON_FIELDS, data._amazon_example)
    assert amazon_hub_examples(hub) == local
    filtered = datasets.Dataset.from_list([{"review_body": "Sex and the City box set", "star_rating": 5}])
    assert amazon_hub_examples(filtered) == []  # the course leaves these out
    articles = root / XSUM_RELPATHS[0]
    rows = [json.loads(line) for line in articles.read_text().splitlines()]
    hub = datasets.Dataset.from_list([{**row, "id": str(i)} for i, row in enumerate(rows)])
    assert xsum_hub_examples(hub) == read_jsonl(articles, XSUM_FIELDS, data._xsum_example)


@pytest.mark.parametrize("task", ["amazon", "babi"])
def test_load_task_through_the_hub_path_splits_the_local_rows(tmp_path, monkeypatch, task):
    """No local files: load_task asks ``datasets`` (here answering with the offline copy in the hub's
    schema); the evaluation set and the pool are the local rows, disjoint."""
    import datasets

    root = write_tiny_data(tmp_path / "local", per_class=6)
    if task == "amazon":
        rows = [json.loads(line) for line in (root / AMAZON_RELPATH).read_text().splitlines()]
        hub = datasets.Dataset.from_list([{"review_body": r["text"], "star_rating": r["label"] + 1} for r in rows])
        local = set(read_jsonl(root / AMAZON_RELPATH, AMAZON_FIELDS, data._amazon_example))
    else:
        lines = FIXTURE.read_text().splitlines()
        hub, local = hub_babi(lines), {data.Example(q.x, q.answer) for q in parse_babi(lines)}
    asked: list[tuple] = []
    monkeypatch.setattr(data, "_hub", lambda *args, **kwargs: asked.append(args) or hub)
    monkeypatch.delenv("CS330_DATA_MIRROR", raising=False)
    loaded = data.load_task(task, seed=0, n_eval=5 if task == "amazon" else 2, data_dir=str(tmp_path / "empty"))
    assert asked == [("amazon_us_reviews", "Video_v1_00") if task == "amazon" else ("babi_qa", "en-valid-10k-qa1")]
    assert loaded.source.startswith("hub:") and set(loaded.eval) | set(loaded.pool) <= local
    assert not set(loaded.eval) & set(loaded.pool) and len(loaded.eval) == (5 if task == "amazon" else 2)
    assert len(loaded.eval) + len(loaded.pool) == len(local)
