"""hw1: FastMemoryMANN computes MemoryMANN (the same parameters and maths in other kernels), step by
step, and ``--memory_impl`` picks between them.

The memory's least-recently-used choices are ties in exact arithmetic at the start of every episode
(the untouched slots are equal), broken by rounding, so two correct implementations may choose
different slots after a few steps and their whole sequences then part. The comparison is therefore
teacher-forced: at every step of the plain model's trajectory both compute one step from the same
state, and a differing least-used choice must be such a tie.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from common.errors import CS330Error
from hw1_mann import train as train_script
from hw1_mann.models import FastMemoryMANN, MemoryMANN, MemoryState, build_model, santoro_inputs, santoro_loss

SIZES = dict(hidden_dim=12, memory_slots=16, memory_dim=6, num_reads=2)


def twin_models(key_strength: bool = False, lru_write: str = "paper") -> tuple[MemoryMANN, FastMemoryMANN]:
    torch.manual_seed(0)
    plain = MemoryMANN(3, **SIZES, key_strength=key_strength, lru_write=lru_write).double()
    fast = FastMemoryMANN(3, **SIZES, key_strength=key_strength, lru_write=lru_write).double()
    fast.load_state_dict(plain.state_dict())  # the state dicts interchange
    return plain, fast


def episode(steps: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, steps, 784, generator=g, dtype=torch.float64), torch.randint(0, 3, (4, steps), generator=g)


def plain_step(model: MemoryMANN, x_t: torch.Tensor, h, c, state: MemoryState):
    """MemoryMANN.forward's step: the controller cell on [x_t, r_{t-1}], then the memory."""
    h, c = model.controller(torch.cat([x_t, state.reads], dim=-1), (h, c))
    return h, c, model.memory_step(h, state)


def fast_step(model: FastMemoryMANN, x_t: torch.Tensor, h, c, state: MemoryState):
    """FastMemoryMANN.forward's step for one x_t: its input part of the gates, then ``step``."""
    return model.step(model.input_gates(x_t), model.recurrent_weights(), h, c, state)


def assert_same_step(plain_out, fast_out) -> None:
    (h1, c1, s1), (h2, c2, s2) = plain_out, fast_out
    for a, b in [(h1, h2), (c1, c2), *zip(s1[:-1], s2[:-1])]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Each head's least-used slots: where the two differ, their usages must tie (to rounding).
    torch.testing.assert_close(chosen_usages(s1.usage, s1.least_used), chosen_usages(s1.usage, s2.least_used),
                               rtol=0, atol=1e-12)


def chosen_usages(usage: torch.Tensor, least_used: torch.Tensor) -> torch.Tensor:
    """The usages ``[B, slots]`` of the slots each head's ``w^lu`` ``[B, H, slots]`` picks, sorted."""
    picked = usage[:, None, :].expand_as(least_used)[least_used > 0]
    return picked.view(*least_used.shape[:2], -1).sort(-1).values  # [B, H, slots picked per head]


@pytest.mark.parametrize("key_strength, lru_write", [(False, "paper"), (True, "paper"), (False, "per_head")])
def test_every_step_of_a_trajectory_is_the_plain_models_step(key_strength, lru_write):
    plain, fast = twin_models(key_strength, lru_write)
    images, labels = episode()
    steps = santoro_inputs(images, labels, 3)  # [B, T, 784+N]
    h, c, state = plain.initial_state(steps)
    for x_t in steps.unbind(1):
        out = plain_step(plain, x_t, h, c, state)
        assert_same_step(out, fast_step(fast, x_t, h, c, state))
        h, c, state = out


def test_the_steps_gradients_are_the_plain_models():
    """Backward through three steps from the same start: the same gradient for every parameter."""
    plain, fast = twin_models(key_strength=True)
    images, labels = episode(steps=3)
    steps = santoro_inputs(images, labels, 3)
    for model, step in ((plain, plain_step), (fast, fast_step)):
        h, c, state = model.initial_state(steps)
        for x_t in steps.unbind(1):
            h, c, state = step(model, x_t, h, c, state)
        (model.output(torch.cat([h, state.reads], dim=-1)).sin().sum() + state.memory.square().sum()).backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_whole_forwards_agree_before_the_first_tie_can_part_them():
    """Over two steps no least-used choice is left to rounding: the logits and the loss's gradients
    of the two forwards agree (this covers FastMemoryMANN.forward's batched input and output layers)."""
    plain, fast = twin_models()
    images, labels = episode(steps=2)
    for model in (plain, fast):
        santoro_loss(model(images, labels), labels).backward()
    torch.testing.assert_close(plain(images, labels), fast(images, labels), rtol=1e-10, atol=1e-12)
    for a, b in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_the_compiled_step_is_the_uncompiled_one():
    torch.manual_seed(0)
    fast = FastMemoryMANN(3, **SIZES)
    compiled = FastMemoryMANN(3, **SIZES, compile=True)
    compiled.load_state_dict(fast.state_dict())
    images, labels = torch.rand(4, 3, 784), torch.randint(0, 3, (4, 3))
    steps = santoro_inputs(images, labels, 3)
    h, c, state = fast.initial_state(steps)
    for x_t in steps.unbind(1):
        expected, got = fast_step(fast, x_t, h, c, state), fast_step(compiled, x_t, h, c, state)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        h, c, state = got


def test_build_model_picks_the_implementation():
    assert type(build_model("memory", 3, 8, memory_impl="plain")) is MemoryMANN
    fast = build_model("memory", 3, 8, memory_impl="fast")
    assert type(fast) is FastMemoryMANN and fast.step == fast.plain_step
    with pytest.raises(CS330Error, match="choose one of plain, fast, compiled"):
        build_model("memory", 3, 8, memory_impl="jit")


@pytest.mark.parametrize("model, impl, steps, compiler, expected", [
    ("memory", "auto", 25000, True, "compiled"),
    ("memory", "auto", 25000, False, "fast"),
    ("memory", "auto", 100, True, "fast"),  # the compile would not pay for itself
    ("memory", "plain", 25000, True, "plain"),
    ("lstm", "auto", 25000, True, "auto"),  # not the memory model: nothing to resolve
])
def test_auto_compiles_long_cpu_runs_where_a_compiler_is_found(monkeypatch, model, impl, steps, compiler, expected):
    monkeypatch.setattr(train_script, "has_cpp_compiler", lambda: compiler)
    args = argparse.Namespace(model=model, memory_impl=impl, train_steps=steps)
    assert train_script.resolve_memory_impl(args, torch.device("cpu")) == expected
    if impl == "auto" and model == "memory":
        assert train_script.resolve_memory_impl(args, torch.device("cuda")) == "fast"
