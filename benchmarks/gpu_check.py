"""One GPU check, prepared: what a person with a GPU runs once, under 8 minutes on one H100 or
H200, writing one results file to paste into docs/benchmarks.md.

Sections, each timed and each kept in the results file as soon as it ends (a section that fails
says why in its place and the others still run):
1. the GPU-marked tests (`pytest -m gpu`);
2. `bench_fast`: the eager step against the compiled one (CUDA graphs) for ResNet-20 and
   ResNet-56 at batch 128, bf16, channels-last, with the compiled trainer's compile and
   CUDA-graph recording counts (any after the warm-up steps fails the check);
3. ResNet-20 on CIFAR-10 with the `cifar10-paper` recipe (the full 64k-iteration schedule,
   compiled, bf16) for up to --cifar-seconds: iterations reached, images/s, training and test
   error, and the time the whole schedule takes at that rate;
4. Downpour SGD with 8 replicas x 2 shards on the machine's CPU cores against the single
   process on the same cores (digits, ResNet-20).

--cpu-dry-run runs every section on the CPU at tiny sizes (the test suite does, so that the
check cannot rot before a GPU arrives). Exit status: 0 when every section passed and nothing
compiled after the warm-up, 1 otherwise.

    benchmarks/gpu_check.sh [--out gpu-check.md] [--cifar-seconds 120]
                            [--data-dir ../shared/data/cifar-10-batches-py] [--cpu-dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_fast, beside this file


class Results:
    """The results file: a header, then one section per step, rewritten (atomically) after
    each, so that a check cut short keeps what it measured."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.lines, self.failed = path, header, []

    def section(self, title: str, run) -> None:
        print(f"gpu-check: {title} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            body, ok = run()
        except Exception as e:  # a section's failure is reported in its place; the rest run
            body, ok = [f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}"], False
        seconds = time.perf_counter() - start
        self.lines += ["", f"## {title} ({seconds:.0f} s)", "", *body]
        if not ok:
            self.failed.append(title)
        self.write()

    def write(self) -> None:
        from distbelief.engine.checkpoint import atomic_write_text

        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


def header(args) -> list[str]:
    import torch

    gpu = (f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
           if torch.cuda.is_available() else "no GPU")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"# GPU check{' (CPU dry run: tiny sizes, numbers mean nothing)' if args.dry else ''}",
            "", f"- command: `benchmarks/gpu_check.sh {' '.join(sys.argv[1:])}`".rstrip(),
            f"- machine: {platform.node()}, {gpu}, {os.cpu_count()} CPU cores",
            f"- torch {torch.__version__}, Python {platform.python_version()}; date {when}"]


def gpu_tests(args):
    """The GPU-marked tests; on the CPU (dry run) they are collected and skipped."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                           "no:cacheprovider", "tests"], cwd=HERE.parent, capture_output=True,
                          text=True, timeout=args.tests_timeout)
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    return ["```", *failed, *tail, "```"], proc.returncode in (0, 5) and not failed


def fast_step(args):
    import bench_fast

    lines = ["| model | batch | eager ms/step | compiled ms/step | speed-up | warm-up s | "
             "compiles | recordings | after warm-up |", "|" + "---|" * 9]
    ok = True
    for model in args.fast_models:
        settings = bench_fast.parser().parse_args([])
        settings.model, settings.batch_size, settings.device = model, args.batch, args.device
        settings.steps, settings.rounds, settings.warmup = args.steps, args.rounds, 10
        settings.bf16 = settings.channels_last = not args.dry
        got = bench_fast.measure(settings)
        events = got["compile_events"]
        late = events["after_warmup"]
        ok &= late == {"compiles": 0, "recordings": 0}
        lines.append(f"| {model} | {args.batch} | {got['eager_ms']:.2f} | "
                     f"{got['compiled_ms']:.2f} | {got['speedup']:.2f}x | "
                     f"{got['warmup_s']:.0f} | {events['compiles']} | {events['recordings']} "
                     f"| {late['compiles']} + {late['recordings']} |")
    lines += ["", f"Device: {got['device']} ({got['where']}). Goal for ResNet-20 at batch "
              f"128 on a GPU: >= 4x. 'after warm-up' (compiles + recordings) must be 0."]
    return lines, ok


def cifar_run(args):
    """ResNet-20, `cifar10-paper`, stopped after --cifar-seconds (the whole schedule if the
    rate allows)."""
    from distbelief.engine import Trainer, TrainingInterrupted
    from distbelief.recipes import get_recipe

    config = get_recipe("cifar10-paper", "resnet20").replace(
        data_dir=args.data_dir, device=args.device, compile=not args.dry, bf16=not args.dry,
        channels_last=True, log_every=100 if not args.dry else 2, eval_every=0,
        checkpoint_every=10**9)
    if args.dry:
        config = config.replace(data="synthetic", synthetic_size=64,
                                synthetic_shape=(3, 32, 32), batch_size=8)
    elif not Path(args.data_dir).is_dir():
        return [f"skipped: no CIFAR-10 at {args.data_dir} (give --data-dir)"], True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        trainer = Trainer(config, Path(folder) / "run")
        timer = threading.Timer(args.cifar_seconds, trainer.request_stop)
        timer.start()
        try:
            trainer.fit()
        except TrainingInterrupted:
            pass  # the time was up: a checkpoint was written, the numbers below are its
        finally:
            timer.cancel()
        last = trainer.life.last_train or {}
        test = trainer.evaluate("test")
    done, rate = trainer.iteration, trainer.iteration / max(trainer.train_s, 1e-9)
    full = config.iterations / max(rate, 1e-9)
    lines = [f"- {done:,} of {config.iterations:,} iterations in {trainer.train_s:.0f} s of "
             f"training ({rate:.0f} iterations/s, {last.get('images_per_s', 0):,.0f} images/s "
             f"in the last window)",
             f"- training error {100 * (last.get('error') or 0):.2f}% (last window), test "
             f"error {100 * test['error']:.2f}% at iteration {done:,}",
             f"- the whole schedule at this rate: {full / 60:.1f} min (paper: 8.75% test "
             f"error at 64k)"]
    return lines, done > 0


def downpour(args):
    """Downpour replicas on the CPU cores against the single process on the same cores."""
    import ray

    from distbelief.distributed import DownpourTrainer
    from distbelief.distributed.runtime.startup import start_ray
    from distbelief.engine import Trainer
    from distbelief.recipes import get_recipe

    base = get_recipe("digits", args.downpour_model).replace(iterations=args.downpour_steps,
                                        milestones=(args.downpour_steps,), eval_every=0,
                                        checkpoint_every=0, log_every=50, device="cpu")
    single = Trainer(base).fit()
    start_ray()
    try:
        many = DownpourTrainer(base.replace(mode="downpour", replicas=args.replicas,
                                            ps_shards=2)).fit()
    finally:
        ray.shutdown()
    ratio = many["images_per_s"] / single["images_per_s"]
    return ["| run | images/s | ratio | test error % |", "|---|---|---|---|",
            f"| single process | {single['images_per_s']:.0f} | 1.00 | "
            f"{100 * single['test_error']:.2f} |",
            f"| downpour {args.replicas} replicas x 2 shards | {many['images_per_s']:.0f} | "
            f"{ratio:.2f} | {100 * many['test_error']:.2f} |", "",
            f"digits, {args.downpour_model}, batch 64, {args.downpour_steps} minibatches in all, "
            f"{os.cpu_count()} cores shared."], True


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check.md", type=Path)
    parser.add_argument("--cifar-seconds", type=float, default=120.0)
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data" /
                                                  "cifar-10-batches-py"))
    parser.add_argument("--cpu-dry-run", dest="dry", action="store_true",
                        help="every section on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    sizes = dict(fast_models=["resnet20", "resnet56"], batch=128, steps=50, rounds=3,
                 device="cuda", replicas=8, downpour_model="resnet20", downpour_steps=800,
                 tests_timeout=300)
    if args.dry:  # a dense net keeps inductor's CPU compile to seconds
        sizes = dict(fast_models=["mlp"], batch=16, steps=2, rounds=1, device="cpu",
                     replicas=2, downpour_model="mlp", downpour_steps=20, tests_timeout=120)
        args.cifar_seconds = min(args.cifar_seconds, 3.0)
    for name, value in sizes.items():
        setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = arguments(argv)
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; --cpu-dry-run runs the check on the CPU at "
              "tiny sizes", file=sys.stderr)
        return 2
    results = Results(args.out, header(args))
    results.section("GPU-marked tests", lambda: gpu_tests(args))
    results.section("Compiled step against eager (bench_fast)", lambda: fast_step(args))
    results.section("ResNet-20 on CIFAR-10, cifar10-paper, timed", lambda: cifar_run(args))
    results.section(f"Downpour, {args.replicas} replicas on the CPU cores, against the single "
                    f"process", lambda: downpour(args))
    verdict = "passed" if not results.failed else f"FAILED: {', '.join(results.failed)}"
    results.lines += ["", f"Check {verdict}."]
    results.write()
    print(f"gpu-check: {verdict}; results in {args.out}", file=sys.stderr)
    return 0 if not results.failed else 1


if __name__ == "__main__":
    sys.exit(main())
