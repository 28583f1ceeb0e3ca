"""hw3 on the course's architectures, offline: tiny randomly initialised GPT-2, BERT and Llama models.

Each is the exact transformers class a hub name loads (``GPT2LMHeadModel``: ``Conv1D`` projections,
learned absolute positions, no pad token, a 1024-token context; ``BertForMaskedLM``: WordPiece,
``bert.encoder.layer``; ``LlamaForCausalLM`` with grouped-query attention, as SmolLM2), with small
widths and 4 blocks (4, not 2, so that ``first`` / ``middle`` / ``last`` are different blocks),
and a tokenizer trained here with ``tokenizers`` on the shipped bAbI fixture and the prompts'
words. They are saved with ``save_pretrained`` into a temporary folder, once per test session, and
loaded through ``--model PATH``: the path a hub name takes after its download.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

FIXTURE = Path(__file__).parent / "fixtures_hw3" / "babi_qa1_sample.txt"
# the words the prompts and the tiny data files use, so that common words are single tokens
PROMPT_WORDS = ["Review: awful poor fine good great broke love it. Stars: 1 2 3 4 5",
                "Article: the weather. TL;DR: Summary. Q: What is this article about? A: One-sentence summary:",
                "Answer each question with one word, the place. Input: Output: In the attic.",
                "review 0-1: Weather 2. Article 3 of validation_999 test_1000 about"]
WIDTH, BLOCKS, HEADS = 32, 4, 2
GPT2_CONTEXT = 1024  # gpt2 .. gpt2-xl


def corpus() -> list[str]:
    return [line.split(" ", 1)[1] for line in FIXTURE.read_text().splitlines() if line.strip()] + PROMPT_WORDS


def byte_level_bpe(special: list[str], vocab_size: int = 400):
    """A byte-level BPE (GPT-2's scheme: every byte string is encodable) trained on :func:`corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def word_piece():
    """A BERT WordPiece tokenizer ([CLS] x [SEP], lower-cased) trained on :func:`corpus`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=special,
                                                                      show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tokenizer


def build_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    end = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=byte_level_bpe([end]), bos_token=end, eos_token=end, unk_token=end)
    assert tokenizer.pad_token is None  # as GPT-2's
    # a large initial spread, so that positions and tokens change the greedy answers of a random model
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=GPT2_CONTEXT, n_embd=WIDTH, n_layer=BLOCKS,
                        n_head=HEADS, initializer_range=0.4, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    return save(GPT2LMHeadModel(config), tokenizer, folder)


def build_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(["<|endoftext|>", "<|im_start|>"]),
                                        bos_token="<|im_start|>", eos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                         num_hidden_layers=BLOCKS, num_attention_heads=HEADS, num_key_value_heads=1,
                         max_position_embeddings=2048, initializer_range=0.4, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save(LlamaForCausalLM(config), tokenizer, folder)


def build_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tokenizer = BertTokenizerFast(tokenizer_object=word_piece(), unk_token="[UNK]", sep_token="[SEP]",
                                  pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, num_hidden_layers=BLOCKS,
                        num_attention_heads=HEADS, intermediate_size=2 * WIDTH, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id, architectures=["BertForMaskedLM"])
    return save(BertForMaskedLM(config), tokenizer, folder)


def save(model: nn.Module, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


BUILDERS = {"gpt2": build_gpt2, "bert": build_bert, "llama": build_llama}


@functools.cache
def tiny_model_folders(root: Path) -> dict[str, Path]:
    """Every tiny model, built once per process under ``root`` (seeded: the same weights every time)."""
    from hw3_lm_fewshot.models import quiet_transformers

    quiet_transformers()  # no progress bars from save_pretrained
    folders = {}
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        folders[name] = build(root / name)
    return folders


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return tiny_model_folders(tmp_path_factory.getbasetemp() / "hw3_tiny_models")


# ---------------------------------------------------------------------------- loading through --model PATH
CAUSAL = ("gpt2", "llama")
BLOCK_LISTS = {"gpt2": "transformer.h", "bert": "bert.encoder.layer", "llama": "model.layers"}
HEADS_OF = {"gpt2": {"score.weight"}, "bert": {"classifier.weight", "classifier.bias"}, "llama": {"score.weight"}}
# every linear projection inside one block, the LoRA targets
PROJECTIONS = {"gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
               "bert": {"attention.self.query", "attention.self.key", "attention.self.value",
                        "attention.output.dense", "intermediate.dense", "output.dense"},
               "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}}
PARTIAL = {"first": (0, 1), "middle": (1, 2), "last": (2, 3)}  # of 4 blocks


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def load(folder: Path, classifier: bool):
    from hw3_lm_fewshot.models import load_model, resolve_model

    model, tokenizer = load_model(resolve_model(str(folder)), classifier, num_labels=5)
    return model.eval(), tokenizer


@pytest.mark.parametrize("arch", BUILDERS)
def test_a_saved_folder_loads_as_its_architecture(tiny_models, arch):
    from hw3_lm_fewshot.models import model_kind, resolve_model, transformer_blocks

    spec = resolve_model(str(tiny_models[arch]))
    assert model_kind(spec) == ("causal" if arch in CAUSAL else "encoder")
    model, tokenizer = load(tiny_models[arch], classifier=True)
    assert transformer_blocks(model)[0] == BLOCK_LISTS[arch] and model.config.num_labels == 5
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    if arch in CAUSAL:
        lm, lm_tokenizer = load(tiny_models[arch], classifier=False)
        assert type(lm).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]
        assert lm_tokenizer.pad_token == lm_tokenizer.eos_token  # GPT-2 ships none


# ---------------------------------------------------------------------------- fine-tuning modes
def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch, classifier", [("bert", True), ("gpt2", True), ("gpt2", False), ("llama", True),
                                              ("llama", False)])  # an encoder is fine-tuned as a classifier only
def test_partial_modes_train_exactly_their_two_blocks(tiny_models, arch, classifier):
    from hw3_lm_fewshot.modes import apply_mode

    model, _ = load(tiny_models[arch], classifier)
    head = HEADS_OF[arch] if classifier else set()
    every = {name for name, _ in model.named_parameters()}
    for mode, blocks in PARTIAL.items():
        apply_mode(model, mode, classifier)
        prefixes = tuple(f"{BLOCK_LISTS[arch]}.{i}." for i in blocks)
        expected = {name for name in every if name.startswith(prefixes)} | head
        assert trainable(model) == expected, mode
        assert len(expected - head) == 2 * len([n for n in every if n.startswith(f"{BLOCK_LISTS[arch]}.0.")])
    apply_mode(model, "all", classifier)
    assert trainable(model) == every


def projection(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or a GPT-2 Conv1D (which stores its weight as [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("rank", [4, 16])
def test_lora_adapts_every_projection_of_every_block(tiny_models, arch, rank):
    from peft.tuners.lora import LoraLayer

    from hw3_lm_fewshot.modes import apply_mode

    classifier = arch == "bert"
    model, _ = load(tiny_models[arch], classifier)
    base = {name: module for name, module in model.named_modules()}
    expected = {f"{BLOCK_LISTS[arch]}.{i}.{p}" for i in range(BLOCKS) for p in PROJECTIONS[arch]}
    wrapped = apply_mode(model, f"lora{rank}", classifier)
    adapted = {name.removeprefix("base_model.model."): module for name, module in wrapped.named_modules()
               if isinstance(module, LoraLayer)}
    assert set(adapted) == expected
    for name, layer in adapted.items():
        assert layer.r["default"] == rank and layer.scaling["default"] == 1.0  # lora_alpha = r
        assert layer.fan_in_fan_out == (arch == "gpt2"), name  # Conv1D weights are [in, out]
    lora = {n for n in trainable(wrapped) if "lora_" in n}
    assert trainable(wrapped) - lora == ({f"base_model.model.{h.replace('.', '.modules_to_save.default.', 1)}"
                                          for h in HEADS_OF[arch]} if classifier else set())
    assert sum(p.numel() for n, p in wrapped.named_parameters() if n in lora) == \
        sum(rank * sum(projection(base[name])) for name in expected)


@pytest.mark.parametrize("arch", BUILDERS)
def test_merged_lora_model_is_the_base_plus_its_adapters(tiny_models, arch):
    """With non-zero adapters, ``merge_and_unload`` gives W + B A (GPT-2: (B A)^T, Conv1D) and the
    same outputs as the adapted model."""
    from hw3_lm_fewshot.modes import apply_mode

    classifier = arch == "bert"
    model, tokenizer = load(tiny_models[arch], classifier)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapped = apply_mode(model, "lora4", classifier).eval()
    torch.manual_seed(1)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    batch = tokenizer(["Anna walked to the attic.", "Where is Anna?"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        adapted = wrapped(**batch).logits
        deltas = {name: (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).clone()
                  for name, layer in ((n.removeprefix("base_model.model."), m) for n, m in wrapped.named_modules()
                                      if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))}
        merged = wrapped.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-4, rtol=1e-4)
    weights = dict(merged.named_parameters())
    assert deltas and {f"{n}.weight" for n in deltas} <= set(before)
    for name, delta in deltas.items():  # delta is [out, in]
        expected = before[f"{name}.weight"] + (delta.T if arch == "gpt2" else delta)
        torch.testing.assert_close(weights[f"{name}.weight"], expected)


# ---------------------------------------------------------------------------- in-context learning
def babi_task():
    from hw3_lm_fewshot.data import Example, TaskData, parse_babi

    examples = [Example(q.x, q.answer) for q in parse_babi(FIXTURE.read_text().splitlines())]
    return TaskData("babi", examples[:3], examples[3:], "fixture")


def amazon_task():
    from hw3_lm_fewshot.data import Example, TaskData

    pool = [Example(f"review {c}: {word}", c) for c, word in enumerate(["awful", "poor", "fine", "good", "great"])]
    queries = ["Broke.", "It is fine, the box was dented when it came.", "Love it!", "poor"]
    return TaskData("amazon", pool, [Example(text, c) for c, text in zip((0, 2, 4, 1), queries)], "hand-made")


@pytest.mark.parametrize("arch", CAUSAL)
def test_batched_generation_after_a_cached_prefix_is_one_prompt_at_a_time(tiny_models, arch):
    """Left padding, the attention mask, position ids that skip the pads (GPT-2's learned absolute
    positions) and a copied prefix cache change nothing: the greedy answers of each whole prompt alone."""
    from hw3_lm_fewshot.generation import generate_batch, generate_greedy, prefix_cache
    from hw3_lm_fewshot.prompts import MAX_NEW_TOKENS, build_prompt, encode_queries, ordered_support

    model, tokenizer = load(tiny_models[arch], classifier=False)
    task = babi_task()
    for prompt in ("qa", "custom"):
        prefix_ids, queries, _ = encode_queries(tokenizer, model, task, 2, prompt, 0, True, 0, None)
        whole = [build_prompt("babi", prompt, ordered_support(task, 2, 0, 0), ex.x) for ex in task.eval]
        assert [prefix_ids + q for q in queries] == [tokenizer(text)["input_ids"] for text in whole]
        assert len({len(q) for q in queries}) > 1  # the batch is padded
        alone = [generate_greedy(model, tokenizer, text, MAX_NEW_TOKENS["babi"]) for text in whole]
        assert len(set(alone)) > 1 and all(alone)  # the random model's answers depend on the prompt
        cache = prefix_cache(model, prefix_ids)
        assert generate_batch(model, tokenizer, queries, MAX_NEW_TOKENS["babi"], prefix_ids, cache) == alone
        assert generate_batch(model, tokenizer, [prefix_ids + q for q in queries], MAX_NEW_TOKENS["babi"]) == alone
        assert generate_batch(model, tokenizer, queries, MAX_NEW_TOKENS["babi"], prefix_ids, cache) == alone


@pytest.mark.parametrize("arch", CAUSAL)
def test_label_likelihood_after_a_cached_prefix_is_the_full_forward(tiny_models, arch):
    from hw3_lm_fewshot.generation import _padded, next_token_logits, prefix_cache
    from hw3_lm_fewshot.icl import run_icl
    from hw3_lm_fewshot.prompts import encode_queries, label_candidates

    model, tokenizer = load(tiny_models[arch], classifier=False)
    task = amazon_task()
    shared, candidates = label_candidates(tokenizer, "amazon")
    assert [tokenizer.decode(shared + [c]).strip() for c in candidates] == ["1", "2", "3", "4", "5"]
    prefix_ids, queries, _ = encode_queries(tokenizer, model, task, 1, "qa", 0, True, 0, None)
    queries = [q + shared for q in queries]
    cached = next_token_logits(model, tokenizer, queries, prefix_ids, prefix_cache(model, prefix_ids))  # [4, V]
    with torch.inference_mode():
        alone = torch.stack([model(input_ids=torch.tensor([prefix_ids + q])).logits[0, -1] for q in queries])
    torch.testing.assert_close(cached, alone, atol=1e-4, rtol=1e-4)
    if arch == "gpt2":  # learned absolute positions: had the (masked) pads been counted, the scores would differ
        ids, mask = _padded(prefix_ids, queries, tokenizer.pad_token_id, "cpu")
        with torch.inference_mode():
            counted = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None]).logits
        assert (counted[:, -1] - alone).abs().max() > 1e-2
    result = run_icl(model, tokenizer, task, k=1, prompt="qa", seed=0, fixed_support=True)
    expected = alone[:, candidates].argmax(-1).tolist()
    assert result["predicted_label_counts"] == [expected.count(c) for c in range(5)]
    assert result["score"] == sum(p == ex.y for p, ex in zip(expected, task.eval)) / len(task.eval)


# ---------------------------------------------------------------------------- end to end
MODES = ["all", "first", "middle", "last", "lora4", "lora16"]


def ft_args(*extra: str):
    from hw3_lm_fewshot.ft import parse_args

    return parse_args(["--device", "cpu", "--max_steps", "2", "--min_steps", "2", "--batch_size", "2",
                                      "--eval_every", "1", *extra])


@pytest.mark.parametrize("arch, task", [("bert", "amazon"), ("gpt2", "amazon"), ("gpt2", "babi"), ("llama", "babi")])
def test_every_mode_fine_tunes_end_to_end(tiny_models, arch, task, monkeypatch):
    """Two training steps in every mode change exactly what the mode trains (LoRA: the adapters and a
    copy of the head only), then the evaluation scores the trained model."""
    from common.distributed import DataParallel, World
    from hw3_lm_fewshot import ft
    from hw3_lm_fewshot.metrics import score
    from hw3_lm_fewshot.models import resolve_model

    loaded: list[list[tuple[str, torch.Tensor, torch.Tensor]]] = []
    models: list = []

    def load_and_remember(*args, **kwargs):
        model, tokenizer = original_load(*args, **kwargs)
        loaded.append([(name, p, p.detach().clone()) for name, p in model.named_parameters()])
        models.append((model, tokenizer))
        return model, tokenizer

    original_load = ft.load_model
    monkeypatch.setattr(ft, "load_model", load_and_remember)
    spec, data = resolve_model(str(tiny_models[arch])), amazon_task() if task == "amazon" else babi_task()
    head = HEADS_OF[arch] if task == "amazon" else set()
    for mode in MODES:
        args = ft_args("--mode", mode, "--dataset", task)
        result = ft.run_ft(spec, data, k=1, seed=0, args=args)
        trained, tokenizer = models[-1]  # the score is the trained model's (LoRA: adapters inside it)
        parallel = DataParallel(World(device=torch.device("cpu")))
        again = ft.predict(trained, tokenizer, data, ft.batch_maker(tokenizer, task, args, parallel.device), args,
                           "fp32", parallel)
        assert result["steps"] == 2 and result["score"] == score(task, again, [ex.y for ex in data.eval]), mode
        changed = {name for name, p, before in loaded[-1] if not torch.equal(p, before)}
        every = {name for name, _, _ in loaded[-1]}
        if mode in PARTIAL:
            prefixes = tuple(f"{BLOCK_LISTS[arch]}.{i}." for i in PARTIAL[mode])
            assert changed == {n for n in every if n.startswith(prefixes)} | head, mode
        elif mode == "all":
            assert {n for n in every if n.startswith(BLOCK_LISTS[arch])} | head <= changed
        else:  # the base weights stay as loaded
            assert changed == set(), mode


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("task_name", ["amazon", "babi"])
def test_calibrated_labels_divide_by_the_content_free_input(tiny_models, arch, task_name):
    """--calibrate: the uncalibrated label scores are those of a plain label-scored run, and the
    calibrated choice is argmax p(label | query) / p(label | "N/A") under the same prompt."""
    from hw3_lm_fewshot.generation import prefix_cache
    from hw3_lm_fewshot.icl import CONTENT_FREE, label_probabilities, run_icl
    from hw3_lm_fewshot.prompts import (
        encode_queries,
        label_candidates,
        ordered_support,
        prompt_prefix,
        query_ids,
        task_labels,
    )

    model, tokenizer = load(tiny_models[arch], classifier=False)
    task = amazon_task() if task_name == "amazon" else babi_task()
    labels = task_labels(task)
    assert labels == ([0, 1, 2, 3, 4] if task_name == "amazon" else ["attic", "cellar", "porch"])
    result = run_icl(model, tokenizer, task, k=1, prompt="qa", seed=0, fixed_support=True, calibrate=True)
    prefix_ids, queries, _ = encode_queries(tokenizer, model, task, 1, "qa", 0, True, 0, None)
    cache = prefix_cache(model, prefix_ids)
    probs = label_probabilities(model, tokenizer, task, labels, queries, prefix_ids, cache, 8)  # [N, C]
    free_query = query_ids(tokenizer, task.name, "qa", CONTENT_FREE,
                           prompt_prefix(task.name, "qa", ordered_support(task, 1, 0, 0)))
    shared, candidates = label_candidates(tokenizer, task.name, labels)
    with torch.inference_mode():  # the content-free prompt read whole, no cache
        free = model(input_ids=torch.tensor([prefix_ids + free_query + shared])).logits[0, -1][candidates].softmax(-1)
    torch.testing.assert_close(torch.tensor(result["content_free_probs"]), free, atol=1e-5, rtol=1e-4)
    plain = probs.argmax(-1).tolist()
    calibrated = (probs / free).argmax(-1).tolist()
    assert result["uncalibrated_label_counts"] == [plain.count(c) for c in range(len(labels))]
    assert result["predicted_label_counts"] == [calibrated.count(c) for c in range(len(labels))]
    references = [ex.y for ex in task.eval]
    if task_name == "amazon":
        plain_run = run_icl(model, tokenizer, task, k=1, prompt="qa", seed=0, fixed_support=True)
        assert plain_run["score"] == result["uncalibrated_score"]
    assert result["score"] == sum(labels[c] == r for c, r in zip(calibrated, references)) / len(references)
    assert result["prompt"] == "qa+calibrated" and result["generated_tokens"] == 0


@pytest.mark.parametrize("arch", BUILDERS)
def test_a_padded_classification_batch_scores_each_review_as_alone(tiny_models, arch):
    """GPT-2 and Llama have no pad token (the eos stands in) and classify from the last real token:
    padding a short review to a long one's length must not change its logits."""
    from hw3_lm_fewshot.ft import classification_batch

    model, tokenizer = load(tiny_models[arch], classifier=True)
    examples = amazon_task().eval
    batch = classification_batch(tokenizer, examples, 100, "cpu")
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    with torch.inference_mode():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = torch.cat([model(**tokenizer(ex.x, return_tensors="pt")).logits for ex in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
