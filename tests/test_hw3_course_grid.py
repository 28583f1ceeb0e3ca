"""The course preset's whole grid (``experiments.py --preset course``: bert-medium and GPT-2 XL from
the hub) end to end without the hub: the tiny random BERT (stored as prajjwal1/bert-medium is, with no
``model_type``) and GPT-2 of tests/test_hw3_tiny_models.py stand in through ``--model_map``, with one
seed, 5 evaluation examples and one fine-tuning step per run, on generated data large enough for the
preset's largest k (amazon 128 per class, bAbI 128, XSum 64)."""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import pytest

from hw3_lm_fewshot import experiments
from hw3_lm_fewshot.data import AMAZON_RELPATH, BABI_DIR, BABI_EVAL_FILE, BABI_POOL_FILES, XSUM_RELPATHS
from tests.test_hw3_model_checks import old_hub_layout
from tests.test_hw3_tiny_models import tiny_model_folders
from tests.test_hw3_unit import write_jsonl

WORDS = ["awful", "poor", "fine", "good", "great"]
NAMES = ["Anna", "Ben", "Carl", "Dora", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jo", "Kim", "Lea"]
PLACES = ["attic", "cellar", "porch", "roof", "barn", "garden"]


def babi_stories(names: list[str], count: int, rng: random.Random) -> str:
    """``count`` two-statement bAbI qa1 stories (one question each) in the original format."""
    lines = []
    for _ in range(count):
        first, second = rng.sample(names, 2)
        place, other = rng.sample(PLACES, 2)
        lines += [f"1 {first} went to the {place}.", f"2 {second} ran to the {other}.",
                  f"3 Where is {first}? \t{place}\t1"]
    return "\n".join(lines) + "\n"


def write_grid_data(root: Path) -> Path:
    rng = random.Random(0)
    write_jsonl(root / AMAZON_RELPATH, [{"text": f"review {i}: {WORDS[c]}, {rng.choice(WORDS)} box", "label": c}
                                        for c in range(5) for i in range(130)])
    for relpath, n in zip(XSUM_RELPATHS, (70, 8)):
        write_jsonl(root / relpath, [{"document": f"Article {i} of {Path(relpath).stem}: the weather was "
                                                  f"{rng.choice(WORDS)} today.", "summary": f"Weather {i}."}
                                     for i in range(n)])
    babi = root / BABI_DIR
    (babi / BABI_POOL_FILES[0]).parent.mkdir(parents=True)
    (babi / BABI_EVAL_FILE).parent.mkdir(parents=True)
    (babi / BABI_POOL_FILES[0]).write_text(babi_stories(NAMES[:8], 140, rng))
    (babi / BABI_EVAL_FILE).write_text(babi_stories(NAMES[8:], 8, rng))  # other names: no overlap with the pool
    return root


@pytest.mark.slow  # 64 runs: about 12 s of one core
def test_course_preset_runs_end_to_end_on_tiny_stand_ins(tmp_path, tmp_path_factory, capsys):
    models = tiny_model_folders(tmp_path_factory.getbasetemp() / "hw3_tiny_models")
    bert = old_hub_layout(models["bert"], tmp_path / "bert-medium")
    out = tmp_path / "grid"
    gc.freeze()  # the grid collects garbage after every run: over the objects made since, not all of torch
    try:
        experiments.main(["--preset", "course", "--model_map", f"bert-med={bert}", f"full={models['gpt2']}",
                          "--n_eval", "5", "--repeats", "1", "--max_steps", "1", "--data_dir",
                          str(write_grid_data(tmp_path / "data")), "--device", "cpu", "--threads", "1",
                          "--out_dir", str(out)])
    finally:
        gc.unfreeze()
    printed = capsys.readouterr().out
    listed = [c.name for part in experiments.PARTS
              for c in experiments.part_configs(part, experiments.PRESETS["course"])]
    assert f"{len(listed)} configurations, preset course" in printed and "not finished" not in printed
    assert all((out / name / "results.json").exists() for name in listed)
    report = (out / "results.md").read_text()
    assert all(f"### {part} (" in report for part in experiments.PARTS)
    saved = json.loads((out / "results.json").read_text())["results"]
    assert {part: len(runs) for part, runs in saved.items()} == {
        "amazon_ft": 18, "amazon_icl": 2, "babi_icl": 4, "babi_order": 5, "babi_ft": 16, "xsum_icl": 9,
        "xsum_ft": 6, "bf16": 2, "amazon_calib": 2, "babi_calib": 4}
    hparams = json.loads((out / "amazon_ft_bert-med_lora4_k128" / "hparams.json").read_text())
    assert hparams["model"] == str(bert) and hparams["max_steps"] == 1 and hparams["n_eval"] == 5


def test_model_map_and_stand_in_sizes_change_only_what_they_name(capsys):
    config = experiments.icl_config(experiments.PRESETS["course"], "babi_icl", "babi", "qa", 4)
    mapped = experiments.with_models(config, {"full": "/models/gpt2", "bert-med": "/models/bert"})
    assert mapped.name == config.name == "babi_icl_full_qa_k4"
    assert mapped.argv == [("/models/gpt2" if a == "full" else a) for a in config.argv]
    namespace = type("Args", (), {"n_eval": 5, "repeats": None, "max_steps": 3})()
    sizes = experiments.resized(experiments.PRESETS["course"], namespace)
    assert sizes["n_eval"] == {"amazon": 5, "babi": 5, "xsum": 5} and sizes["repeats"] == 3
    assert sizes["grid"]["amazon_ft"]["steps"] == (3, 1.0) and sizes["grid"]["babi_icl"] == {"k": [0, 1, 4, 16],
                                                                                               "prompts": ["qa"]}
    assert experiments.PRESETS["course"]["grid"]["amazon_ft"]["steps"] == (600, 1.0)  # the preset is left as it was
    with pytest.raises(SystemExit) as info:
        experiments.main(["--preset", "course", "--dry_run", "--model_map", "full"])
    assert info.value.code == 2 and "expected NAME=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        experiments.main(["--preset", "course", "--dry_run", "--model_map", "gpt2=/models/gpt2"])
    assert info.value.code == 2 and "--model_map names gpt2, which this grid does not run; its models are bert-med " \
        "(amazon fine-tuning) and full (the rest)" in capsys.readouterr().err
