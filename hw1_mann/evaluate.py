"""Accuracy over many tasks (with a 95% interval) and accuracy by instance number, for both layouts:
the course's query row (``CourseBatch``) and Santoro et al.'s every-step answers (``SantoroBatch``)."""

from __future__ import annotations

import torch
from torch import nn

from common.distributed import DataParallel, World
from common.stats import mean_ci95
from hw1_mann.data import CourseBatch, SantoroBatch, TaskBatch, TaskSampler
from hw1_mann.models import query_loss, santoro_loss


def task_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-task query accuracy ``[B]`` from logits and labels ``[B, K+1, N, N]``."""
    return (logits[:, -1].argmax(-1) == labels[:, -1].argmax(-1)).float().mean(dim=1)


def batch_sizes(num_tasks: int, batch_size: int) -> list[int]:
    return [batch_size] * (num_tasks // batch_size) + ([num_tasks % batch_size] if num_tasks % batch_size else [])


def batch_scores(model: nn.Module, batch: TaskBatch,
                 by_instance: bool = False) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """Per-task accuracies ``[B]``, the summed loss (mean loss * B), and with ``by_instance`` the
    per-task accuracy on a class's 1st, 2nd, ... presentation summed over the tasks ``[I]``.

    Course layout: the accuracy is the query row's; the i-th presentation is the query after the first
    i-1 support rows (one forward each: i = 1 is a guess, i = K+1 the usual query accuracy).
    Santoro et al.'s layout: the accuracy is over every step, and the by-instance figures come from the
    same forward, grouping steps by ``batch.instance``.
    """
    size = batch.images.shape[0]
    logits = model(batch.images, batch.labels)
    if isinstance(batch, SantoroBatch):
        correct = (logits.argmax(-1) == batch.labels).float()  # [B, T]
        by_row = None
        if by_instance:
            steps = torch.nn.functional.one_hot(batch.instance - 1).float()  # [B, T, I]
            by_row = ((correct[..., None] * steps).sum(1) / steps.sum(1)).sum(0)  # [I]
        return correct.mean(1), santoro_loss(logits, batch.labels).item() * size, by_row
    by_row = None
    if by_instance:
        by_row = torch.stack([prefix_accuracy(model, batch, shots).sum() for shots in range(batch.images.shape[1])])
    return task_accuracies(logits, batch.labels), query_loss(logits, batch.labels).item() * size, by_row


@torch.no_grad()
def evaluate(model: nn.Module, sampler: TaskSampler, num_tasks: int, batch_size: int, by_instance: bool = False,
             parallel: DataParallel | None = None) -> dict[str, float | list[float]]:
    """Mean loss and accuracy over ``num_tasks`` fresh tasks, with the 95% interval of the accuracy;
    ``by_instance`` adds ``acc_by_instance[i]``, the accuracy on a class's (i+1)-th presentation, as in
    the instance table of Santoro et al. (2016) (see :func:`batch_scores`).

    Under torchrun (``parallel``) the batches are shared out over the ranks and their scores gathered
    back in batch order (``DataParallel.evaluate``), then combined as one process combines them: every
    figure is the single-process one, bit for bit.
    """
    parallel = parallel or DataParallel(World())  # one process
    travel = parallel.world.enabled  # scores go between ranks through the CPU

    def score(batch: TaskBatch) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        accuracies, loss_sum, by_row = batch_scores(model, batch, by_instance)
        return (accuracies.cpu(), loss_sum, by_row.cpu() if by_instance else None) if travel else \
            (accuracies, loss_sum, by_row)

    was_training = model.training
    model.eval()
    scores = parallel.evaluate((sampler.sample(size) for size in batch_sizes(num_tasks, batch_size)), score)
    model.train(was_training)
    acc, ci95 = mean_ci95(torch.cat([accuracies for accuracies, _, _ in scores]).cpu().numpy())
    result: dict[str, float | list[float]] = {"acc": acc, "acc_ci95": ci95,
                                               "loss": sum(loss for _, loss, _ in scores) / num_tasks}
    if by_instance:  # summed on the device, as one process sums them
        by_row = torch.stack([row for _, _, row in scores])  # [num_batches, I]
        result["acc_by_instance"] = (by_row.to(parallel.device) if travel else by_row).sum(0).div(num_tasks).tolist()
    return result


def prefix_accuracy(model: nn.Module, batch: CourseBatch, shots: int) -> torch.Tensor:
    """Per-task query accuracy ``[B]`` with only the first ``shots`` support rows in the sequence."""
    rows = list(range(shots)) + [batch.images.shape[1] - 1]
    images, labels = batch.images[:, rows], batch.labels[:, rows]  # [B, shots+1, N, ...]
    return task_accuracies(model(images, labels), labels)
