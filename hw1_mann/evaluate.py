"""Query accuracy over many tasks (with a 95% interval) and accuracy by instance number."""

from __future__ import annotations

import torch
from torch import nn

from common.stats import mean_ci95
from hw1_mann.data import SequenceBatch, SequenceSampler
from hw1_mann.models import query_loss


def task_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task query accuracy ``[B]`` from logits and labels ``[B, K+1, N, N]``."""
    return (logits[:, -1].argmax(-1) == labels[:, -1].argmax(-1)).float().mean(dim=1)


def batch_sizes(num_tasks: int, batch_size: int) -> list[int]:
    return [batch_size] * (num_tasks // batch_size) + ([num_tasks % batch_size] if num_tasks % batch_size else [])


@torch.no_grad()
def evaluate(model: nn.Module, sampler: SequenceSampler, num_tasks: int, batch_size: int,
             by_instance: bool = False) -> dict[str, float | list[float]]:
    """Mean query loss and accuracy over ``num_tasks`` fresh tasks, with the 95% interval of the accuracy.

    ``by_instance`` adds ``acc_by_instance[i]``: the accuracy on a class's (i+1)-th presentation, i.e.
    the query accuracy when only the first i support rows are kept (i = 0 is a guess, i = K is the
    usual query accuracy), as in the instance table of Santoro et al. (2016).
    """
    was_training = model.training
    model.eval()
    accuracies, losses, by_row = [], [], []
    for size in batch_sizes(num_tasks, batch_size):
        batch = sampler.sample(size)
        logits = model(*batch)
        accuracies.append(task_accuracies(logits, batch.labels))
        losses.append(query_loss(logits, batch.labels).item() * size)
        if by_instance:
            by_row.append(torch.stack([prefix_accuracy(model, batch, shots).sum()
                                       for shots in range(sampler.num_shot + 1)]))
    model.train(was_training)
    acc, ci95 = mean_ci95(torch.cat(accuracies).cpu().numpy())
    result: dict[str, float | list[float]] = {"acc": acc, "acc_ci95": ci95, "loss": sum(losses) / num_tasks}
    if by_instance:
        result["acc_by_instance"] = (torch.stack(by_row).sum(0) / num_tasks).tolist()
    return result


def prefix_accuracy(model: nn.Module, batch: SequenceBatch, shots: int) -> torch.Tensor:
    """Per-task query accuracy ``[B]`` with only the first ``shots`` support rows in the sequence."""
    rows = list(range(shots)) + [batch.images.shape[1] - 1]
    images, labels = batch.images[:, rows], batch.labels[:, rows]  # [B, shots+1, N, ...]
    return task_accuracies(model(images, labels), labels)
