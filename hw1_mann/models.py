"""The two black-box meta-learners compared in hw1.

Both read a task as one sequence of steps, an image concatenated with a one-hot label, and predict
the class of every step. Two layouts (:func:`step_inputs` tells them apart by the labels' shape):

- the course's: N*(K+1) steps, the K support rows with their labels, then the query row with the
  labels zeroed; only the query predictions enter the loss (:func:`query_loss`);
- Santoro et al.'s: T steps, each image with the label of the *previous* step, so every label is
  revealed one step after its image; every prediction enters the loss (:func:`santoro_loss`).

- :class:`LSTMMANN`: the course model, two stacked LSTMs (``hidden_dim``, then N outputs).
- :class:`MemoryMANN`: the memory-augmented network of Santoro et al. 2016, "Meta-Learning with
  Memory-Augmented Neural Networks": an LSTM controller, an external memory read by cosine-similarity
  attention and written by least-recently-used access (LRUA); :class:`FastMemoryMANN` is the same
  network in fewer, larger kernels (the training default, ``--memory_impl``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import CS330Error

IMAGE_DIM = 28 * 28


class MemoryState(NamedTuple):
    """The memory network's state between steps, every tensor per task (B tasks, H heads)."""

    memory: torch.Tensor  # M_t [B, slots, dim]
    reads: torch.Tensor  # r_t, all heads [B, H*dim]
    read_weights: torch.Tensor  # w^r_t [B, H, slots]
    usage: torch.Tensor  # w^u_t [B, slots]
    least_used: torch.Tensor  # w^lu_t per head [B, H, slots] (see MemoryMANN's lru_write)


def _init_lstm(lstm: nn.LSTM | nn.LSTMCell) -> None:
    """Xavier for input weights, orthogonal for recurrent weights, zero biases (the course init)."""
    for name, param in lstm.named_parameters():
        if name.startswith("weight_ih"):
            nn.init.xavier_uniform_(param)
        elif name.startswith("weight_hh"):
            nn.init.orthogonal_(param)
        elif name.startswith("bias"):
            nn.init.zeros_(param)


def _init_linear(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


def model_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, K+1, N, 784]`` images + ``[B, K+1, N, N]`` labels -> ``[B, N*(K+1), 784+N]`` step inputs
    with the query labels zeroed, so the model never sees them. Wrong shapes get a clear error."""
    if images.dim() != 4 or labels.dim() != 4:
        raise CS330Error(f"expected images [B, K+1, N, 784] and labels [B, K+1, N, N], "
                         f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    batch, rows, n, image_dim = images.shape
    if n != num_classes or labels.shape != (batch, rows, n, num_classes):
        raise CS330Error(f"the model was built for {num_classes}-way tasks but got images {tuple(images.shape)} "
                         f"and labels {tuple(labels.shape)}; expected labels [B, K+1, {num_classes}, {num_classes}]")
    if image_dim != IMAGE_DIM:
        raise CS330Error(f"expected flattened 28x28 images (784 values), got {image_dim}")
    visible_labels = torch.cat([labels[:, :-1], torch.zeros_like(labels[:, -1:])], dim=1)  # [B, K+1, N, N]
    steps = torch.cat([images, visible_labels], dim=-1)  # [B, K+1, N, 784+N]
    return steps.reshape(batch, rows * n, image_dim + num_classes)


def santoro_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, T, 784]`` images + ``[B, T]`` class ids -> ``[B, T, 784+N]`` step inputs in which step t
    carries the one-hot label of step t-1 (zeros at t = 0): the model answers before it is told."""
    if images.dim() != 3 or labels.shape != images.shape[:2]:
        raise CS330Error(f"expected images [B, T, 784] and labels [B, T], got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if images.shape[-1] != IMAGE_DIM:
        raise CS330Error(f"expected flattened 28x28 images (784 values), got {images.shape[-1]}")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise CS330Error(f"the model was built for {num_classes}-way episodes but got label {int(labels.max())}")
    previous = F.one_hot(labels[:, :-1], num_classes).to(images.dtype)  # [B, T-1, N]
    shifted = torch.cat([images.new_zeros(labels.shape[0], 1, num_classes), previous], dim=1)  # [B, T, N]
    return torch.cat([images, shifted], dim=-1)


def step_inputs(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The ``[B, T, 784+N]`` steps of either layout: one-hot ``[B, K+1, N, N]`` labels are the course's,
    ``[B, T]`` class ids Santoro et al.'s."""
    if labels.dim() == 2:
        return santoro_inputs(images, labels, num_classes)
    return model_inputs(images, labels, num_classes)


def query_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the query row only: logits and labels ``[B, K+1, N, N]``."""
    n = logits.shape[-1]
    return F.cross_entropy(logits[:, -1].reshape(-1, n), labels[:, -1].argmax(-1).reshape(-1))


def santoro_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every step: logits ``[B, T, N]``, class ids ``[B, T]``."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of the layout (see :func:`step_inputs`): a mean over tasks either way."""
    return santoro_loss(logits, labels) if labels.dim() == 2 else query_loss(logits, labels)


def _as_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T, N]`` logits in the labels' layout: ``[B, K+1, N, N]`` for the course's, as is for Santoro's."""
    return logits if labels.dim() == 2 else logits.reshape(labels.shape)


class LSTMMANN(nn.Module):
    """Two stacked LSTMs: ``784+N -> hidden_dim -> N``; the second LSTM's output is the logits."""

    def __init__(self, num_classes: int, hidden_dim: int = 128) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.layer1 = nn.LSTM(IMAGE_DIM + num_classes, hidden_dim, batch_first=True)
        self.layer2 = nn.LSTM(hidden_dim, num_classes, batch_first=True)
        _init_lstm(self.layer1)
        _init_lstm(self.layer2)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images ``[B, K+1, N, 784]``, labels ``[B, K+1, N, N]`` -> logits ``[B, K+1, N, N]``
        (or Santoro et al.'s images ``[B, T, 784]``, labels ``[B, T]`` -> logits ``[B, T, N]``)."""
        steps = step_inputs(images, labels, self.num_classes)  # [B, T, 784+N], T = N*(K+1) for the course
        hidden, _ = self.layer1(steps)  # [B, T, hidden]
        logits, _ = self.layer2(hidden)  # [B, T, N]
        return _as_labels(logits, labels)


class MemoryMANN(nn.Module):
    """Santoro et al. (2016) MANN: LSTM controller + external memory with LRUA writes.

    At step t the controller reads ``[x_t, r_{t-1}]`` and emits, per read head, a key ``k_t``
    (tanh) and a write gate ``alpha``. Writing (before reading, as in the paper): the least-used
    slot is zeroed, then each head adds its key with weights
    ``w^w_t = sigmoid(alpha) * w^r_{t-1} + (1 - sigmoid(alpha)) * w^lu_{t-1}``. Reading:
    ``w^r_t = softmax(cosine(k_t, M_t))``, ``r_t = w^r_t M_t``. Usage decays:
    ``w^u_t = gamma * w^u_{t-1} + w^r_t + w^w_t``. The logits come from ``[h_t, r_t]``. Memory is
    reset for every task.

    ``lru_write`` says what ``w^lu`` is: ``"paper"`` (Santoro et al.'s eq. 7: 1 on the H least-used
    slots, H = ``num_reads``, the same for every head, so every head's key goes into all H slots) or
    ``"per_head"`` (this repo's first version, before 2026-12-04: head j one-hot on the j-th
    least-used slot, so the heads write to different slots).

    ``key_strength=True`` (not in the paper; the NTM's key strength): each head also emits
    ``beta_t = softplus(linear(h_t))`` and reads with ``softmax(beta_t * cosine)`` (see
    :func:`content_weights`), so that a read can focus on one slot.
    """

    def __init__(self, num_classes: int, hidden_dim: int = 128, memory_slots: int = 128,
                 memory_dim: int = 40, num_reads: int = 4, gamma: float = 0.95, key_strength: bool = False,
                 lru_write: str = "paper") -> None:
        super().__init__()
        if num_reads > memory_slots:
            raise CS330Error(f"num_reads ({num_reads}) cannot exceed memory_slots ({memory_slots})")
        if lru_write not in LRU_WRITES:
            raise CS330Error(f"unknown lru_write {lru_write!r}; choose one of {', '.join(LRU_WRITES)}")
        self.lru_write = lru_write
        self.num_classes, self.hidden_dim = num_classes, hidden_dim
        self.memory_slots, self.memory_dim, self.num_reads, self.gamma = memory_slots, memory_dim, num_reads, gamma
        self.controller = nn.LSTMCell(IMAGE_DIM + num_classes + num_reads * memory_dim, hidden_dim)
        self.key = nn.Linear(hidden_dim, num_reads * memory_dim)
        self.write_gate = nn.Linear(hidden_dim, num_reads)
        self.output = nn.Linear(hidden_dim + num_reads * memory_dim, num_classes)
        _init_lstm(self.controller)
        for layer in (self.key, self.write_gate, self.output):
            _init_linear(layer)
        # Built after the other layers' draws: with or without it, they start from the same weights.
        self.key_strength = nn.Linear(hidden_dim, num_reads) if key_strength else None
        if self.key_strength is not None:
            _init_linear(self.key_strength)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images ``[B, K+1, N, 784]``, labels ``[B, K+1, N, N]`` -> logits ``[B, K+1, N, N]``
        (or Santoro et al.'s images ``[B, T, 784]``, labels ``[B, T]`` -> logits ``[B, T, N]``)."""
        steps = step_inputs(images, labels, self.num_classes)  # [B, T, 784+N]
        h, c, memory_state = self.initial_state(steps)
        outputs = []
        for t in range(steps.shape[1]):
            h, c = self.controller(torch.cat([steps[:, t], memory_state.reads], dim=-1), (h, c))
            memory_state = self.memory_step(h, memory_state)
            outputs.append(self.output(torch.cat([h, memory_state.reads], dim=-1)))  # [B, N]
        return _as_labels(torch.stack(outputs, dim=1), labels)  # stacked: [B, T, N]

    def initial_state(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MemoryState]:
        """The controller's ``h, c`` and an empty memory for the tasks of ``steps`` ``[B, T, ...]``."""
        batch, heads, slots = steps.shape[0], self.num_reads, self.memory_slots
        zeros = steps.new_zeros
        h, c = zeros(batch, self.hidden_dim), zeros(batch, self.hidden_dim)
        return h, c, MemoryState(
            memory=zeros(batch, slots, self.memory_dim) + 1e-6,  # [B, slots, dim]; the constant keeps cosine defined
            reads=zeros(batch, heads * self.memory_dim),  # r_{t-1}, all heads: [B, H*dim]
            read_weights=zeros(batch, heads, slots),  # w^r_{t-1}
            usage=zeros(batch, slots),  # w^u_{t-1}
            # w^lu_{t-1}: with no usage yet, slots 0..H-1 count as the least used (so the first step is written too).
            least_used=self.least_used_weights(torch.arange(heads, device=steps.device).expand(batch, -1), steps.dtype))

    def least_used_weights(self, ranked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``w^lu`` ``[B, H, slots]`` from the indices of the H least-used slots ``[B, H]`` (least first)."""
        one_hot = F.one_hot(ranked, self.memory_slots).to(dtype)  # [B, H, slots]: head j on the j-th least-used
        if self.lru_write == "per_head":
            return one_hot
        return one_hot.sum(1, keepdim=True).expand(-1, self.num_reads, -1)  # all H slots, every head

    def memory_step(self, h: torch.Tensor, state: MemoryState) -> MemoryState:
        """One step of the memory from the controller's new ``h`` ``[B, hidden]``: write, read, usage."""
        batch, heads, dim = h.shape[0], self.num_reads, self.memory_dim
        keys = torch.tanh(self.key(h)).view(batch, heads, dim)  # [B, H, dim]
        gate = torch.sigmoid(self.write_gate(h))[..., None]  # [B, H, 1]
        write_weights = gate * state.read_weights + (1 - gate) * state.least_used  # [B, H, slots]
        # Zero the least-used slot, then add every head's key where it writes.
        keep = torch.ones_like(state.usage).scatter_(1, state.usage.argmin(dim=1, keepdim=True), 0.0)  # [B, slots]
        memory = state.memory * keep[..., None] + write_weights.transpose(1, 2) @ keys  # [B, slots, dim]
        strength = None if self.key_strength is None else F.softplus(self.key_strength(h))[..., None]  # [B, H, 1]
        read_weights = content_weights(keys, memory, strength)  # [B, H, slots]
        reads = (read_weights @ memory).reshape(batch, heads * dim)
        usage = self.gamma * state.usage + read_weights.sum(1) + write_weights.sum(1)  # [B, slots]
        # The H least-used slots for the next write (no gradient through the ranking; exactly H, where the
        # paper's "usage <= the H-th smallest" would take every slot tied with the H-th).
        ranked = usage.detach().topk(heads, dim=1, largest=False).indices  # [B, H]
        return MemoryState(memory, reads, read_weights, usage, self.least_used_weights(ranked, memory.dtype))


class FastMemoryMANN(MemoryMANN):
    """:class:`MemoryMANN`'s network and parameters (state dicts interchange) in fewer, larger kernels:

    - the controller's input weights times the image-and-label part of all T steps as one
      ``[B*T, 784+N]`` matmul before the loop, instead of T matmuls of B rows (that part is 83% of the
      controller's multiply-adds), and the LSTM cell written out around it;
    - the steps unbound once: indexing ``[:, t]`` of a tensor that needs a gradient zero-fills a whole
      ``[B, T, 4*hidden]`` gradient per step in backward;
    - the output layer once over all steps;
    - ``compile=True``: each step (``step``) through ``torch.compile``, which fuses its few dozen
      small elementwise ops (a compile at the first batch, and again for evaluation's no-grad graphs).

    The same maths in another order of sums, so rounding differs, and the LRU's discrete choices
    (argmin, top-k of usage) can flip on it in long sequences: the tests compare the two models
    step by step in float64.
    """

    def __init__(self, *args, compile: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # dynamic=False: another batch size (evaluation) compiles once more rather than going dynamic.
        self.step = torch.compile(self.plain_step, dynamic=False) if compile else self.plain_step

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        steps = step_inputs(images, labels, self.num_classes)  # [B, T, 784+N]
        h, c, memory_state = self.initial_state(steps)
        recurrent_weights = self.recurrent_weights()
        features = []
        for gates in self.input_gates(steps).unbind(1):  # [B, 4*hidden] per step
            h, c, memory_state = self.step(gates, recurrent_weights, h, c, memory_state)
            features.append(torch.cat([h, memory_state.reads], dim=-1))
        return _as_labels(self.output(torch.stack(features, dim=1)), labels)  # [B, T, N]

    def input_gates(self, steps: torch.Tensor) -> torch.Tensor:
        """The x_t part of the controller's gates ``[x_t, r_{t-1}] W_ih^T + h W_hh^T + biases`` (with the
        biases) for the inputs ``steps`` ``[..., 784+N]``, all in one matmul: ``[..., 4*hidden]``."""
        lstm, inputs = self.controller, steps.shape[-1]
        gates = torch.addmm(lstm.bias_ih + lstm.bias_hh, steps.flatten(0, -2), lstm.weight_ih[:, :inputs].t())
        return gates.view(*steps.shape[:-1], -1)

    def recurrent_weights(self) -> torch.Tensor:
        """``[H*dim + hidden, 4*hidden]``: the controller's weights of ``[r_{t-1}, h_{t-1}]``, applied in each step."""
        lstm = self.controller
        inputs = lstm.input_size - self.num_reads * self.memory_dim
        return torch.cat([lstm.weight_ih[:, inputs:], lstm.weight_hh], dim=1).t()

    def plain_step(self, gates: torch.Tensor, recurrent_weights: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                   state: MemoryState) -> tuple[torch.Tensor, torch.Tensor, MemoryState]:
        """One step from the input part of the controller's gates: ``nn.LSTMCell``'s equations, then
        :meth:`MemoryMANN.memory_step`."""
        gates = torch.addmm(gates, torch.cat([state.reads, h], dim=-1), recurrent_weights)  # [B, 4*hidden]
        in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=1)
        c = torch.sigmoid(forget_gate) * c + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
        h = torch.sigmoid(out_gate) * torch.tanh(c)
        return h, c, self.memory_step(h, state)


def content_weights(keys: torch.Tensor, memory: torch.Tensor, strength: torch.Tensor | None = None) -> torch.Tensor:
    """Read weights over the slots, ``softmax(strength * cosine(key, slot))``: keys ``[B, H, dim]``,
    memory ``[B, slots, dim]`` -> ``[B, H, slots]`` (the cosines as one batched matmul).

    Without ``strength`` (Santoro et al.) cosines lie in [-1, 1], so of 128 slots none can get more
    than e^2 / (e^2 + 127) = 5.5% of a read: reads are near-averages. A strength ``[B, H, 1]``
    sharpens them (the test: a matching key with strength 50 puts over 90% on its slot).
    """
    similarity = F.normalize(keys, dim=-1) @ F.normalize(memory, dim=-1).transpose(1, 2)  # [B, H, slots]
    if strength is not None:
        similarity = strength * similarity
    return similarity.softmax(dim=-1)


MEMORY_IMPLS = ("plain", "fast", "compiled")
LRU_WRITES = ("paper", "per_head")


def build_model(name: str, num_classes: int, hidden_dim: int, memory_slots: int = 128, memory_dim: int = 40,
                num_reads: int = 4, key_strength: bool = False, lru_write: str = "paper",
                memory_impl: str = "plain") -> nn.Module:
    """``lstm`` or ``memory``; the memory sizes only matter for ``memory`` (defaults from Santoro et al.),
    and ``memory_impl`` (one of :data:`MEMORY_IMPLS`) picks :class:`MemoryMANN` or :class:`FastMemoryMANN`,
    with or without a compiled step."""
    if name == "lstm":
        return LSTMMANN(num_classes, hidden_dim)
    if name != "memory":
        raise CS330Error(f"unknown model {name!r}; choose lstm or memory")
    if memory_impl not in MEMORY_IMPLS:
        raise CS330Error(f"unknown memory_impl {memory_impl!r}; choose one of {', '.join(MEMORY_IMPLS)}")
    sizes = dict(memory_slots=memory_slots, memory_dim=memory_dim, num_reads=num_reads, key_strength=key_strength,
                 lru_write=lru_write)
    if memory_impl == "plain":
        return MemoryMANN(num_classes, hidden_dim, **sizes)
    return FastMemoryMANN(num_classes, hidden_dim, **sizes, compile=memory_impl == "compiled")


def check_bf16_runs(model: nn.Module, device: torch.device) -> None:
    """Refuse bf16 where one of ``model``'s ``nn.LSTM`` layers cannot run in it, before any work:
    PyTorch's CPU LSTM runs bf16 through a oneDNN primitive that CPUs without native bf16 (AVX2) lack,
    and the error would otherwise come at the first training step. One forward of one step each."""
    for lstm in (m for m in model.modules() if isinstance(m, nn.LSTM)):
        probe = torch.zeros(1, 1, lstm.input_size, device=device)
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                lstm(probe)
        except RuntimeError as err:
            raise CS330Error(f"--precision bf16: this {device.type} cannot run the LSTM in bf16 ({str(err)[:80]}...); "
                             "use --precision fp32 (or auto, fp32 for hw1)") from None
