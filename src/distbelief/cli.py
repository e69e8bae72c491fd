"""The `distbelief` command line.

Each subcommand is a small function taking parsed arguments and returning an exit code. Errors
that are the user's input (`DistbeliefError`) print as one line on stderr with exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from distbelief import __version__
from distbelief.errors import DistbeliefError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error of ours."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _format_count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


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
    rows = [summarize(name, input_size=args.input_size, **options) for name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_models_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distbelief", description=(
        "Deep residual networks (He et al., 2015) trained DistBelief-style (Dean et al., 2012)."))
    parser.add_argument("--version", action="version", version=f"distbelief {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    p = sub.add_parser("models", help="list the model zoo with parameter and multiply-add counts",
                       description="List registered models with parameters and multiply-adds "
                                   "(MACs) of one forward pass at the family's native input size.")
    p.add_argument("names", nargs="*", metavar="NAME", help="models to show (default: all)")
    p.add_argument("--family", choices=("cifar", "imagenet"), help="only this family")
    p.add_argument("--shortcut", help="shortcut option A, B or C (default: the family's)")
    p.add_argument("--variant", help="bottleneck stride placement: paper or v1.5 (default paper)")
    p.add_argument("--input-size", type=int, metavar="PX",
                   help="square input side for the MAC count (default: 32 CIFAR, 224 ImageNet)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistbeliefError as e:
        print(f"distbelief: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("distbelief: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `distbelief models | head`: the reader left; that is not an error of ours.
        sys.stderr.close()
        return 0
