"""Training speed of hw1's models on this machine: one Santoro-protocol training step (forward,
backward, Adam) of the LSTM and of each implementation of the memory network.

    python hw1_mann/bench.py --threads 1                 # Santoro et al.'s setting: 5 x 10 steps, batch 16, hidden 200
    python hw1_mann/bench.py --threads 1 --profile fast  # where one implementation's time goes

Random images stand in for Omniglot (sampling is timed in benchmarks/bench_omniglot.py). Every memory
implementation starts from the same weights; the table shows each one's loss beside the plain
model's (they agree to rounding while no least-used choice is a tie, and differ a little once one is:
see tests/test_hw1_fast_memory.py). FLOPs are counted once per model (``FlopCounterMode``, forward +
backward, the LSTM layers' counted by hand); the machine's limit is the rate this CPU reaches on a
large fp32 matmul (measured here).
"""

from __future__ import annotations

import common.openmp  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split
import argparse
import time

import torch

from common.device import DEVICE_CHOICES, configure_threads, cpu_capability, resolve_device
from common.timing import counted_flops, timed
from hw1_mann.models import MEMORY_IMPLS, build_model, santoro_loss

MODELS = ("lstm", *(f"memory {impl}" for impl in MEMORY_IMPLS))


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)  # every memory implementation from the same weights
    kind, _, impl = name.partition(" ")
    return build_model(kind, args.num_classes, args.hidden_dim, memory_impl=impl or "plain").to(device)


def lstm_flops(model: torch.nn.Module, batch: int, steps: int) -> int:
    """Forward + backward FLOPs of ``model``'s ``nn.LSTM`` layers, which ``FlopCounterMode`` does not
    count (one fused kernel): 4 gates x (input + hidden) multiply-adds per unit and step, backward twice."""
    return sum(3 * 2 * batch * steps * 4 * m.hidden_size * (m.input_size + m.hidden_size)
               for m in model.modules() if isinstance(m, torch.nn.LSTM))


def matmul_limit(device: torch.device, size: int = 2048) -> float:
    """GFLOP/s of a ``size``-cubed fp32 matmul: what this CPU (and thread count) reaches at best."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / timed(lambda: a @ b, device, 5, warmup=1)[1] / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_classes", type=int, default=5)
    parser.add_argument("--presentations", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=16, help="episodes per step (default: 16)")
    parser.add_argument("--hidden_dim", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model (default: 10)")
    parser.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--profile", choices=MODELS, help="print torch.profiler's table for this model instead")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    configure_threads(args.threads)
    steps = args.num_classes * args.presentations
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, steps, 784, generator=g).to(device)  # [B, T, 784]
    labels = torch.randint(0, args.num_classes, (args.batch_size, steps), generator=g).to(device)  # [B, T]

    def step_of(model: torch.nn.Module):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> float:
            loss = santoro_loss(model(images, labels), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()
        return step

    if args.profile:
        step = step_of(build(args.profile, args, device))
        timed(step, device, 2)
        with torch.profiler.profile() as prof:
            timed(step, device, 3)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return

    limit = matmul_limit(device)
    print(f"{device}, cpu_capability() {cpu_capability()}, {torch.get_num_threads()} thread(s); "
          f"{args.num_classes} x {args.presentations} steps, batch {args.batch_size}, hidden {args.hidden_dim}; "
          f"limit (fp32 matmul): {limit:.0f} GFLOP/s")
    print(f"{'model':<18}{'first step s':>13}{'steps/s':>9}{'GFLOP/step':>11}{'GFLOP/s':>9}{'of limit':>9}"
          f"{'first loss':>12}")
    for name in args.only:
        model = build(name, args, device)
        # The compiled step hides its ops from the counter: count the same step uncompiled.
        flops = counted_flops(step_of(build(name.replace("compiled", "fast"), args, device))) \
            + lstm_flops(model, args.batch_size, steps)
        step = step_of(model)
        tic = time.perf_counter()
        first_loss = step()  # the first step from the shared weights (with any compile)
        first = time.perf_counter() - tic
        timed(step, device, 1)  # warm: the backward's compile, the allocator
        seconds = timed(step, device, args.repeats)[1]
        rate = flops / seconds / 1e9
        print(f"{name:<18}{first:>13.2f}{1 / seconds:>9.2f}{flops / 1e9:>11.2f}{rate:>9.1f}{rate / limit:>9.1%}"
              f"{first_loss:>12.6f}")


if __name__ == "__main__":
    main()
