"""Data-parallel hw3 fine-tuning under torchrun (common/distributed.py in hw3_lm_fewshot/ft.py): 2
processes follow the single-process run's training losses step by step and give its scores, for a
classifier (mean over examples) and for a causal LM (mean over answer tokens, whose count differs
between the ranks' shares).

Real processes (gloo on the CPU, one thread each), as a user would start them. The MiniLM and
SmolLM2-tokenizer tests are skipped without the offline model packages; the GPT-2 one needs none.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from common.runlog import scalar_curve
from tests.test_distributed import Job, torchrun
from tests.test_distributed_hw1 import succeed
from tests.test_hw3_models import needs_minilm, needs_smollm2
from tests.test_hw3_unit import write_tiny_data

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "hw3_lm_fewshot" / "ft.py")
STEPS = 4
# a fixed number of steps (no early stop), fp32, batches of 4: 2 examples per rank
TINY = ["--batch_size", "4", "--max_steps", str(STEPS), "--min_steps", str(STEPS), "--eval_every", "2",
        "--device", "cpu", "--precision", "fp32", "--seed", "1"]


def start(nproc: int, argv: list[str], run_dir: Path) -> Job:
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    return Job([*launcher, SCRIPT, *argv, "--log_dir", str(run_dir)], run_dir.with_suffix(".log"))


def assert_same_training(single: Path, parallel: Path, tag: str) -> None:
    losses = [scalar_curve(run_dir, tag) for run_dir in (single, parallel)]
    assert sorted(losses[0]) == list(range(1, STEPS + 1)), losses[0]
    worst = max(abs(losses[0][s] - losses[1][s]) / abs(losses[0][s]) for s in losses[0])
    print(f"\nhw3 {tag}: 2 processes vs 1: max relative loss difference over {STEPS} steps {worst:.1e}")
    assert losses[0].keys() == losses[1].keys()
    assert worst <= 1e-5, (losses, worst)
    runs = [json.loads((run_dir / "results.json").read_text())["metrics"]["runs"] for run_dir in (single, parallel)]
    for key in ("score", "steps", "support_acc", "trainable_params"):
        assert [r[key] for r in runs[0]] == [r[key] for r in runs[1]], key
    assert [r["examples"] for r in runs[0]] == [r["examples"] for r in runs[1]]


def minilm_without_dropout(folder: Path) -> Path:
    """MiniLM with dropout off: dropout masks are drawn per process, so with dropout 2 processes
    equal 1 in distribution only, not step by step."""
    from hw3_lm_fewshot.models import resolve_model

    shutil.copytree(resolve_model("minilm").path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@needs_minilm
def test_two_processes_fine_tune_the_classifier_as_one(tmp_path):
    data = write_tiny_data(tmp_path / "data", per_class=6)
    model = minilm_without_dropout(tmp_path / "minilm")
    argv = [*TINY, "--model", str(model), "--dataset", "amazon", "--data_dir", str(data), "--k", "2",
            "--n_eval", "10", "--mode", "last"]
    single, parallel = tmp_path / "one", tmp_path / "two"
    succeed(start(1, argv, single), start(2, argv, parallel))
    assert_same_training(single, parallel, "train/loss_k2_last_s1")


def tiny_causal_lm(folder: Path) -> Path:
    """A randomly initialised 2-block Llama with SmolLM2's tokenizer: the LM loss path in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hw3_lm_fewshot.models import load_causal_lm, resolve_model

    _, tokenizer = load_causal_lm(resolve_model("smollm2"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_smollm2
def test_two_processes_fine_tune_a_causal_lm_as_one(tmp_path):
    data = write_tiny_data(tmp_path / "data")
    model = tiny_causal_lm(tmp_path / "tiny_llama")
    argv = [*TINY, "--model", str(model), "--dataset", "babi", "--data_dir", str(data), "--n_eval", "3", "--k", "4",
            "--mode", "lora4"]
    single, parallel = tmp_path / "one", tmp_path / "two"
    succeed(start(1, argv, single), start(2, argv, parallel))
    assert_same_training(single, parallel, "train/loss_k4_lora4_s1")


def gpt2_without_dropout(folder: Path, tmp_path_factory) -> Path:
    """The tiny random GPT-2 of tests/test_hw3_tiny_models.py (Conv1D projections, no pad token,
    absolute positions) with dropout off, for the reason given in :func:`minilm_without_dropout`."""
    from tests.test_hw3_tiny_models import tiny_model_folders

    shutil.copytree(tiny_model_folders(tmp_path_factory.getbasetemp() / "hw3_tiny_models")["gpt2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_two_processes_fine_tune_gpt2_with_lora_as_one(tmp_path, tmp_path_factory):
    """GPT-2's LoRA (fan_in_fan_out on Conv1D) under torchrun: no offline package needed."""
    data = write_tiny_data(tmp_path / "data")
    model = gpt2_without_dropout(tmp_path / "tiny_gpt2", tmp_path_factory)
    argv = [*TINY, "--model", str(model), "--dataset", "babi", "--data_dir", str(data), "--n_eval", "3", "--k", "4",
            "--mode", "lora4"]
    single, parallel = tmp_path / "one", tmp_path / "two"
    succeed(start(1, argv, single), start(2, argv, parallel))
    assert_same_training(single, parallel, "train/loss_k4_lora4_s1")
