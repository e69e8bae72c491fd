"""Our Trainer's training loop against a minimal hand-written PyTorch loop, same machine, run.

Both train the same model (same initial weights) with the same SGD settings and batch size.
The hand-written loop reuses one pre-made batch: forward, cross-entropy, zero_grad, backward,
step, nothing else. The Trainer does everything a real run does: draws batch i from the
in-memory uint8 data set, normalizes it, sets lr(i), counts errors on the device, logs every
`--log-every` steps. Rounds alternate between the two (who goes first swaps each round) so that
drift in the machine's speed hits both alike. Reported: median seconds per step over rounds and
the ratio hand-written / Trainer (>= 1.0: no overhead; goal >= 0.98).

The Trainer runs through `Trainer.train_until`, the loop that `fit` runs before its final
evaluation; evaluation is not part of either side.

    python benchmarks/bench_trainer.py [--model resnet20] [--batch-size 128] [--steps 30] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from distbelief.engine import TrainConfig, Trainer
from distbelief.engine.setup import build_model
from distbelief.engine.trainer import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="square input side in px")
    parser.add_argument("--train-size", type=int, default=1024, help="synthetic training images")
    parser.add_argument("--steps", type=int, default=30, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    config = TrainConfig().replace(recipe="bench", model=args.model, data="synthetic",
                         synthetic_size=args.train_size, synthetic_shape=(3, args.size, args.size),
                         batch_size=args.batch_size, iterations=1, lr=0.1,
                         milestones=(10**9,), augment=False, log_every=args.log_every,
                         eval_every=0, checkpoint_every=0, eval_batch_size=args.batch_size,
                         channels_last=args.channels_last, device=args.device)
    trainer = Trainer(config)
    device = trainer.device
    trainer.fit()  # one step: allocator and kernels warm

    # Same architecture and initial weights for the hand-written loop.
    plain = build_model(config, trainer.data).to(device)
    plain.load_state_dict(trainer.model.state_dict())
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    plain = plain.to(memory_format=memory_format)
    opt = build_optimizer(config, plain)
    x, y = next(trainer.data.train.batches(0))
    x = x.contiguous(memory_format=memory_format)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def hand_written(steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(plain(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return (time.perf_counter() - start) / steps

    def ours(steps: int) -> float:
        sync()
        start = time.perf_counter()
        trainer.train_until(trainer.iteration + steps)
        sync()
        return (time.perf_counter() - start) / steps

    hand_written(2)
    times = {"hand-written": [], "trainer": []}
    runners = {"hand-written": hand_written, "trainer": ours}
    for r in range(args.rounds):
        for name in (runners if r % 2 == 0 else reversed(runners)):
            times[name].append(runners[name](args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}; {args.model}, batch {args.batch_size}, "
          f"{args.size}x{args.size}, channels_last={args.channels_last}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for name, t in med.items():
        print(f"{name:<13} {t:.4f} s/step  {args.batch_size / t:8.1f} img/s   "
              f"rounds: {', '.join(f'{v:.4f}' for v in times[name])}")
    print(f"ratio hand-written / trainer: {med['hand-written'] / med['trainer']:.3f}")


if __name__ == "__main__":
    main()
