"""Checks that need a GPU (``pytest -m cuda``; ``make gpu-check`` runs them): the same maths on CUDA as
on the CPU. Skipped, with the reason, where CUDA is absent."""

from __future__ import annotations

import pytest
import torch

from common.device import autocast, resolve_precision
from common.omniglot import Episodes, EpisodeSampler
from hw2_protonet_maml.maml import MAML
from hw2_protonet_maml.networks import ConvNet
from hw2_protonet_maml.protonet import ProtoNet

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def on(device: str, episodes: Episodes) -> Episodes:
    """The episodes on ``device``, images in float64 (so CPU and GPU agree to rounding)."""
    return Episodes(*(t.to(device, torch.float64) if t.is_floating_point() else t.to(device) for t in episodes))


def test_maml_meta_gradient_cuda_equals_cpu(omniglot_store):
    episodes = EpisodeSampler(omniglot_store.split("train"), 5, 1, 5, seed=0).sample(4)
    grads = {}
    for device in ("cpu", "cuda"):
        model = MAML(ConvNet(5, hidden_channels=16, seed=0), num_inner_steps=2, inner_lr=0.4).double().to(device)
        params = list(model.meta_params().values())
        grads[device] = torch.autograd.grad(model(on(device, episodes))[0], params)
        reference = torch.autograd.grad(model.reference_loss(on(device, episodes)), params)
        for fast, slow in zip(grads[device], reference):
            torch.testing.assert_close(fast, slow, atol=1e-8, rtol=1e-6)
    for on_cpu, on_gpu in zip(grads["cpu"], grads["cuda"]):
        torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-8, rtol=1e-6)


def test_protonet_step_and_bf16_autocast_on_cuda(omniglot_store):
    device = torch.device("cuda")
    precision, _ = resolve_precision("auto", device)
    sampler = EpisodeSampler(omniglot_store.split("train"), 5, 1, 5, device=device, seed=0)
    assert sampler.images.is_cuda  # the store lives on the GPU: no host-to-device copy per episode
    model = ProtoNet(hidden_channels=16).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        with autocast(device, precision):
            loss, metrics = model(sampler.sample(8))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])
    assert metrics["query_acc"].device.type == "cuda"
