"""The `stepnet` command. Each package registers its subcommands from a small `cli` module that
imports nothing heavy, so `stepnet --help` is instant and `stepnet serve` works in the torch-free
serving image.

Mistakes the user can fix (UserError) print one line on stderr and exit 2; --debug shows the
traceback instead.
"""

import argparse
import importlib
import sys

from stepnet import __version__
from stepnet.errors import UserError

COMMAND_MODULES = ("models.cli", "service.cli", "analysis.cli", "export.cli",
                   "benchmarks.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepnet",
        description="StepNet: train, evaluate, export and serve image classifiers whose residual "
                    "blocks take adaptive, stiffness-aware step sizes (docs/design.md section 1).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"stepnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv                      # the command as given, for launchers that re-run it
    try:
        return args.run(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"stepnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if args.debug:
            raise
        print(f"stepnet {args.command}: error: this command needs the Python package {exc.name!r}; "
              f"install the matching extra (pip install 'stepnet[train]' or 'stepnet[serve]')",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
