"""The GPU fast path (`--compile`, engine/fast.py) against the eager Trainer, same run.

Both are the real Trainer on the same synthetic CIFAR-shaped data (normalization and
augmentation on the device, as in a run), same settings, same initial weights; the compiled
one first pays its compilation in warm-up steps that are not timed. Rounds alternate (who goes
first swaps each round) so that drift in the machine's speed hits both alike. Reported: median
ms per step over rounds, images/s, and the speed-up eager / compiled (goal on a GPU >= 4x for
ResNet-20 at batch 128: the step is launch-bound there, ~10 ms eager, ~2 ms as a CUDA graph).

    python benchmarks/bench_fast.py [--model resnet20] [--batch-size 128] [--bf16]
        [--channels-last] [--device auto] [--steps 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from distbelief.engine import TrainConfig, Trainer


def _trainer(args, compile: bool) -> Trainer:
    config = TrainConfig().replace(recipe="bench", model=args.model, data="synthetic",
                         synthetic_size=4096, synthetic_shape=(3, 32, 32),
                         batch_size=args.batch_size, iterations=1, lr=0.1, pad=4, flip=True,
                         milestones=(10**9,), log_every=args.steps, eval_every=0,
                         checkpoint_every=0, channels_last=args.channels_last, bf16=args.bf16,
                         device=args.device, compile=compile)
    torch.manual_seed(0)
    return Trainer(config)


def _round(trainer: Trainer, steps: int) -> float:
    """Seconds per step over `steps` more steps (the log at the end waits for the device)."""
    start = time.perf_counter()
    trainer.train_until(trainer.iteration + steps)
    return (time.perf_counter() - start) / steps


def measure(args) -> dict:
    """Eager against compiled in one run: {"eager_ms", "compiled_ms" (median per step),
    "speedup", "warmup_s", "compile_events" (the compiled trainer's), "device", "where"}."""
    eager, fast = _trainer(args, False), _trainer(args, True)
    start = time.perf_counter()
    for t in (eager, fast):
        t.train_until(args.warmup)
    warmup_s = time.perf_counter() - start
    times = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        order = [("eager", eager), ("compiled", fast)][:: 1 if r % 2 == 0 else -1]
        for name, trainer in order:
            times[name].append(_round(trainer, args.steps))
    device = eager.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    events = fast.compiled.events.report()
    fast.close()
    eager_s, fast_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"eager_ms": 1e3 * eager_s, "compiled_ms": 1e3 * fast_s,
            "speedup": eager_s / fast_s, "warmup_s": warmup_s, "compile_events": events,
            "device": str(device), "where": where or platform.machine()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps (compilation)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="auto")
    return p


def main() -> None:
    args = parser().parse_args()
    got = measure(args)
    print(f"warm-up of {args.warmup} steps each, compilation included: {got['warmup_s']:.1f} s")
    print(f"{args.model}, batch {args.batch_size}, bf16={args.bf16}, "
          f"channels_last={args.channels_last}, {got['device']} ({got['where']}), "
          f"torch {torch.__version__}")
    for name in ("eager", "compiled"):
        ms = got[f"{name}_ms"]
        print(f"{name:>9}: {ms:8.2f} ms/step  {args.batch_size / ms * 1e3:10.0f} images/s")
    print(f"speed-up eager / compiled: {got['speedup']:.2f}x")
    events = got["compile_events"]
    print(f"compiled trainer: {events['compiles']} compiles, {events['recordings']} CUDA-graph "
          f"recordings; after the warm-up steps: {events['after_warmup']}")


if __name__ == "__main__":
    main()
