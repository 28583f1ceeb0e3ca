"""hw3 pieces that need no language model: bAbI parsing, data files and pools, prompts, metrics,
sampling, and the scripts' flags, run folder and error paths (with a stand-in model)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from common.errors import CS330Error
from hw3_lm_fewshot import cli, ft, icl, results
from hw3_lm_fewshot.data import (
    AMAZON_RELPATH,
    BABI_DIR,
    BABI_EVAL_FILE,
    BABI_POOL_FILES,
    XSUM_RELPATHS,
    Example,
    TaskData,
    check_task,
    load_task,
    parse_babi,
    sample_support,
)
from hw3_lm_fewshot.generation import PromptTruncatedWarning, first_sentence, truncate_left
from hw3_lm_fewshot.metrics import accuracy, exact_match, rouge1_f, score
from hw3_lm_fewshot.models import resolve_model
from hw3_lm_fewshot.prompts import PROMPTS, build_prompt, check_prompt, prompt_prefix, prompt_query

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
    custom = build_prompt("xsum", "custom", [Example("Doc one.", "Sum one.")], "Doc two.")
    assert custom == "Article: Doc one.\n\nOne-sentence summary: Sum one.\n\nArticle: Doc two.\n\nOne-sentence summary:"
    assert build_prompt("babi", "custom", [], query).startswith("Answer each question with one word, the place.\n\n")
    review = build_prompt("amazon", "qa", [Example("Broke in a day.", 0)], "Love it.")
    assert review == "Review: Broke in a day.\nStars: 1\n\nReview: Love it.\nStars:"  # labels are stars - 1
    for prompt in PROMPTS:  # every format ends where the answer begins
        assert not build_prompt("xsum", prompt, support, query).endswith((" ", "\n"))


def test_prompt_is_prefix_then_query():
    """The shared prefix (support examples) and the query make exactly the whole prompt."""
    support = [Example("Anna went to the attic. Where is Anna?", "attic"), Example("Ben ran. Where is Ben?", "porch")]
    for task, prompt in [("babi", "qa"), ("babi", "custom"), ("xsum", "tldr"), ("xsum", "custom"), ("babi", "none")]:
        for chosen in (support, support[:1], []):
            prefix = prompt_prefix(task, prompt, chosen)
            whole = prefix + prompt_query(task, prompt, "Cat went home. Where is Cat?", prefix)
            assert whole == build_prompt(task, prompt, chosen, "Cat went home. Where is Cat?")


def test_unknown_names_give_clear_errors():
    with pytest.raises(CS330Error, match="choose one of: qa, none, tldr, custom"):
        check_prompt("chat")
    with pytest.raises(CS330Error, match="amazon, xsum, babi"):
        check_task("imdb")
    with pytest.raises(CS330Error, match="amazon in-context learning has one format, qa"):
        build_prompt("amazon", "tldr", [], "great product")
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
    with pytest.raises(CS330Error, match="k=4 per class needs 4 reviews per class in the pool; the pool holds 3"):
        sample_support(amazon, 4, seed=0)
    babi = toy_task("babi")
    assert len(sample_support(babi, 5, seed=0)) == 5
    with pytest.raises(CS330Error, match="k=6 needs 6 babi examples in the pool; the pool holds 5"):
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
        (icl.main, ["--dataset", "amazon", "--prompt", "tldr"], "amazon in-context learning has one format"),
        (icl.main, ["--orderings", "2"], "--orderings permutes a fixed support set: add --support fixed"),
        (icl.main, ["--dataset", "babi", "--k", "100000"], "k=100000 needs 100000 babi examples in the pool"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- a tiny data folder
BABI_EVAL_SAMPLE = """1 Anna walked to the attic.
2 Ben ran to the porch.
3 Where is Anna? \tattic\t1
1 Eve went to the kitchen.
2 Finn went to the garden.
3 Where is Eve? \tkitchen\t1
4 Eve moved to the hall.
5 Where is Eve? \thall\t4
"""


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_tiny_data(root: Path, per_class: int = 4) -> Path:
    """A --data_dir with every hw3 file, small: amazon ``per_class`` reviews per class, xsum 6 + 4
    rows, bAbI pool = the 5-question fixture, evaluation = 3 questions (the first one also in the pool)."""
    write_jsonl(root / AMAZON_RELPATH, [{"text": f"review {c}-{i}: {['awful', 'poor', 'fine', 'good', 'great'][c]}",
                                         "label": c} for c in range(5) for i in range(per_class)])
    for relpath, n in zip(XSUM_RELPATHS, (6, 4)):
        write_jsonl(root / relpath, [{"document": f"Article {i} of {Path(relpath).stem} about the weather.",
                                      "summary": f"Weather {i}."} for i in range(n)])
    babi = root / BABI_DIR
    (babi / BABI_POOL_FILES[0]).parent.mkdir(parents=True)
    (babi / BABI_EVAL_FILE).parent.mkdir(parents=True)
    shutil.copy(FIXTURE, babi / BABI_POOL_FILES[0])
    (babi / BABI_EVAL_FILE).write_text(BABI_EVAL_SAMPLE)
    return root


# ---------------------------------------------------------------------------- data files: errors name file + line
@pytest.mark.parametrize("relpath, lines, message", [
    (AMAZON_RELPATH, ['{"text": "ok", "label": 1}', '{"text": "broken'],
     r"amazon_review_full_test_999.jsonl line 2: not valid JSON \(Unterminated string starting at: column 10\)"),
    (AMAZON_RELPATH, ['{"text": "ok", "label": 1}', "", '{"text": "no label"}'],
     r"amazon_review_full_test_999.jsonl line 3: missing field 'label' \(every row needs text, label\)"),
    (AMAZON_RELPATH, ['{"text": "ok", "label": 7}'], r"line 1: field 'label' must be an integer 0..4"),
    (AMAZON_RELPATH, ['["text", 1]'], "line 1: expected a JSON object with the fields text, label, got a list"),
    (XSUM_RELPATHS[1], ['{"document": "a", "summary": "b"}', '{"document": "only a document"}'],
     r"test_1000.jsonl line 2: missing field 'summary' \(every row needs document, summary\)"),
    (XSUM_RELPATHS[0], ['{"document": "a", "summary": null}'], "validation_999.jsonl line 1: field 'summary' must be"),
])
def test_broken_jsonl_names_file_line_and_problem(tmp_path, relpath, lines, message):
    data = write_tiny_data(tmp_path)
    (data / relpath).write_text("\n".join(lines) + "\n")
    task = "amazon" if relpath == AMAZON_RELPATH else "xsum"
    with pytest.raises(CS330Error, match=message) as info:
        load_task(task, n_eval=1, data_dir=str(data))
    assert str(data / relpath) in str(info.value)


def test_broken_babi_file_is_named(tmp_path):
    data = write_tiny_data(tmp_path)
    (data / BABI_DIR / BABI_EVAL_FILE).write_text("1 Anna walked.\n2 Where is Anna?\tattic\n")
    with pytest.raises(CS330Error, match=r"qa1_single-supporting-fact_test.txt line 2: a question needs 3"):
        load_task("babi", n_eval=1, data_dir=str(data))


# ---------------------------------------------------------------------------- pools: all the data, no cap
def test_pool_is_all_data_not_evaluated_and_k_limit_is_exact(tmp_path):
    data = str(write_tiny_data(tmp_path, per_class=6))
    amazon = load_task("amazon", seed=0, n_eval=10, data_dir=data)  # 2 evaluation reviews per class
    assert len(amazon.eval) == 10 and len(amazon.pool) == 20
    assert not {ex.x for ex in amazon.pool} & {ex.x for ex in amazon.eval}
    assert load_task("amazon", seed=0, n_eval=10, data_dir=data).eval == amazon.eval  # seeded
    assert load_task("amazon", seed=1, n_eval=10, data_dir=data).eval != amazon.eval
    assert len(sample_support(amazon, 4, seed=0)) == 20  # the whole pool fits
    with pytest.raises(CS330Error, match=r"^k=5 per class needs 5 reviews per class in the pool; the pool holds 4 "
                                         r"\(6 in the smallest class minus 2 evaluation reviews\)"):
        sample_support(amazon, 5, seed=0)

    babi = load_task("babi", seed=0, n_eval=2, data_dir=data)
    # the evaluation file's first question is also in the pool file: it leaves the pool
    assert len(babi.pool) == 4 and "Anna walked to the attic. Ben ran to the porch. Where is Anna?" not in {
        ex.x for ex in babi.pool}
    with pytest.raises(CS330Error, match=r"k=5 needs 5 babi examples in the pool; the pool holds 4 \(the 5 questions "
                                         r"of qa1_single-supporting-fact_train.txt minus 1 whose input is also an "
                                         r"evaluation question\)"):
        sample_support(babi, 5, seed=0)
    with pytest.raises(CS330Error, match="--n_eval 4: the bAbI evaluation file .* holds only 3 examples"):
        load_task("babi", n_eval=4, data_dir=data)

    xsum = load_task("xsum", seed=0, n_eval=3, data_dir=data)
    assert len(xsum.pool) == 6 and len(xsum.eval) == 3
    with pytest.raises(CS330Error, match=r"the pool holds 6 \(the 6 of 6 rows of validation_999.jsonl"):
        sample_support(xsum, 7, seed=0)


# ---------------------------------------------------------------------------- the scripts' structure and flags
def test_scripts_do_not_import_scripts():
    scripts = {"ft", "icl", "bench", "experiments"}
    for name in ("ft", "icl", "bench"):
        tree = ast.parse((Path(cli.__file__).parent / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {f"hw3_lm_fewshot.{s}" for s in scripts} & imported, name


@pytest.mark.parametrize("module", [ft, icl])
def test_no_resume_flag(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.build_parser().parse_args(["--resume"])
    assert info.value.code == 2 and "unrecognized arguments: --resume" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--early_stop_acc", "1.5", "must be between 0 and 1"),
    ("--early_stop_acc", "nan", "must be a finite number"),
    ("--lr", "inf", "must be a finite number"),
    ("--lr", "0", "must be a positive number"),
    ("--min_steps", "-1", "must be a non-negative integer"),
    ("--threads", "0", "must be a positive integer"),
])
def test_numeric_flags_are_validated(flag, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        ft.build_parser().parse_args([flag, value])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_default_run_folder_is_under_the_homework_name(monkeypatch, tmp_path):
    monkeypatch.setenv("CS330_RUNS_DIR", str(tmp_path))
    args = icl.build_parser().parse_args([])
    assert cli.run_dir_for(args, "icl_x") == tmp_path / "hw3_lm_fewshot" / "icl_x"
    args = icl.build_parser().parse_args(["--log_dir", str(tmp_path / "mine")])
    assert cli.run_dir_for(args, "icl_x") == tmp_path / "mine"


# ---------------------------------------------------------------------------- main with a stand-in model
class StandIn(nn.Module):
    """Takes the place of a language model where main only moves it to the device."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A tiny data dir, a model folder (resolve_model accepts any folder) whose load is a stand-in,
    and run folders under tmp_path."""
    monkeypatch.setenv("CS330_RUNS_DIR", str(tmp_path / "runs"))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for module in (ft, icl):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: (StandIn(), None))
        monkeypatch.setattr(module, "model_skeleton", lambda *a, **k: None)  # no config to read
        monkeypatch.setattr(module, "check_queries_fit", lambda *a, **k: None)  # no tokenizer or context
    return {"data": write_tiny_data(tmp_path / "data"), "model": model_dir, "runs": tmp_path / "runs"}


def fake_icl_result(calls: list):
    def run(model, tokenizer, task, k, prompt, seed, max_context=None, precision="fp32", **options):
        calls.append(precision)
        return {"method": "icl", "prompt": prompt, "k": k, "seed": seed, "score": 0.5, "seconds": 0.0}
    return run


@pytest.mark.parametrize("extra, precision, why", [
    ([], "fp32", "bf16 autocast measured slower than fp32 for hw3's models on CPU (hw3 README)"),
    (["--bf16"], "bf16", "as requested"),
])
def test_icl_main_records_resolved_precision(offline, monkeypatch, capsys, extra, precision, why):
    calls: list = []
    monkeypatch.setattr(icl, "run_icl", fake_icl_result(calls))
    icl.main(["--model", str(offline["model"]), "--data_dir", str(offline["data"]), "--n_eval", "2", "--k", "0,1",
              "--device", "cpu", "--threads", "1", *extra])
    out = capsys.readouterr().out
    assert f"precision: {precision} ({why})" in out.splitlines()
    (run_dir,) = (offline["runs"] / "hw3_lm_fewshot").iterdir()
    assert run_dir.name.endswith(f"_prec{precision}_seed0")
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["hparams"]["precision"] == precision and calls == [precision, precision]


@pytest.mark.parametrize("module", [ft, icl])
def test_ctrl_c_says_nothing_was_saved(offline, monkeypatch, capsys, module):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run_ft" if module is ft else "run_icl", interrupt)
    run_dir = offline["runs"] / "mine"
    with pytest.raises(SystemExit) as info:
        module.main(["--model", str(offline["model"]), "--data_dir", str(offline["data"]), "--dataset", "babi",
                     "--n_eval", "2", "--k", "1", "--device", "cpu", "--threads", "1", "--log_dir", str(run_dir)])
    err = capsys.readouterr().err
    assert info.value.code == 130
    assert "interrupted; nothing was saved (results.json is written at the end of a run)" in err
    assert "checkpoint" not in err and not (run_dir / "results.json").exists()


def test_busy_run_folder_is_refused_until_its_holder_dies(offline, monkeypatch, capsys):
    """ft.py and icl.py lock their run folder: a run on a folder another process holds is refused
    with that process's id; once the holder is killed (SIGKILL) the kernel drops the lock."""
    run_dir = offline["runs"] / "busy"
    hold = ("import sys, time; from common.run import RunFolder; run = RunFolder.open(sys.argv[1], {}); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], cwd=Path(cli.__file__).parents[1],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(ft, "run_ft", lambda *a, **k: pytest.fail("trained on a busy folder"))
        calls: list = []
        monkeypatch.setattr(icl, "run_icl", fake_icl_result(calls))
        argv = ["--model", str(offline["model"]), "--data_dir", str(offline["data"]), "--dataset", "babi",
                "--n_eval", "2", "--k", "1", "--device", "cpu", "--threads", "1", "--log_dir", str(run_dir)]
        for main in (ft.main, icl.main):
            with pytest.raises(SystemExit) as info:
                main(argv)
            assert info.value.code == 2
            assert f"{run_dir} is in use by another run (process {holder.pid})" in capsys.readouterr().err
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        icl.main(argv)
        assert calls == ["fp32"] and (run_dir / "results.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_failures_before_training_leave_no_run_folder(tmp_path, capsys):
    data = write_tiny_data(tmp_path / "data")
    no_model_type = tmp_path / "broken_model"
    no_model_type.mkdir()
    (no_model_type / "config.json").write_text("{}")
    run_dir = tmp_path / "run"
    common = ["--data_dir", str(data), "--device", "cpu", "--threads", "1", "--log_dir", str(run_dir), "--n_eval", "5"]
    cases = [
        (ft.main, ["--model", str(no_model_type), "--k", "1", *common], 'has no "model_type"'),
        (icl.main, ["--model", str(no_model_type), "--k", "1", *common, "--n_eval", "2"], 'has no "model_type"'),
        (ft.main, ["--model", str(no_model_type), "--k", "4", *common], "k=4 per class needs 4 reviews"),
        (ft.main, ["--model", str(no_model_type), "--k", "1", *common, "--n_eval", "30"],
         "6 evaluation reviews per class, but the smallest class has 4"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
        assert not run_dir.exists()


@needs_mirror
def test_real_pools_hold_all_the_data():
    babi = load_task("babi", seed=0, n_eval=50)
    assert len(babi.pool) > 9900  # en-10k: 10,000 questions, less the few whose input is an evaluation input
    amazon = load_task("amazon", seed=0, n_eval=50)
    assert len(sample_support(amazon, 169, seed=0)) == 5 * 169
    with pytest.raises(CS330Error, match=r"the pool holds 169 \(179 in the smallest class minus 10 evaluation"):
        sample_support(amazon, 170, seed=0)


def test_summary_is_mean_and_sample_std_per_method_and_k():
    runs = [{"method": "ft", "mode": "lora16", "k": 8, "score": s, "seconds": 1.0, "support_acc": a, "steps": 10}
            for s, a in ((0.2, 1.0), (0.4, 0.5), (0.6, float("nan")))]
    runs.append({"method": "icl", "prompt": "qa", "k": 8, "score": 0.3, "seconds": 2.0})
    ft_row, icl_row = sorted(results.summarize(runs), key=lambda r: r["method"])
    assert ft_row["mean"] == pytest.approx(0.4) and ft_row["std"] == pytest.approx(0.2)  # ddof 1
    assert ft_row["support_acc"] == pytest.approx(0.75) and ft_row["repeats"] == 3  # NaN (k = 0) left out
    assert icl_row["std"] == 0.0 and icl_row["support_acc"] is None and icl_row["variant"] == "qa"


def test_contextual_calibration_on_known_numbers():
    """Zhao et al. 2021: p / p_cf, renormalised. A prompt that favours label 0 for every input (the
    content-free input too) no longer wins every query."""
    from hw3_lm_fewshot.icl import contextual_calibration

    calibrated = contextual_calibration(torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(calibrated, torch.tensor([[1.2, 1.2, 0.4]]) / 2.8)
    biased = torch.tensor([[0.7, 0.3], [0.9, 0.1]])  # label 0 chosen for both
    assert biased.argmax(-1).tolist() == [0, 0]
    after = contextual_calibration(biased, torch.tensor([0.8, 0.2]))  # [0.875, 1.5] and [1.125, 0.5], renormalised
    torch.testing.assert_close(after, torch.tensor([[0.875 / 2.375, 1.5 / 2.375], [1.125 / 1.625, 0.5 / 1.625]]))
    assert after.argmax(-1).tolist() == [1, 0]
    uniform = contextual_calibration(biased, torch.tensor([0.5, 0.5]))  # a content-free input with no bias
    torch.testing.assert_close(uniform, biased)


def test_calibrate_needs_a_fixed_support_set_and_labels(capsys):
    for extra, message in [(["--dataset", "xsum", "--support", "fixed"], "--dataset amazon or babi"),
                           (["--dataset", "babi"], "it needs --support fixed")]:
        with pytest.raises(SystemExit) as info:
            icl.main(["--calibrate", "--k", "1", "--device", "cpu", *extra])
        assert info.value.code == 2 and message in capsys.readouterr().err
