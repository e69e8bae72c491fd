"""The `distbelief` command line.

Each subcommand is a small function taking parsed arguments and returning an exit code. Errors
that are the user's input (`DistbeliefError`) print as one line on stderr with exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from distbelief import __version__
from distbelief.errors import CheckpointError, ConfigError, DistbeliefError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
# Fields with their own options (recipe and model pick the base config; out and resume the run).
_OWN_OPTIONS = ("recipe", "model")
# Second spellings of config options: the paper's name for the server's update rule.
_ALIASES = {"optimizer": ["--ps-optimizer"]}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error of ours."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _format_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _models_table(rows: list[dict]) -> str:
    header = ("name", "family", "depth", "shortcuts", "params", "MACs", "input")
    lines = [
        (r["name"], r["family"], str(r["depth"]), "yes" if r["residual"] else "no",
         f"{r['params']:,}", _format_count(r["macs"]), f"{r['input_size']}x{r['input_size']}")
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    # Text columns align left, numbers right.
    align = ("<", "<", ">", "<", ">", ">", ">")
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths))
    return "\n".join(fmt.format(*line).rstrip() for line in (header, *lines))


def cmd_models(args: argparse.Namespace) -> int:
    from distbelief.models import list_models, model_info, summarize

    names = args.names or list_models(args.family)
    for name in names:
        model_info(name)  # fail on a bad name before spending time on the others
    options = {"shortcut": args.shortcut, "variant": args.variant}
    options = {k: v for k, v in options.items() if v is not None}
    if args.partitions is not None:
        return _print_split(names, args, options)
    if args.partition_at:
        raise ConfigError("--partition-at applies with --partitions")
    rows = [summarize(name, input_size=args.input_size, **options) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_models_table(rows))
    return 0


def _print_split(names: list[str], args: argparse.Namespace, options: dict) -> int:
    """`models NAME --partitions P`: how each model is cut (model parallelism)."""
    from distbelief.distributed.pipeline.partition import split_table

    rows = [row for name in names
            for row in split_table(name, args.partitions, args.input_size, args.partition_at,
                                   **options)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("model", "partition", "units", "params", "MACs", "share", "state",
              "activations/example")
    total = {}
    for r in rows:
        total[r["model"]] = total.get(r["model"], 0) + r["macs"]
    lines = [(r["model"], str(r["partition"]), r["units"], f"{r['params']:,}",
              _format_count(r["macs"]), f"{r['macs'] / max(total[r['model']], 1):.0%}",
              _format_bytes(r["state_bytes"]), _format_bytes(r["activation_bytes_per_example"]))
             for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip("<><>>>>>", widths))
    print("\n".join(fmt.format(*line).rstrip() for line in (header, *lines)))
    return 0


_GROUPS = {None: "config overrides (default: the recipe's value)",
           "imagenet": "ImageNet-style folders (--data imagenet)",
           "synthetic": "random images (--data synthetic)",
           "cluster": "distributed modes: replicas, shards and partitions (model parallelism)",
           "downpour": "Downpour SGD (--mode downpour)",
           "sandblaster": "Sandblaster L-BFGS (--mode sandblaster)"}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One --option per TrainConfig field (its sections' included), help from the field; only
    the given ones are set."""
    from distbelief.engine.config import field_types, option_fields

    groups = {section: parser.add_argument_group(title) for section, title in _GROUPS.items()}
    for section, f in option_fields():
        if f.name in _OWN_OPTIONS:
            continue
        base, _ = field_types()[f.name]
        flags = ["--" + f.name.replace("_", "-")] + _ALIASES.get(f.name, [])
        if base is bool:
            groups[section].add_argument(*flags, action=argparse.BooleanOptionalAction,
                                         default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            metavar = {int: "N", float: "X", tuple: "N,N,..."}.get(base, f.name.upper())
            groups[section].add_argument(*flags, default=argparse.SUPPRESS, metavar=metavar,
                                         help=f.metadata["help"])


def _config_from_args(args: argparse.Namespace):
    from distbelief.engine.config import MISSING_PARTS, MissingParts, coerce, field_types
    from distbelief.engine.rundir import RunDir
    from distbelief.recipes import get_recipe

    overrides = {name: coerce(name, getattr(args, name)) for name in field_types()
                 if name not in _OWN_OPTIONS and hasattr(args, name)}
    if "epochs" in overrides and "iterations" in overrides:
        raise ConfigError("give --iterations or --epochs, not both")
    if "iterations" in overrides:
        overrides["epochs"] = None
    if args.model is not None:
        overrides["model"] = args.model
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
        base = RunDir(args.out).read_config()
        if isinstance(base.user, MissingParts):
            raise ConfigError(MISSING_PARTS)
        if overrides.get("mode", base.mode) != base.mode:
            raise CheckpointError(f"{args.out} holds a {base.mode} run; resume it with "
                                  f"--mode {base.mode}")
    else:
        base = get_recipe(args.recipe, args.model)
    return base.replace(**overrides)


def _default_out(config) -> str:
    import datetime

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"runs/{config.recipe}-{config.model}-{stamp}"


def _trainer(config, out: str, args: argparse.Namespace):
    """The trainer of `config`'s scheme, ready to `fit()`."""
    from distbelief.api import trainer_for

    return trainer_for(config, out, resume=args.resume, progress=not args.quiet,
                       address=args.address, dashboard=args.dashboard)


def _summary_line(config, summary: dict, out: str) -> str:
    how = []
    if config.mode == "sandblaster":
        how = [f"Sandblaster L-BFGS, {config.cluster.replicas} replicas, "
               f"{config.cluster.ps_shards} shards, {config.sandblaster.portions} portions"]
        if summary["converged"]:
            how.append(f"converged: {summary['converged']}")
    elif config.mode == "downpour":
        how = [f"Downpour, {config.cluster.replicas} replicas, {config.cluster.ps_shards} shards"]
    elif config.mode == "sync":
        how = [f"sync, {config.cluster.replicas} workers x batch {config.batch_size}"]
    if config.cluster.partitions > 1:
        how.append(f"{config.cluster.partitions} partitions x {config.cluster.micro_batches} "
                   f"micro-batches")
    if config.optimizer != "sgd" and config.mode != "sandblaster":
        how.append(config.optimizer)
    return (f"{config.model} on {config.data}{' (' + ', '.join(how) + ')' if how else ''}: "
            f"test accuracy {summary['test_accuracy']:.2%} "
            f"(top-1 error {summary['test_error']:.2%}, top-5 {summary['test_top5_error']:.2%}) "
            f"after {summary['iterations']} iterations in {summary['wall_s']:.1f} s, "
            f"{summary['images_per_s']:,.0f} images/s; run: {out}")


def cmd_train(args: argparse.Namespace) -> int:
    from distbelief.engine import TrainingInterrupted

    config = _config_from_args(args)
    out = args.out or _default_out(config)
    trainer = _trainer(config, out, args)
    try:
        summary = trainer.fit()  # SIGINT or SIGTERM: checkpoint and stop (engine.lifecycle)
    except TrainingInterrupted as e:
        print(f"distbelief: {e}{f' --out {out}' if e.resumable else ''}", file=sys.stderr)
        return 128 + e.signum if e.signum else EXIT_INTERRUPTED  # 130 Ctrl-C, 143 SIGTERM
    print(_summary_line(trainer.config, summary, out))
    return 0


def _parse_scales(text: str) -> tuple[int, ...]:
    try:
        scales = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--scales takes comma-separated sizes in px, got {text!r}") from None
    if not scales or min(scales) <= 0:
        raise ConfigError(f"--scales takes positive sizes in px, got {text!r}")
    return scales


def cmd_eval(args: argparse.Namespace) -> int:
    from distbelief.engine import evaluate, load_for_eval

    if args.ten_crop and args.scales:
        raise ConfigError("choose --ten-crop or --scales, not both")
    scales = _parse_scales(args.scales) if args.scales else ()
    overrides = {k: v for k, v in (("data", args.data), ("data_dir", args.data_dir),
                                   ("eval_batch_size", args.batch_size),
                                   ("num_workers", args.num_workers)) if v is not None}
    # A checkpoint trained on a GPU evaluates anywhere: the device is this machine's choice.
    overrides["device"] = args.device or "auto"
    if args.data is not None and args.data_dir is None and args.data in ("digits", "synthetic"):
        overrides["data_dir"] = None
    model, data, config = load_for_eval(args.checkpoint, overrides)
    if args.split not in data.splits:
        raise ConfigError(f"this data has no {args.split!r} split "
                          f"(choose from {', '.join(data.splits)})")
    views = "tencrop" if args.ten_crop else "multiscale" if scales else "center"
    result = evaluate(model, data.splits[args.split].batches(views, scales),
                      channels_last=config.channels_last, bf16=config.bf16,
                      views=views == "tencrop")
    result.update(model=config.model, data=config.data, split=args.split, views=views,
                  scales=list(scales), accuracy=1 - result["error"])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        how = {"center": "single view", "tencrop": "10-crop",
               "multiscale": "scales " + ",".join(map(str, scales))}[views]
        print(f"{config.model} on {config.data} {args.split} ({result['images']} images, {how}): "
              f"accuracy {result['accuracy']:.2%}, top-1 error {result['error']:.2%}, "
              f"top-5 error {result['top5_error']:.2%}, loss {result['loss']:.4f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distbelief.engine.weights import export_state_dict

    count, caveat = export_state_dict(args.run, args.torchvision)
    if caveat:
        print(f"distbelief: note: {caveat}", file=sys.stderr)
    print(f"wrote {args.torchvision}: {count} tensors, a torchvision-format state dict "
          f"(load_state_dict(torch.load(...)) or --init-from)")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from distbelief.api import replay

    report = replay(args.run, until=args.until, out=args.out)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report.get("equal", True) else 1
    what = (f"replayed {report['minibatches']} minibatches of {args.run} "
            f"({report['pushes']} pushes, {report['incarnations']} replica processes, "
            f"{report['threads']} thread{'s' if report['threads'] != 1 else ''})")
    if report.get("source") == "diverged":
        what += ", from the histories kept when it diverged"
    if report["diverged_at"] is not None:
        what += f"; the server stopped being finite at minibatch {report['diverged_at']}"
    elif report.get("source") == "diverged":
        what += "; every push was finite (a replica's loss broke first: its pushes were dropped)"
    if "equal" in report:
        what += (": the shards equal the checkpoint's bit for bit" if report["equal"] else
                 f": the shards differ from the checkpoint's (max |diff| "
                 f"{report['max_abs_diff']:.3g}; another machine or thread count?)")
    print(what + (f"; wrote {args.out}" if args.out else ""))
    return 0 if report.get("equal", True) else 1


def cmd_plot(args: argparse.Namespace) -> int:
    from distbelief.plot import plot_runs

    print(plot_runs(args.run_dirs, args.output, title=args.title, x=args.x))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from distbelief.engine import load_for_eval
    from distbelief.paper.responses import layer_responses, sorted_stds

    overrides = {k: v for k, v in (("data_dir", args.data_dir),
                                   ("eval_batch_size", args.batch_size)) if v is not None}
    overrides["device"] = args.device or "auto"
    model, data, config = load_for_eval(args.checkpoint, overrides)
    if args.split not in data.splits:
        raise ConfigError(f"this data has no {args.split!r} split "
                          f"(choose from {', '.join(data.splits)})")
    try:
        rows = layer_responses(model, data.splits[args.split].batches(),
                               channels_last=config.channels_last)
    except ValueError as e:
        raise ConfigError(f"{config.model}: {e}") from None
    if args.json:
        print(json.dumps({"model": config.model, "split": args.split, "layers": rows,
                          "sorted": sorted_stds(rows)}, indent=2))
        return 0
    ranks = {id(r): i + 1 for i, r in enumerate(sorted(rows, key=lambda r: -r["std"]))}
    print(f"{config.model}: std of each 3x3 layer's response (after BN, before ReLU or "
          f"addition) on the {args.split} split")
    print(f"{'index':>5}  {'layer':<18} {'std':>8}  {'rank':>4}")
    for r in rows:
        print(f"{r['index']:>5}  {r['layer']:<18} {r['std']:>8.4f}  {ranks[id(r)]:>4}")
    mean = sum(r["std"] for r in rows) / len(rows)
    print(f"mean {mean:.4f} over {len(rows)} layers")
    return 0


def _parse_models(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(m.strip() for m in text.split(",") if m.strip())


def cmd_reproduce(args: argparse.Namespace) -> int:
    from distbelief.engine import TrainingInterrupted
    from distbelief.paper import reproduce

    def say(line: str) -> None:
        print(f"reproduce {args.experiment}: {line}", file=sys.stderr, flush=True)

    try:
        results = reproduce(args.experiment, args.out, budget=args.budget, data=args.data,
                            data_dir=args.data_dir, device=args.device,
                            models=_parse_models(args.models), parallel=args.parallel,
                            compile=args.compile, bf16=args.bf16, seed=args.seed,
                            seeds=args.seeds, say=say,
                            progress=not args.quiet)
    except TrainingInterrupted as e:
        print(f"distbelief: {e}", file=sys.stderr)
        return 128 + e.signum if e.signum else EXIT_INTERRUPTED
    for check in results["checks"]:
        print(f"{check['mark']}: {check['claim']}"
              + (f" ({check['detail']})" if check["detail"] else ""))
    print(f"report: {results['report']}")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo with parameter and multiply-add counts",
                       description="List registered models with parameters and multiply-adds "
                                   "(MACs) of one forward pass at the family's native input size.")
    p.add_argument("names", nargs="*", metavar="NAME", help="models to show (default: all)")
    p.add_argument("--family", choices=("cifar", "imagenet", "dense"), help="only this family")
    p.add_argument("--shortcut", help="shortcut option A, B or C (default: the family's)")
    p.add_argument("--variant", help="bottleneck stride placement: paper or v1.5 (default paper)")
    p.add_argument("--input-size", type=int, metavar="PX",
                   help="square input side for the MAC count (default: 32 CIFAR, 224 ImageNet)")
    p.add_argument("--partitions", type=int, metavar="P",
                   help="show how the model is cut into P partitions for model parallelism "
                        "(units, parameters and MACs per partition)")
    p.add_argument("--partition-at", default="", metavar="UNITS",
                   help="with --partitions: cut where these units begin parts 2 .. P "
                        "(comma-separated) instead of the balanced cut")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_models)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model with a recipe, overriding any field",
                       description="Train a model on one device, or on Ray with --mode "
                                   "downpour (asynchronous SGD replicas and a sharded parameter "
                                   "server) or --mode sandblaster (L-BFGS from a coordinator, "
                                   "batch gradients from replicas in portions, vectors on the "
                                   "shards). A run directory (--out) "
                                   "receives config.yaml, metrics.jsonl, checkpoints/last.pt and "
                                   "summary.json; the last line printed is the summary.")
    p.add_argument("--recipe", default="digits",
                   help="digits (default), digits-downpour, digits-sandblaster, cifar10-paper or "
                        "imagenet-paper")
    p.add_argument("--model", help="registered model name (default: the recipe's)")
    p.add_argument("--out", metavar="RUN_DIR",
                   help="run directory (default: runs/RECIPE-MODEL-TIMESTAMP); must not hold "
                        "a run unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or evaluation lines: only the summary line")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="--mode downpour or sandblaster, or --partitions: join this Ray cluster "
                        "(host:port or 'auto'; default: start a local Ray on 127.0.0.1 and "
                        "stop it at the end)")
    p.add_argument("--dashboard", action="store_true",
                   help="--mode downpour or sandblaster, or --partitions: start the local Ray "
                        "with its dashboard (needs 'pip install ray[default]')")
    _add_config_options(p)
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (single view, 10-crop or multi-scale)",
                       description="Evaluate a checkpoint on the test split of its data or "
                                   "of --data / --data-dir.")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint .pt file")
    p.add_argument("--data", help="dataset (default: the checkpoint's)")
    p.add_argument("--data-dir", metavar="DIR", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", default="test", help="test (default) or val")
    p.add_argument("--ten-crop", action="store_true",
                   help="imagenet: average 10 crops (corners, centre and mirrors)")
    p.add_argument("--scales", metavar="PX,PX,...",
                   help="imagenet: fully-convolutional test averaged over these shorter sides "
                        "and their mirrors, e.g. 224,256,384,480,640")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per batch")
    p.add_argument("--num-workers", type=int, metavar="N", help="imagenet decoding workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="where to evaluate (default: auto, whatever the training used)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_eval)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as a torchvision-format state dict",
                       description="Write the model of a run directory (its checkpoints/"
                                   "last.pt) or of a checkpoint file as a plain state dict "
                                   "with torchvision's module names: the ImageNet ResNets load "
                                   "into torchvision.models.resnetNN with strict=True, and any "
                                   "model into a run with --init-from.")
    p.add_argument("run", metavar="RUN", help="a run directory or a checkpoint .pt file")
    p.add_argument("--torchvision", required=True, metavar="OUT.pt",
                   help="the file to write (never overwritten)")
    p.set_defaults(func=cmd_export)


def _add_replay(sub) -> None:
    p = sub.add_parser("replay", help="re-execute a Downpour run recorded with --record-order",
                       description="Re-execute, in this process, the order in which a Downpour "
                                   "run's shards served pulls and applied pushes (recorded in "
                                   "its newest checkpoint by --record-order): the real "
                                   "replicas recompute every gradient, the real shards apply "
                                   "them in that order. On the CPU with --deterministic the "
                                   "result equals the run's checkpoint bit for bit (exit 1 "
                                   "when it does not).")
    p.add_argument("run", metavar="RUN_DIR", help="the run directory")
    p.add_argument("--until", type=int, metavar="N", default=None,
                   help="stop where every shard has received N minibatches (to inspect)")
    p.add_argument("--out", metavar="OUT.pt", default=None,
                   help="write the replayed model as a checkpoint (never overwritten)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_replay)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="training and test error curves of runs (Fig. 6 style)",
                       description="Plot training (dashed) and test (bold) error against "
                                   "iterations, wall time or images for one or more run "
                                   "directories.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--output", default="errors.png", metavar="FILE",
                   help="output .png, .pdf or .svg (default: errors.png)")
    p.add_argument("--title")
    p.add_argument("--x", default="iterations", choices=("iterations", "wall", "examples"),
                   help="x axis: iterations (Fig. 6), wall-clock seconds or images processed "
                        "(DistBelief Fig. 4, to compare single-process and Downpour runs)")
    p.set_defaults(func=cmd_plot)


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="analyses of a trained model (Fig. 7 layer responses)",
                       description="Analyses of a trained model.")
    kinds = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS",
                             parser_class=_Parser)
    r = kinds.add_parser("responses", help="std of each 3x3 layer's response (Fig. 7)",
                         description="The standard deviation of each 3x3 layer's output after "
                                     "its BN, before the ReLU or the shortcut addition, over a "
                                     "split, per layer in the original order with its rank by "
                                     "magnitude (He et al., 2015, Fig. 7).")
    r.add_argument("--checkpoint", required=True, metavar="FILE", help="a checkpoint .pt file")
    r.add_argument("--split", default="test", help="test (default) or val")
    r.add_argument("--data-dir", metavar="DIR", help="dataset folder (default: the checkpoint's)")
    r.add_argument("--batch-size", type=int, metavar="N", help="images per batch")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    r.add_argument("--json", action="store_true", help="print a JSON object")
    r.set_defaults(func=cmd_analyze)


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", help="run one of the paper's experiments and write a report",
                       description="Train what an experiment needs (runs in OUT/runs, shared "
                                   "by the experiments; finished ones are skipped, unfinished "
                                   "ones resumed) and write OUT/EXPERIMENT/report.md with our "
                                   "numbers and figures beside the paper's. table1: parameters "
                                   "and multiply-adds; table6: CIFAR-10 ResNets; fig6: error "
                                   "curves of plain nets and ResNets; fig7: layer responses; "
                                   "downpour: DistBelief Fig. 4 at reduced scale; fig4: "
                                   "DistBelief Fig. 4 for 1 to 64 replicas on a virtual "
                                   "cluster.")
    p.add_argument("experiment", choices=("table1", "table6", "fig6", "fig7", "downpour", "fig4"),
                   metavar="EXPERIMENT", help="table1, table6, fig6, fig7, downpour or fig4")
    p.add_argument("--out", default="reproduction", metavar="DIR",
                   help="output folder (default: reproduction)")
    p.add_argument("--budget", default="short", choices=("short", "medium", "full"),
                   help="short (default): a scaled-down schedule, minutes on a laptop CPU, "
                        "shows early orderings; medium: until the training errors stop "
                        "falling (digits: ~12 min per seed for fig7's nets on 2 cores); "
                        "full: the paper's schedule")
    p.add_argument("--data", choices=("digits", "cifar10"),
                   help="default: digits for short and medium, cifar10 for full")
    p.add_argument("--data-dir", default="data/cifar-10-batches-py", metavar="DIR",
                   help="the CIFAR-10 folder (default: data/cifar-10-batches-py)")
    p.add_argument("--models", metavar="NAME,NAME,...",
                   help="train only these of the experiment's models")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="trainings side by side (processes; several small nets on one GPU)")
    p.add_argument("--compile", action="store_true",
                   help="the GPU fast path: compiled training steps (CUDA graphs on CUDA)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    p.add_argument("--seeds", type=int, default=1, metavar="S",
                   help="S runs of each net, seeds SEED .. SEED+S-1; tables report mean +- "
                        "std and best (table6, fig6, fig7; default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distbelief", description=(
        "Deep residual networks (He et al., 2015) trained DistBelief-style (Dean et al., 2012)."))
    parser.add_argument("--version", action="version", version=f"distbelief {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    _add_models(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_plot(sub)
    _add_replay(sub)
    _add_analyze(sub)
    _add_reproduce(sub)
    return parser


class _Terminated(BaseException):
    """SIGTERM outside a run's own handling (start-up, imports, data loading): stop as Ctrl-C
    does, with its own exit status."""


class _Signals:
    """SIGINT (unless ignored, as a shell's background job has it) and SIGTERM until a run's
    own handling takes over (`engine.lifecycle.stop_on_signals`). While torch and the rest are
    imported they are only remembered: an exception raised inside a C extension's import
    leaves it half loaded (numpy then refuses a second load, torch may re-raise SIGINT at
    exit). `go()` ends that: a remembered signal raises then, and later ones at once
    (KeyboardInterrupt, `_Terminated`)."""

    def __init__(self):
        self.received: list[int] = []
        self.deferred = True
        wanted = [signal.SIGTERM]
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            wanted.append(signal.SIGINT)
        self.previous = {s: signal.signal(s, self.handle) for s in wanted}

    def handle(self, signum, frame):
        self.received.append(signum)
        if not self.deferred:
            raise _interruption(signum)

    def go(self) -> None:
        self.deferred = False
        if self.received:
            raise _interruption(self.received[0])

    def restore(self) -> None:
        for s, handler in self.previous.items():
            if handler is not None:
                signal.signal(s, handler)


def _interruption(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status: 0, 2 for an error of the user's input (one
    line on stderr), 130 for Ctrl-C and 143 for SIGTERM at any moment (a run in progress
    checkpoints first: `engine.lifecycle.stop_on_signals`)."""
    signals = _Signals() if threading.current_thread() is threading.main_thread() else None
    try:
        args = build_parser().parse_args(argv)  # imports torch
        if signals is not None:
            signals.go()
        return args.func(args)
    except DistbeliefError as e:
        print(f"distbelief: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("distbelief: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("distbelief: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        # `distbelief models | head`: the reader left; that is not an error of ours.
        sys.stderr.close()
        return 0
    finally:
        if signals is not None:
            signals.restore()
