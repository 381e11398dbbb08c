"""The `neurohybrid` command line.

Each area of the package contributes its own sub-commands through a ``register(subparsers)``
function in its ``cli`` module, so this file stays a dispatcher. Bad input (InputError) becomes
one line on stderr and exit status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from neurohybrid import __version__
from neurohybrid.errors import InputError

# modules that define register(subparsers); a module not yet present is skipped
COMMAND_MODULES = [
    "neurohybrid.anatomy.cli",
    "neurohybrid.solvers.cli",
    "neurohybrid.synth.cli",
    "neurohybrid.preprocessing.cli",
    "neurohybrid.disorders.cli",
    "neurohybrid.evaluation.cli",
    "neurohybrid.planning.cli",
    "neurohybrid.report.cli",
    "neurohybrid.bench",
    "neurohybrid.runner",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurohybrid",
        description="Hybrid mechanistic + deep-learning models of glioma, Alzheimer's disease and stroke.",
    )
    parser.add_argument("--version", action="version", version=f"neurohybrid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument(
        "--resources", default=None, metavar="MANIFEST",
        help="resources manifest (`neurohybrid resources resolve`): read the template, atlas and normative "
             "connectome from its files instead of the installed packages",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv[1:2]):
        # everything after `run` belongs to snakemake (argparse's REMAINDER drops leading options)
        argv, passthrough = argv[:1], argv[1:]
    else:
        passthrough = None
    args = parser.parse_args(argv)
    if passthrough is not None:
        args.snakemake_args = passthrough
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        if args.resources:
            from neurohybrid.anatomy.resources import using

            # scoped, so a caller running several commands in one process gets no leftover state
            with using(args.resources):
                result = args.func(args)
        else:
            result = args.func(args)
    except InputError as exc:
        print(f"neurohybrid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
