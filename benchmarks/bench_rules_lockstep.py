"""Staleness rules without timing noise: N replicas in lockstep round robin, in one process.

Each replica computes its gradient on the parameters it fetched right after its own last push,
so every push arrives after exactly N - 1 others (staleness N - 1, what 2 Downpour replicas with
the fetch wait measure: ~1.0). The server is one real `ParameterShard` applying each rule of
--rules (`distributed/downpour/rules.py`); "single" is one replica without staleness, the
single-process trainer's SGD. Same data slices and initial model as `--mode downpour`, no Ray.
Prints, per rule, the training error of the last 100 minibatches at every --report minibatches
(minibatches over all replicas, as --iterations counts them).

    python benchmarks/bench_rules_lockstep.py --data-dir ../shared/data/cifar-10-batches-py \\
        [--recipe cifar10-paper] [--replicas 2] [--minibatches 400] [--rules single none dana]

What it isolates: the cost of the delay itself, at staleness N - 1, under each rule. Run it
alone: it takes the whole machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from distbelief.data import build_data
from distbelief.distributed.downpour import ParameterShard
from distbelief.distributed.downpour.replica import initial_model
from distbelief.distributed.flat import FlatModel
from distbelief.engine.losses import get_loss
from distbelief.engine.setup import place_model
from distbelief.recipes import get_recipe


def lockstep(config, replicas: int, minibatches: int, report: int) -> list[float]:
    """Training error of the last `report` minibatches, every `report` minibatches."""
    device = torch.device("cpu")
    data = [build_data(config, device, part=(i, replicas) if replicas > 1 else None)
            for i in range(replicas)]
    streams = [d.train.batches(0) for d in data]
    model = place_model(initial_model(config, data[0]), config, device)
    model.train()
    flat, loss_fn = FlatModel(model), get_loss(config.loss)
    vector = flat.vector()
    shard = ParameterShard(0, 0, vector.numel(), flat.n_params, vector, config)
    fetched = [shard.pull(source=i) for i in range(replicas)]
    no_buffers = torch.zeros(flat.n_buffers)
    wrong, errors = [], []
    for k in range(minibatches):
        i = k % replicas
        w, version = fetched[i]
        flat.load_parts(w[:flat.n_params], flat.buffer_vector())
        x, y = next(streams[i])
        logits = model(x.contiguous(memory_format=torch.channels_last))
        model.zero_grad(set_to_none=True)
        loss_fn(logits, y).backward()
        wrong.append(float(loss_fn.wrong(logits, y)) / len(y))
        shard.push(torch.cat([flat.gradient(), no_buffers]), version, source=(i, "ls", k + 1))
        fetched[i] = shard.pull(source=i)
        if (k + 1) % report == 0:
            errors.append(100 * sum(wrong[-report:]) / report)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--recipe", default="cifar10-paper")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--minibatches", type=int, default=400)
    parser.add_argument("--report", type=int, default=100)
    parser.add_argument("--rules", nargs="+", default=["single", "none", "momentum", "dana"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = get_recipe(args.recipe).replace(channels_last=True, **(
        {"data_dir": args.data_dir} if args.data_dir else {}))
    print(f"# {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.recipe}, {args.minibatches} minibatches, {args.replicas} replicas in lockstep")
    print("rule       replicas  train error of the last "
          f"{args.report} at every {args.report} minibatches   seconds")
    for rule in args.rules:
        replicas = 1 if rule == "single" else args.replicas
        config = base.replace(staleness_rule="none" if rule == "single" else rule,
                              replicas=replicas)
        start = time.perf_counter()
        errors = lockstep(config, replicas, args.minibatches, args.report)
        print(f"{rule:<10} {replicas:>8}  {' / '.join(f'{e:.1f}%' for e in errors)}   "
              f"{time.perf_counter() - start:.0f}", flush=True)


if __name__ == "__main__":
    main()
