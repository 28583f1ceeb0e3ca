"""Speed of hw2 on this machine: MAML meta-iterations for each variant, ProtoNet steps and evaluation.

    python hw2_protonet_maml/bench.py --threads 1               # the course setting: 5-way 1-shot, 15 queries, batch 16
    python hw2_protonet_maml/bench.py --only maml --inner_steps 5 --inner_lr 0.04
    python hw2_protonet_maml/bench.py --only maml --profile "bf16 query, compiled"   # where the time goes
    python hw2_protonet_maml/bench.py --device cuda

Every MAML variant computes the meta-gradient of the same meta-batch with the same weights; the table
shows its difference from the reference per-task loop (``reference_maml_loss``), so a faster variant
that changed the maths would show up at once. FLOPs are counted once (``FlopCounterMode`` on the
reference loop, forward + backward + double backward); the machine's limit is the throughput that
this CPU reaches on the network's largest convolution in each precision (measured here, forward and
forward + backward, the best of them); each variant's GFLOP/s is also shown as a fraction of the limit
of the precision its query pass runs in.
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common.device import DEVICE_CHOICES, autocast, configure_threads, cpu_capability, resolve_device
from common.omniglot import EpisodeSampler, OmniglotStore
from common.timing import counted_flops, timed
from hw2_protonet_maml.maml import MAML, TaskVmapMAML
from hw2_protonet_maml.networks import ConvNet
from hw2_protonet_maml.protonet import ProtoNet


def meta_gradient(maml: MAML, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    maml.zero_grad(set_to_none=True)
    loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in maml.meta_params().values()])


def conv_limits(args, device) -> dict[str, float]:
    """GFLOP/s of the network's largest ``C -> C`` 3x3 convolution on one task's query images in fp32
    (default layout and channels-last) and bf16 (channels-last), forward and forward + backward; the
    best rate of each precision is the machine's limit for it."""
    shape = (args.num_way * args.num_query, args.channels, 28 // args.conv_stride, 28 // args.conv_stride)
    return {"fp32": max(conv_rate(shape, torch.float32, False, args.conv_stride, device),
                        conv_rate(shape, torch.float32, True, args.conv_stride, device)),
            "bf16": conv_rate(shape, torch.bfloat16, True, args.conv_stride, device)}


def conv_rate(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, stride: int,
              device: torch.device) -> float:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    weight = torch.randn(shape[1], shape[1], 3, 3, device=device, dtype=dtype)
    weight = weight.contiguous(memory_format=layout).requires_grad_()
    flops = 2 * F.conv2d(images, weight, stride=stride, padding=1).numel() * shape[1] * 9
    forward = timed(lambda: F.conv2d(images, weight, stride=stride, padding=1), device, 5, warmup=1)[1]
    both = timed(lambda: torch.autograd.grad(F.conv2d(images, weight, stride=stride, padding=1).sum(),
                                             (images, weight)), device, 5, warmup=1)[1]
    return max(flops / forward, 3 * flops / both) / 1e9


def maml_variants(args, device, episodes) -> tuple[MAML, dict[str, tuple[str, Callable[[], torch.Tensor]]]]:
    """name -> (precision of its query pass, meta-loss function); every model shares one set of weights."""
    net = ConvNet(args.num_way, args.channels, args.conv_stride).to(device)

    def build(kind: type[MAML] = MAML, **kwargs) -> MAML:
        # One network for all: the same weights, so the same meta-gradient is expected.
        return kind(net, num_inner_steps=args.inner_steps, inner_lr=args.inner_lr, **kwargs)

    before, fp32_compiled = build(), build(compile_query=True)
    variants = {
        "reference loop (autograd.grad)": ("fp32", lambda: before.reference_loss(episodes)),
        "before: fp32, task loop": ("fp32", lambda: before(episodes)[0]),
        "fp32, compiled query": ("fp32", lambda: fp32_compiled(episodes)[0]),
    }
    if args.vmap:
        vmapped = build(TaskVmapMAML)
        variants["fp32, vmap over tasks"] = ("fp32", lambda: vmapped(episodes)[0])
    if not args.no_bf16:
        bf16, bf16_compiled = build(precision="bf16"), build(precision="bf16", compile_query=True)
        variants["bf16 query"] = ("bf16", lambda: bf16(episodes)[0])
        variants["bf16 query, compiled"] = ("bf16", lambda: bf16_compiled(episodes)[0])
    return before, variants


def bench_maml(args, device, sampler) -> None:
    episodes = sampler.sample(args.batch_size)
    maml, variants = maml_variants(args, device, episodes)
    if args.profile:
        return profile_variant(maml, variants, args.profile)
    reference = meta_gradient(maml, variants["reference loop (autograd.grad)"][1])
    flops = counted_flops(lambda: meta_gradient(maml, variants["reference loop (autograd.grad)"][1]))
    limits = conv_limits(args, device)
    print(f"\nMAML meta-iteration: {args.num_way}-way {args.num_support}-shot {args.num_query}-query, batch "
          f"{args.batch_size}, {args.inner_steps} inner step(s) at lr {args.inner_lr}, second order, "
          f"{args.channels} channels, stride {args.conv_stride}: {flops / 1e9:.0f} GFLOP per iteration")
    print("machine limit (largest convolution): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in limits.items()))
    print(f"{'variant':<32}{'s/iter':>9}{'speed-up':>10}{'GFLOP/s':>9}{'of limit':>10}"
          f"{'max |grad diff|':>17}{'rel. L2 diff':>14}")
    base = None
    for name, (precision, loss_fn) in variants.items():
        seconds = timed(lambda fn=loss_fn: meta_gradient(maml, fn), device, args.repeats, warmup=1)[1]
        diff = meta_gradient(maml, loss_fn) - reference
        if name.startswith("before"):
            base = seconds
        rate = flops / seconds / 1e9
        speed_up = f"{base / seconds:>9.2f}x" if base else f"{'':>10}"
        print(f"{name:<32}{seconds:>9.3f}{speed_up}{rate:>9.0f}{rate / limits[precision]:>10.1%}"
              f"{diff.abs().max().item():>17.2e}{(diff.norm() / reference.norm()).item():>14.2e}")
    print("(speed-up: against 'before', the default of maml.py until 2026-12-03)")


def conditioning(args, device, sampler) -> None:
    """How far the exact (float64) meta-gradient itself moves, for scale beside the variants' differences:
    under a bf16-sized relative perturbation of the weights (uniform in +-2^-9) and for another meta-batch."""
    first, second = sampler.sample(args.batch_size), sampler.sample(args.batch_size)

    def exact(model: MAML, episodes) -> torch.Tensor:
        episodes = type(episodes)(*(t.double() if t.is_floating_point() else t for t in episodes))
        return meta_gradient(model, lambda: model.reference_loss(episodes))

    model = MAML(ConvNet(args.num_way, args.channels, args.conv_stride), num_inner_steps=args.inner_steps,
                 inner_lr=args.inner_lr).to(device).double()
    reference = exact(model, first)
    other_batch = exact(model, second)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for weight in model.meta_params().values():
            noise = torch.rand(weight.shape, generator=generator, device=device, dtype=weight.dtype) * 2 - 1
            weight.mul_(1 + noise * 2 ** -9)
    perturbed = exact(model, first)

    def relative(g: torch.Tensor) -> float:
        return ((g - reference).norm() / reference.norm()).item()

    print(f"\nexact (float64) meta-gradient, relative L2 change: weights x (1 +- 2^-9): {relative(perturbed):.2e}; "
          f"another meta-batch: {relative(other_batch):.2e}")


def profile_variant(maml: MAML, variants: dict, name: str) -> None:
    """torch.profiler's top operators for one meta-iteration of one variant (after a warm-up)."""
    if name not in variants:
        raise SystemExit(f"error: --profile {name!r}: choose one of {', '.join(map(repr, variants))}")
    loss_fn = variants[name][1]
    meta_gradient(maml, loss_fn)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        meta_gradient(maml, loss_fn)
    print(f"\nprofile of one meta-iteration, {name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def bench_protonet(args, device, sampler) -> None:
    """ProtoNet training steps for each precision, layout and chunking of the embedding forwards: the
    model's NCHW weights or channels-last ones (always under bf16); one task per forward (the model,
    and the course code) or one pass over the whole meta-batch (batch norm then mixes the tasks'
    statistics; timed here only for the comparison); and the 600-task evaluation."""
    limits = conv_limits(argparse.Namespace(**{**vars(args), "conv_stride": 1}), device)
    print(f"\nProtoNet training: {args.num_way}-way {args.num_support}-shot {args.num_query}-query, "
          f"batch {args.batch_size} tasks; evaluation: {args.eval_tasks} tasks")
    print(f"{'precision':<10}{'layout':<15}{'chunking':<18}{'s/iter':>9}{'episodes/s':>12}{'GFLOP/s':>9}"
          f"{'of limit':>10}{'eval s':>8}")
    rows = [("fp32", "NCHW", "per task"), ("fp32", "channels-last", "per task"),
            ("fp32", "channels-last", "whole meta-batch")]
    if not args.no_bf16:
        rows += [("bf16", "channels-last", "per task"), ("bf16", "channels-last", "whole meta-batch")]
    for precision, layout, chunking in rows:
        model = ProtoNet().to(device)
        if layout == "channels-last":
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
        rate = counted_flops(step) / seconds / 1e9
        evaluation = f"{evaluate_protonet(model, args, device, sampler, precision):>8.1f}" \
            if chunking == "per task" else f"{'':>8}"
        print(f"{precision:<10}{layout:<15}{chunking:<18}{seconds:>9.3f}{args.batch_size / seconds:>12.1f}"
              f"{rate:>9.0f}{rate / limits[precision]:>10.1%}{evaluation}")


def evaluate_protonet(model: ProtoNet, args, device, sampler, precision: str) -> float:
    """Seconds for ``--eval_tasks`` test-style tasks, as ``MetaTrainer.evaluate`` runs them."""
    def evaluate() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            for done in range(0, args.eval_tasks, args.batch_size):
                model(sampler.sample(min(args.batch_size, args.eval_tasks - done)))
        model.train()

    return timed(evaluate, device, 1, warmup=0)[1]


def _embed_meta_batch(model: ProtoNet, support: torch.Tensor, query: torch.Tensor):
    batch, num_support = support.shape[:2]
    images = torch.cat([support.flatten(0, 1), query.flatten(0, 1)])  # [B*(NK+NQ), 1, S, S]
    emb = model.embedding(images).float()
    dim = emb.shape[-1]
    return emb[: batch * num_support].view(batch, num_support, dim), emb[batch * num_support:].view(batch, -1, dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--num_way", type=int, default=5)
    parser.add_argument("--num_support", type=int, default=1)
    parser.add_argument("--num_query", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--inner_steps", type=int, default=1)
    parser.add_argument("--inner_lr", type=float, default=0.4)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--conv_stride", type=int, choices=(1, 2), default=1, help="2 = the MAML paper's network")
    parser.add_argument("--vmap", action="store_true", help="also time MAML with vmap over tasks (slow on a CPU)")
    parser.add_argument("--conditioning", action="store_true",
                        help="also print how far the exact meta-gradient moves under a bf16-sized weight perturbation")
    parser.add_argument("--profile", default=None, metavar="VARIANT",
                        help="print torch.profiler's top operators for one MAML variant instead of the table")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per variant (default: 3)")
    parser.add_argument("--no_bf16", action="store_true", help="skip the bf16 variants")
    parser.add_argument("--eval_tasks", type=int, default=600, help="tasks of the timed ProtoNet evaluation")
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
        if args.conditioning:
            conditioning(args, device, sampler)
    if args.only != "maml":
        bench_protonet(args, device, sampler)


if __name__ == "__main__":
    main()
