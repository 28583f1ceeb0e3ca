"""Speed of hw2 on this machine: MAML meta-iterations (batched vs the per-task loop) and ProtoNet episodes/s.

    python hw2_protonet_maml/bench.py                 # the course setting: 5-way 1-shot, 15 queries, batch 16
    python hw2_protonet_maml/bench.py --device cuda

Every variant computes the meta-gradient of the same meta-batch; the table shows its largest absolute
difference from the reference per-task loop (``reference_maml_loss``), so a faster variant that changed
the maths would show up at once.
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse

import torch

from common.device import DEVICE_CHOICES, autocast, configure_threads, cpu_capability, resolve_device
from common.omniglot import EpisodeSampler, OmniglotStore
from common.timing import timed
from hw2_protonet_maml.maml import MAML, reference_maml_loss
from hw2_protonet_maml.protonet import ProtoNet


def meta_gradient(maml: MAML, loss_fn) -> torch.Tensor:
    maml.zero_grad(set_to_none=True)
    loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in maml.meta_params.values()])


def bench_maml(args, device, sampler) -> None:
    episodes = sampler.sample(args.batch_size)

    def build(**kwargs) -> MAML:
        return MAML(args.num_way, num_inner_steps=args.inner_steps, inner_lr=0.4, hidden_channels=args.channels,
                    **kwargs).to(device)

    maml, vmapped, compiled = build(), build(vmap_tasks=True), build(compile_query=True)
    vmapped.meta_params = compiled.meta_params = maml.meta_params  # same weights: same meta-gradient expected
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    variants = {
        "reference loop (autograd.grad)": lambda: reference_maml_loss(maml, episodes),
        "MAML, task loop (torch.func)": lambda: maml(episodes)[0],
        "MAML, vmap over tasks": lambda: vmapped(episodes)[0],
        "MAML, loop + compiled query": lambda: compiled(episodes)[0],
    }
    if not args.no_bf16:
        variants["reference loop, all bf16"] = lambda: _with(bf16, lambda: reference_maml_loss(maml, episodes))
        variants["MAML, loop, bf16 query"] = lambda: _with(bf16, lambda: maml(episodes)[0])
        variants["MAML, compiled bf16 query"] = lambda: _with(bf16, lambda: compiled(episodes)[0])
    reference = meta_gradient(maml, variants["reference loop (autograd.grad)"])
    print(f"\nMAML meta-iteration: {args.num_way}-way {args.num_support}-shot {args.num_query}-query, batch "
          f"{args.batch_size}, {args.inner_steps} inner step(s), second order, {args.channels} channels")
    print(f"{'variant':<32}{'s/iter':>10}{'speed-up':>10}{'max |grad diff|':>17}{'rel. L2 diff':>14}")
    base = None
    for name, loss_fn in variants.items():
        seconds = timed(lambda fn=loss_fn: meta_gradient(maml, fn), device, args.repeats, warmup=1)[1]
        diff = meta_gradient(maml, loss_fn) - reference
        base = base or seconds
        print(f"{name:<32}{seconds:>10.3f}{base / seconds:>9.2f}x{diff.abs().max().item():>17.2e}"
              f"{(diff.norm() / reference.norm()).item():>14.2e}")
    print(f"(one query-pass convolution, {args.num_way * args.num_query} x {args.channels} x 28 x 28, runs at "
          f"{conv_gflops(args, device):.0f} GFLOP/s in fp32: the loop is compute-bound)")


def conv_gflops(args, device) -> float:
    """Forward throughput of one of the network's 3x3 convolutions on one task's query images."""
    images = torch.randn(args.num_way * args.num_query, args.channels, 28, 28, device=device)
    weight = torch.randn(args.channels, args.channels, 3, 3, device=device)
    seconds = timed(lambda: torch.conv2d(images, weight, padding=1), device, 10, warmup=1)[1]
    return 2 * images.numel() * args.channels * 9 / seconds / 1e9


def bench_protonet(args, device, sampler) -> None:
    """ProtoNet training steps for each precision and chunking of the embedding forwards: one task per
    forward (the model, and the course code) or one pass over the whole meta-batch (batch norm then
    mixes the tasks' statistics; timed here only for the comparison)."""
    print(f"\nProtoNet training: {args.num_way}-way {args.num_support}-shot {args.num_query}-query, "
          f"batch {args.batch_size} tasks")
    print(f"{'precision':<10}{'chunking':<22}{'s/iter':>10}{'episodes/s':>12}")
    for precision in ("fp32",) if args.no_bf16 else ("fp32", "bf16"):
        for chunking in ("per task", "whole meta-batch"):
            model = ProtoNet().to(device)
            if precision == "bf16":
                model = model.to(memory_format=torch.channels_last)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            if chunking != "per task":
                model.embed_tasks = lambda s, q, m=model: _embed_meta_batch(m, s, q)

            def step(model=model, optimizer=optimizer, precision=precision):
                with autocast(device, precision):
                    loss, _ = model(sampler.sample(args.batch_size))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

            seconds = timed(step, device, args.repeats, warmup=1)[1]
            print(f"{precision:<10}{chunking:<22}{seconds:>10.3f}{args.batch_size / seconds:>12.1f}")


def _embed_meta_batch(model: ProtoNet, support: torch.Tensor, query: torch.Tensor):
    batch, num_support = support.shape[:2]
    images = torch.cat([support.flatten(0, 1), query.flatten(0, 1)])  # [B*(NK+NQ), 1, S, S]
    emb = model.embedding(images).float()
    dim = emb.shape[-1]
    return emb[: batch * num_support].view(batch, num_support, dim), emb[batch * num_support:].view(batch, -1, dim)


def _with(context, fn):
    with context:
        return fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--num_way", type=int, default=5)
    parser.add_argument("--num_support", type=int, default=1)
    parser.add_argument("--num_query", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--inner_steps", type=int, default=1)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per variant (default: 3)")
    parser.add_argument("--no_bf16", action="store_true", help="skip the bf16 variants")
    parser.add_argument("--only", choices=("maml", "protonet"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable cores)")
    args = parser.parse_args()
    configure_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    store = OmniglotStore.load()
    sampler = EpisodeSampler(store.split("train"), args.num_way, args.num_support, args.num_query, device, seed=0)
    print(f"device: {device}, CPU capability {cpu_capability()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if args.only != "protonet":
        bench_maml(args, device, sampler)
    if args.only != "maml":
        bench_protonet(args, device, sampler)


if __name__ == "__main__":
    main()
