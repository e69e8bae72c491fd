"""Training-step speed of our ResNets against torchvision's, same weights, batch and machine.

Both models run the same SGD step (forward, cross-entropy, backward, update) on the same batch.
Steps alternate between the two, swapping who goes first each round, so that drift in the
machine's speed hits both alike. The figure reported is the ratio of median step times
(torchvision / ours: >= 1.0 means ours is at least as fast).

    python benchmarks/bench_models.py [--models resnet18 resnet50] [--batch-size 16] [--size 112]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

from distbelief.models import create_model


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def compare(name: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    reference = getattr(torchvision.models, name)()
    # torchvision strides the bottleneck's 3x3 conv: compare against our matching variant.
    ours = create_model(name, variant="v1.5")
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    models = {"distbelief": ours, "torchvision": reference}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + steps):
        # Swap who goes first each round, so neither always runs on a cache the other warmed.
        order = list(models) if i % 2 == 0 else list(reversed(models))
        for k in order:
            t = step_time(models[k], x, y, opts[k])
            if i >= warmup:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "ours_s": med["distbelief"], "torchvision_s": med["torchvision"],
            "ratio": med["torchvision"] / med["distbelief"],
            "images_per_s": batch / med["distbelief"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=112, help="square input side in px")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; batch {args.batch_size}, "
          f"{args.size}x{args.size}, median of {args.steps} steps")
    print(f"{'model':<10} {'ours s/step':>12} {'tv s/step':>10} {'ours img/s':>11} {'ratio':>6}")
    for name in args.models:
        r = compare(name, args.batch_size, args.size, args.steps, args.warmup)
        print(f"{r['model']:<10} {r['ours_s']:>12.3f} {r['torchvision_s']:>10.3f} "
              f"{r['images_per_s']:>11.1f} {r['ratio']:>6.3f}")


if __name__ == "__main__":
    main()
