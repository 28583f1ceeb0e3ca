"""hw3 pieces that need no language model: bAbI parsing, prompts, metrics, sampling, CLI errors."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from common.errors import CS330Error
from hw3_lm_fewshot.data import Example, TaskData, check_task, load_task, parse_babi, sample_support
from hw3_lm_fewshot.generation import PromptTruncatedWarning, first_sentence, truncate_left
from hw3_lm_fewshot.metrics import accuracy, exact_match, rouge1_f, score
from hw3_lm_fewshot.models import resolve_model
from hw3_lm_fewshot.prompts import PROMPTS, build_prompt, check_prompt

FIXTURE = Path(__file__).parent / "fixtures_hw3" / "babi_qa1_sample.txt"


def babi_fixture() -> list:
    return parse_babi(FIXTURE.read_text().splitlines())


def test_babi_parser_builds_story_up_to_each_question():
    questions = babi_fixture()
    assert [q.answer for q in questions] == ["attic", "cellar", "porch", "roof", "barn"]
    second = questions[1]
    # statements only: the earlier question "Where is Anna?" is not part of the input
    assert second.x == "Anna walked to the attic. Ben ran to the porch. Anna hopped to the cellar. Where is Anna?"
    assert second.supporting == (4,)
    assert dict(second.story_lines)[4] == "Anna hopped to the cellar."
    # the line id resets to 1: a new story that does not see the first one
    assert questions[3].x == "Carl drove to the barn. Dora flew to the roof. Carl strolled to the roof. Where is Carl?"


def test_babi_parser_rejects_malformed_question():
    with pytest.raises(CS330Error, match="3 tab-separated"):
        parse_babi(["1 Anna walked to the attic.", "2 Where is Anna?\tattic"])


def test_prompt_formats():
    support = [Example("Anna went to the attic. Where is Anna?", "attic")]
    query = "Ben went to the porch. Where is Ben?"
    qa = build_prompt("babi", "qa", support, query)
    assert qa == "Anna went to the attic. Where is Anna? In the attic.\n\nBen went to the porch. Where is Ben? In the"
    assert build_prompt("babi", "none", [], query) == query
    tldr = build_prompt("xsum", "tldr", [Example("Doc one.", "Sum one.")], "Doc two.")
    assert tldr == "Doc one. TL;DR: Sum one.\n\nDoc two. TL;DR:"
    custom = build_prompt("xsum", "custom", [], "Doc two.")
    assert custom.startswith("Summarize each article in one sentence.") and custom.endswith("Input: Doc two.\nOutput:")
    for prompt in PROMPTS:  # every format ends where the answer begins
        assert not build_prompt("xsum", prompt, support, query).endswith((" ", "\n"))


def test_unknown_names_give_clear_errors():
    with pytest.raises(CS330Error, match="choose one of: qa, none, tldr, custom"):
        check_prompt("chat")
    with pytest.raises(CS330Error, match="amazon, xsum, babi"):
        check_task("imdb")
    with pytest.raises(CS330Error, match="not a text-generation task"):
        build_prompt("amazon", "qa", [], "great product")
    for bad in ["no such model!", "./missing/model/folder"]:  # rejected before any hub request
        with pytest.raises(CS330Error, match="Choices: offline: minilm"):
            resolve_model(bad)


def test_metrics_on_hand_made_examples():
    assert accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == 0.75
    assert exact_match(["Bathroom.", " kitchen", "hall"], ["bathroom", "kitchen", "hallway"]) == pytest.approx(2 / 3)
    # stemming: "cats" matches "cat"; P = 3/3, R = 3/6 -> F = 2/3
    assert rouge1_f(["the cat sat"], ["the cats sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge1_f(["the cats sat on the mat"], ["the cats sat on the mat"]) == pytest.approx(1.0)
    with pytest.raises(CS330Error, match="2 predictions but 1 references"):
        accuracy([0, 1], [0])


def test_empty_generation_is_scored_not_crashed():
    assert first_sentence("") == ""
    assert score("babi", [""], ["garden"]) == 0.0
    assert score("xsum", ["", "a b"], ["a b", "a b"]) == pytest.approx(0.5)


def test_left_truncation_warns():
    ids = list(range(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert truncate_left(ids, 10) == ids  # nothing cut: no warning
    with pytest.warns(PromptTruncatedWarning, match="dropped 4 tokens from the left"):
        assert truncate_left(ids, 6) == [4, 5, 6, 7, 8, 9]


def toy_task(name: str, per_class: int = 3) -> TaskData:
    if name == "amazon":
        pool = [Example(f"review {c}-{i}", c) for c in range(5) for i in range(per_class)]
    else:
        pool = [Example(q.x, q.answer) for q in babi_fixture()]
    return TaskData(name, pool, pool[:2], "toy")


def test_support_sampling_is_balanced_seeded_and_bounded():
    amazon = toy_task("amazon")
    support = sample_support(amazon, 2, seed=1)
    assert sorted(ex.y for ex in support) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert support == sample_support(amazon, 2, seed=1)
    with pytest.raises(CS330Error, match="k = 4 per class is larger than the amazon pool"):
        sample_support(amazon, 4, seed=0)
    babi = toy_task("babi")
    assert len(sample_support(babi, 5, seed=0)) == 5
    with pytest.raises(CS330Error, match="k = 6 is larger than the babi pool"):
        sample_support(babi, 6, seed=0)


needs_mirror = pytest.mark.skipif(not os.environ.get("CS330_DATA_MIRROR"), reason="CS330_DATA_MIRROR is not set")


@needs_mirror
@pytest.mark.parametrize("name", ["amazon", "xsum", "babi"])
def test_real_tasks_load_with_disjoint_pool_and_eval(name):
    task = load_task(name, seed=0, n_eval=20)
    assert len(task.eval) == 20 and len(task.pool) >= 128
    assert not {ex.x for ex in task.pool} & {ex.x for ex in task.eval}
    assert load_task(name, seed=0, n_eval=20).eval == task.eval  # seeded


@needs_mirror
def test_cli_errors_exit_with_message(capsys):
    from hw3_lm_fewshot import ft, icl

    cases = [
        (ft.main, ["--mode", "lora0"], "unknown fine-tuning mode 'lora0'"),
        (ft.main, ["--dataset", "imdb", "--model", "minilm"], "unknown dataset 'imdb'"),
        (icl.main, ["--prompt", "chat"], "unknown prompt format 'chat'"),
        (icl.main, ["--dataset", "amazon"], "not a text-generation task"),
        (icl.main, ["--dataset", "babi", "--k", "100000"], "larger than the babi pool"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
