"""ProtoNet and MAML as small modules with one API: ``forward(episodes) -> (loss, metrics)``.

The meta-training loop (``training.py``) only sees that API, so both scripts share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from common.omniglot import Episodes
from hw2_protonet_maml.models import ProtoNetEmbedding, init_maml_params, maml_forward, proto_logits


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy per task: logits ``[..., M, N]``, labels ``[..., M]`` -> ``[...]``."""
    return (logits.argmax(-1) == labels).float().mean(-1)


class ProtoNet(nn.Module):
    """Prototypical networks (Snell et al. 2017).

    ``eval_bn``: ``"batch"`` normalizes with the statistics of the images at hand (transductive,
    as the course code did, because it never switched the network to eval mode); ``"running"``
    uses the running statistics gathered during training (inductive: one query image's
    prediction does not depend on the others).
    """

    def __init__(self, hidden_channels: int = 64, eval_bn: str = "batch") -> None:
        super().__init__()
        self.embedding = ProtoNetEmbedding(hidden_channels=hidden_channels)
        self.eval_bn = eval_bn
        # With batch statistics, evaluation runs one task per forward so tasks never mix.
        self.per_task_eval = eval_bn == "batch"

    def forward(self, episodes: Episodes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Query loss and per-task metrics (``[B]`` tensors) of a meta-batch."""
        support, support_labels, query, query_labels = episodes
        batch, num_support = support.shape[:2]
        num_way = int(support_labels.max()) + 1
        self.embedding.train(self.training or self.eval_bn == "batch")
        # One pass over every image of every task: cheaper than a pass per task, and during
        # training the batch-norm statistics then come from the whole meta-batch.
        images = torch.cat([support.flatten(0, 1), query.flatten(0, 1)])  # [B*(NK+NQ), 1, S, S]
        emb = self.embedding(images).float()  # distances in fp32 even under bf16 autocast
        support_emb = emb[: batch * num_support].view(batch, num_support, -1)  # [B, N*K, D]
        query_emb = emb[batch * num_support:].view(batch, query.shape[1], -1)  # [B, N*Q, D]
        logits = proto_logits(support_emb, support_labels, query_emb, num_way)  # [B, N*Q, N]
        loss = F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())
        with torch.no_grad():
            support_acc = accuracy(proto_logits(support_emb, support_labels, support_emb, num_way), support_labels)
            query_acc = accuracy(logits, query_labels)
        return loss, {"loss": loss.detach(), "support_acc": support_acc, "query_acc": query_acc}


class MAML(nn.Module):
    """Model-agnostic meta-learning (Finn et al. 2017) on the functional conv net.

    The inner loop uses ``torch.func.grad`` on the functional network, second order by default:
    ``loss.backward()`` differentiates through the inner gradient steps; ``first_order=True``
    detaches the inner gradients (FOMAML).

    Tasks of a meta-batch run one after another by default. ``vmap_tasks=True`` instead vmaps the
    per-task computation over the meta-batch (one grouped convolution for all tasks). On the 2-core
    CPU this repo was measured on, vmap was about 2x *slower* than the loop (the per-task
    activations fit in cache, the batched ones do not; see ``bench.py`` and the README), so the
    loop is the default.

    Speed without changing the maths: the query pass (75 of the 80 images a task sees, and the part
    that needs only a first-order backward) can be ``torch.compile``-d (``compile_query``), which
    fuses batch norm and ReLU around the convolutions. Under bfloat16 autocast only the query pass
    runs in bf16: the inner loop is always float32, because bf16 there is amplified by the second-
    order term (14% relative error in the meta-gradient against 1.5% with an fp32 inner loop,
    measured by ``bench.py``).
    """

    def __init__(self, num_way: int, num_inner_steps: int = 1, inner_lr: float = 0.4,
                 learn_inner_lrs: bool = False, first_order: bool = False, hidden_channels: int = 64,
                 conv_stride: int = 1, seed: int = 0, vmap_tasks: bool = False,
                 compile_query: bool = False) -> None:
        super().__init__()
        init = init_maml_params(num_way, hidden_channels=hidden_channels,
                                generator=torch.Generator().manual_seed(seed))
        self.meta_params = nn.ParameterDict({k: nn.Parameter(v) for k, v in init.items()})
        # One learned rate per parameter tensor; frozen at inner_lr unless learn_inner_lrs.
        self.inner_lrs = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(inner_lr), requires_grad=learn_inner_lrs) for k in init})
        self.num_way = num_way
        self.num_inner_steps = num_inner_steps
        self.eval_num_inner_steps = num_inner_steps
        self.first_order = first_order
        self.conv_stride = conv_stride
        self.vmap_tasks = vmap_tasks
        if compile_query and vmap_tasks:
            raise ValueError("compile_query applies to the per-task loop; it cannot be combined with vmap_tasks")
        # Only the query pass is compiled: the inner loop needs a double backward, which compiled
        # graphs do not support. dynamic=False: a new shape (another K or Q at test) recompiles once.
        self.query_forward = torch.compile(maml_forward, dynamic=False) if compile_query else maml_forward
        self.per_task_eval = False  # batch norm statistics are per task already

    def _support_loss(self, params, images, labels):
        logits = maml_forward(params, images, self.conv_stride)
        return F.cross_entropy(logits, labels), logits

    def inner_adapt(self, params: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                    num_steps: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``num_steps`` gradient steps on one task's support set.

        Returns the adapted parameters and the support accuracy before each step and after the
        last one, ``[num_steps + 1]``. Always float32, even under autocast (see the class docstring).
        """
        accuracies = []
        with torch.autocast(images.device.type, enabled=False):
            for _ in range(num_steps):
                grads, logits = grad(self._support_loss, has_aux=True)(params, images, labels)
                accuracies.append(accuracy(logits, labels))
                if self.first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
                params = {k: p - self.inner_lrs[k] * grads[k] for k, p in params.items()}
            with torch.no_grad():  # a metric only
                accuracies.append(accuracy(maml_forward(params, images, self.conv_stride), labels))
        return params, torch.stack(accuracies)

    def _task_loss(self, params, support, support_labels, query, query_labels, num_steps):
        adapted, support_accs = self.inner_adapt(params, support, support_labels, num_steps)
        logits = self.query_forward(adapted, query, self.conv_stride).float()
        return F.cross_entropy(logits, query_labels), support_accs, accuracy(logits, query_labels)

    def forward(self, episodes: Episodes, num_inner_steps: int | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if num_inner_steps is None:
            num_inner_steps = self.num_inner_steps if self.training else self.eval_num_inner_steps
        params = dict(self.meta_params)
        if self.vmap_tasks:  # dim 0 of every episode tensor is the task; the meta-parameters are shared
            task_losses, support_accs, query_accs = vmap(
                self._task_loss, in_dims=(None, 0, 0, 0, 0, None))(params, *episodes, num_inner_steps)
        else:
            per_task = [self._task_loss(params, *(t[b] for t in episodes), num_inner_steps)
                        for b in range(episodes.support_images.shape[0])]
            task_losses, support_accs, query_accs = (torch.stack(values) for values in zip(*per_task))
        loss = task_losses.mean()
        support_accs = support_accs.detach()  # [B, steps + 1]
        return loss, {
            "loss": loss.detach(),
            "support_acc_pre": support_accs[:, 0],
            "support_acc_post": support_accs[:, -1],
            "query_acc": query_accs.detach(),
        }


def reference_maml_loss(maml: MAML, episodes: Episodes, num_inner_steps: int | None = None) -> torch.Tensor:
    """The straightforward implementation: a Python loop over tasks, the inner loop written with
    ``torch.autograd.grad(create_graph=True)``. Used to check :class:`MAML` and as the speed baseline."""
    steps = maml.num_inner_steps if num_inner_steps is None else num_inner_steps
    names = list(maml.meta_params)
    total = 0.0
    support, support_labels, query, query_labels = episodes
    for b in range(support.shape[0]):
        params = dict(maml.meta_params)
        for _ in range(steps):
            inner_loss = F.cross_entropy(maml_forward(params, support[b], maml.conv_stride), support_labels[b])
            grads = torch.autograd.grad(inner_loss, [params[k] for k in names], create_graph=not maml.first_order)
            params = {k: params[k] - maml.inner_lrs[k] * g for k, g in zip(names, grads)}
        total = total + F.cross_entropy(maml_forward(params, query[b], maml.conv_stride), query_labels[b])
    return total / support.shape[0]
