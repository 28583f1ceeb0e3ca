"""hw3's checks on a model a user names, on the tiny models of tests/test_hw3_tiny_models.py and
config-only folders: an old hub config without ``model_type``, architectures that cannot be split
into blocks (refused from config.json alone, before any weights), a context limit that cannot hold
a query, truncated weights and a damaged de-quantized copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_hw3_tiny_models import load, tiny_model_folders


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return tiny_model_folders(tmp_path_factory.getbasetemp() / "hw3_tiny_models")  # built once per process


def old_hub_layout(folder: Path, target: Path) -> Path:
    """``folder`` as prajjwal1/bert-tiny and bert-medium are stored on the hub: config.json without
    ``model_type`` or ``architectures``, the tokenizer as vocab.txt alone."""
    import json
    import shutil

    target.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text())
    for key in ("model_type", "architectures", "transformers_version"):
        config.pop(key, None)
    (target / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "model.safetensors", target)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    (target / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)))
    return target


def test_a_bert_without_model_type_loads_by_its_name_as_transformers_4_did(tiny_models, tmp_path):
    """transformers 5 refuses a config.json without model_type (the course's bert-tiny / bert-medium);
    the name says BERT, so it loads as BERT, with the same weights and tokens as the modern folder."""
    from hw3_lm_fewshot.models import model_kind, resolve_model

    old = old_hub_layout(tiny_models["bert"], tmp_path / "prajjwal1-bert-tiny")
    assert model_kind(resolve_model(str(old))) == "encoder"
    (model, tokenizer), (reference, reference_tokenizer) = load(old, True), load(tiny_models["bert"], True)
    assert type(model) is type(reference) and transformer_blocks_of(model) == "bert.encoder.layer"
    text = "Anna walked to the attic. Where is Anna?"
    assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    # the head (and BERT's pooler: the saved model is a masked LM, which has none) start random
    body = {n: p for n, p in model.named_parameters() if not n.startswith(("classifier", "bert.pooler"))}
    for name, p in reference.named_parameters():
        if name in body:
            torch.testing.assert_close(body[name], p)
    from common.errors import CS330Error

    nameless = old_hub_layout(tiny_models["bert"], tmp_path / "mystery")
    with pytest.raises(CS330Error, match=r'has no "model_type" and its name contains no model type'):
        load(nameless, True)


def transformer_blocks_of(model: nn.Module) -> str:
    from hw3_lm_fewshot.models import transformer_blocks

    return transformer_blocks(model)[0]


def config_only(config, folder: Path) -> Path:
    """A model folder holding config.json and no weights: a check that passes on it read no weights."""
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("config, argv, message", [
    ("albert", ["--dataset", "amazon", "--mode", "last"],
     r"AlbertForSequenceClassification has no list of 4 modules \(its transformer blocks\): use --mode all"),
    ("albert", ["--dataset", "amazon", "--mode", "lora4"], "has no list of 4 modules"),
    ("t5", ["--dataset", "babi", "--mode", "lora4"], r"is an encoder-decoder \(t5\); hw3 takes an encoder"),
    ("bert", ["--dataset", "babi", "--mode", "last"], "is an encoder, but this task generates text"),
])
def test_an_architecture_without_blocks_is_refused_from_its_config_alone(tmp_path, capsys, config, argv, message):
    """ALBERT shares one block across its layers (no list of blocks to pick two from); T5 is an
    encoder-decoder. Refused in one line, exit 2, from config.json alone (the folders hold no weights)."""
    from transformers import AlbertConfig, BertConfig, T5Config

    from hw3_lm_fewshot import ft
    from tests.test_hw3_unit import write_tiny_data

    configs = {"albert": AlbertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                      intermediate_size=64, embedding_size=16),
               "t5": T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16),
               "bert": BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                  architectures=["BertForMaskedLM"])}
    folder = config_only(configs[config], tmp_path / config)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        ft.main(["--model", str(folder), *argv, "--k", "1", "--n_eval", "3", "--device", "cpu", "--threads", "1",
                 "--data_dir", str(write_tiny_data(tmp_path / "data")), "--log_dir", str(run_dir)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and not run_dir.exists()
    assert re.search(message, errors[0]), errors[0]


def test_blocks_and_projections_that_are_missing_are_named():
    from types import SimpleNamespace

    from common.errors import CS330Error
    from hw3_lm_fewshot.modes import check_mode_fits

    class Shared(nn.Module):  # one block applied n times, as ALBERT
        config = SimpleNamespace(num_hidden_layers=3)

    class NoProjections(nn.Module):
        config = SimpleNamespace(num_hidden_layers=2)

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])

    class TwoStacks(NoProjections):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # a name as short as "layers"

    check_mode_fits(Shared(), "all")
    with pytest.raises(CS330Error, match="Shared has no list of 3 modules"):
        check_mode_fits(Shared(), "first")
    check_mode_fits(NoProjections(), "middle")
    with pytest.raises(CS330Error, match=r"the blocks layers.N of NoProjections hold no nn.Linear or Conv1D"):
        check_mode_fits(NoProjections(), "lora4")
    with pytest.raises(CS330Error, match=r"several lists of 2 blocks \(layers, blocks\)"):
        check_mode_fits(TwoStacks(), "last")


# ---------------------------------------------------------------------------- --max_context (issue 28)
def test_a_context_limit_that_cannot_hold_a_query_is_refused_and_truncation_is_exact(tiny_models, tmp_path, capsys):
    """A limit below the longest bare query + its answer was accepted (the cut kept 76 tokens for a
    limit of 1, and all of them for a limit leaving 0); now refused before any run folder exists.
    A limit that holds the query cuts per-query prompts to exactly limit - answer tokens."""
    import warnings

    from common.errors import CS330Error
    from hw3_lm_fewshot import ft, icl
    from hw3_lm_fewshot.data import load_task
    from hw3_lm_fewshot.generation import encode_prompt, truncate_left
    from hw3_lm_fewshot.prompts import MAX_NEW_TOKENS, build_prompt
    from tests.test_hw3_unit import write_tiny_data

    data = write_tiny_data(tmp_path / "data")
    model, tokenizer = load(tiny_models["gpt2"], classifier=False)
    task = load_task("babi", n_eval=3, data_dir=str(data))
    need = MAX_NEW_TOKENS["babi"] + max(len(tokenizer(build_prompt("babi", "qa", [], ex.x))["input_ids"])
                                        for ex in task.eval)
    common = ["--model", str(tiny_models["gpt2"]), "--dataset", "babi", "--data_dir", str(data), "--n_eval", "3",
              "--k", "2", "--device", "cpu", "--threads", "1"]
    for main, extra in [(icl.main, []), (icl.main, ["--support", "fixed"]), (ft.main, ["--max_steps", "1"])]:
        for limit in (1, need - MAX_NEW_TOKENS["babi"], need - 1):
            run_dir = tmp_path / f"run_{limit}"
            with pytest.raises(SystemExit) as info:
                main([*common, *extra, "--max_context", str(limit), "--log_dir", str(run_dir)])
            err = capsys.readouterr().err
            assert info.value.code == 2 and f"needs {need} tokens with its answer" in err, err
            assert "raise --max_context" in err
            assert not run_dir.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warnings
        icl.main([*common, "--max_context", str(need), "--log_dir", str(tmp_path / "fits")])
    assert (tmp_path / "fits" / "results.json").exists()
    long_prompt = build_prompt("babi", "qa", task.pool[:3], task.eval[0].x)
    with pytest.warns(Warning, match="from the left"):
        cut = encode_prompt(tokenizer, model, long_prompt, MAX_NEW_TOKENS["babi"], need)
    assert cut == tokenizer(long_prompt)["input_ids"][-(need - MAX_NEW_TOKENS["babi"]):]
    for limit in (0, -5):
        with pytest.raises(CS330Error, match=f"leaves {limit} tokens"):
            truncate_left(list(range(10)), limit)


# ---------------------------------------------------------------------------- damaged weights (issue 28)
def test_truncated_weights_in_a_model_folder_are_one_line(tiny_models, tmp_path, capsys):
    import os
    import shutil

    from hw3_lm_fewshot import ft, icl
    from tests.test_hw3_unit import write_tiny_data

    folder = shutil.copytree(tiny_models["gpt2"], tmp_path / "gpt2")
    os.truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size // 2)
    data = write_tiny_data(tmp_path / "data")
    for main in (ft.main, icl.main):
        run_dir = tmp_path / "run"
        with pytest.raises(SystemExit) as info:
            main(["--model", str(folder), "--dataset", "babi", "--data_dir", str(data), "--n_eval", "3", "--k", "1",
                  "--device", "cpu", "--threads", "1", "--log_dir", str(run_dir)])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert info.value.code == 2 and len(errors) == 1 and not run_dir.exists()
        assert f"the weights of model '{folder}' in {folder} are damaged" in errors[0], errors[0]


def test_the_dequantized_copy_lives_under_data_dir_and_a_damaged_one_is_rebuilt(tiny_models, tmp_path, monkeypatch,
                                                                               capsys):
    """A GGUF model is de-quantized once into <--data_dir>/models/ with the md5 of its weights; a copy
    that fails it (here: truncated) is named and rebuilt. The GGUF reader is a stand-in (the tiny
    Llama), so only the caching is under test."""
    import os

    import transformers
    from transformers import LlamaForCausalLM

    from hw3_lm_fewshot import models

    reads: list[str] = []

    class FromGGUF:  # what AutoModelForCausalLM does with gguf_file=..., on the tiny Llama
        @staticmethod
        def from_pretrained(path, gguf_file=None, dtype=None, **kwargs):
            reads.append(gguf_file)
            return LlamaForCausalLM.from_pretrained(tiny_models["llama"] if gguf_file else path, **kwargs)

    tokenizer_from = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, gguf_file=None, **kw: tokenizer_from(tiny_models["llama"] if gguf_file else path))
    spec = models.ModelSpec("tiny", str(tiny_models["llama"]), "causal", gguf_file="tiny.gguf", version="1",
                            data_dir=str(tmp_path / "big_disk"))
    cache = tmp_path / "big_disk" / "models" / "tiny-1-f32"
    models._load_pretrained(FromGGUF, spec)
    assert reads == ["tiny.gguf"] and (cache / models.CACHE_CHECKSUM).exists()
    models._INTACT.clear()  # a new process
    models._load_pretrained(FromGGUF, spec)
    assert reads == ["tiny.gguf", None]  # from the copy
    os.truncate(cache / "model.safetensors", 1000)
    models._INTACT.clear()
    model, _ = models._load_pretrained(FromGGUF, spec)
    assert reads == ["tiny.gguf", None, "tiny.gguf"] and "is damaged or incomplete (checksum); rebuilding" in \
        capsys.readouterr().err
    assert models._cache_intact(cache) and isinstance(model, LlamaForCausalLM)
