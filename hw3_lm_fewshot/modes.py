"""What each fine-tuning mode of ft.py trains: ``all``; ``first`` / ``last`` / ``middle`` (two
transformer blocks, found generically for BERT, GPT-2 and Llama-style models, and a fresh
classification head); ``loraN`` (rank-N LoRA adapters, PEFT, on every linear projection inside the
blocks, base weights frozen)."""

from __future__ import annotations

import re

from torch import nn

from common.errors import CS330Error
from hw3_lm_fewshot.models import transformer_blocks

MODE_HELP = "all, first, last, middle, loraN (N = LoRA rank, e.g. lora4, lora16)"
_MODE = re.compile(r"^(all|first|last|middle)$|^lora([1-9]\d*)$")


def parse_mode(mode: str) -> tuple[str, int | None]:
    """``"lora16"`` -> ``("lora", 16)``; ``"last"`` -> ``("last", None)``; clear error otherwise."""
    match = _MODE.match(mode)
    if match is None:
        raise CS330Error(f"unknown fine-tuning mode {mode!r}; choose one of: {MODE_HELP}")
    return ("lora", int(match.group(2))) if match.group(2) else (mode, None)


def selected_blocks(num_blocks: int, mode: str) -> list[int]:
    """Indices of the two blocks a partial mode trains."""
    if num_blocks < 2:
        raise CS330Error(f"mode {mode!r} needs at least 2 transformer blocks, the model has {num_blocks}")
    middle = num_blocks // 2 - 1
    return {"first": [0, 1], "last": [num_blocks - 2, num_blocks - 1], "middle": [middle, middle + 1]}[mode]


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters outside the pre-trained body (``model.<base_model_prefix>``): the classification head."""
    prefix = model.base_model_prefix + "."
    return [name for name, _ in model.named_parameters() if not name.startswith(prefix)]


def lora_target_regex(model: nn.Module) -> str:
    """A PEFT ``target_modules`` regex matching every linear projection inside the transformer blocks."""
    from transformers.pytorch_utils import Conv1D

    blocks_name, blocks = transformer_blocks(model)
    relative = sorted({name for name, module in blocks[0].named_modules() if isinstance(module, (nn.Linear, Conv1D))})
    if not relative:
        raise CS330Error(f"the blocks {blocks_name}.N of {type(model).__name__} hold no nn.Linear or Conv1D "
                         "projection to put LoRA adapters on: choose another --mode")
    return rf"^{re.escape(blocks_name)}\.\d+\.({'|'.join(re.escape(name) for name in relative)})$"


def check_mode_fits(model: nn.Module | None, mode: str) -> None:
    """Fail now if ``model`` (a :func:`~hw3_lm_fewshot.models.model_skeleton`: no weights) has no blocks
    or projections that ``mode`` needs (None: a GGUF model, checked when it loads)."""
    kind, _ = parse_mode(mode)
    if model is None or kind == "all":
        return
    if kind == "lora":
        lora_target_regex(model)
    else:
        selected_blocks(len(transformer_blocks(model)[1]), kind)


def apply_mode(model: nn.Module, mode: str, classifier: bool) -> nn.Module:
    """Freeze/unfreeze (or wrap with LoRA) for ``mode``; returns the model to train."""
    kind, rank = parse_mode(mode)
    if kind == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if kind == "lora":
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers.pytorch_utils import Conv1D

        config = LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=lora_target_regex(model),
            task_type=TaskType.SEQ_CLS if classifier else TaskType.CAUSAL_LM,
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 stores weights transposed
        )
        return get_peft_model(model, config)  # freezes the base, trains adapters (+ the head for SEQ_CLS)
    blocks_name, blocks = transformer_blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for index in selected_blocks(len(blocks), kind):
        for p in blocks[index].parameters():
            p.requires_grad_(True)
    if classifier:
        for name, p in model.named_parameters():
            if name in head_parameter_names(model):
                p.requires_grad_(True)
    return model
