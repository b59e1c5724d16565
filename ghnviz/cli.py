"""The `ghnviz` / `python -m ghnviz` command line.

Sub-commands are registered in :data:`COMMANDS`: a name maps to the module that defines
``add_parsers(subparsers)``. Each sub-command sets ``func`` on its parser; ``func(args)`` returns an
exit code. Modules are imported only to build the parser; heavy imports (torch) happen inside the
handlers, so ``python -m ghnviz --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules that contribute sub-commands, in the order they appear in --help
COMMANDS: tuple[str, ...] = (
    'ghnviz.cli_core',  # predict, graph
    'ghnviz.cli_runs',  # finetune, runs
    'ghnviz.cli_train',  # train, evaluate
    'ghnviz.cli_embed',  # embed
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='ghnviz',
        description='Graph HyperNetworks: predict, inspect and fine-tune parameters of unseen architectures.',
    )
    parser.add_argument('-v', '--verbose', action='store_true', help='log debug messages')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that group of commands is not part of this installation
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format='%(levelname)s %(name)s: %(message)s'
    )
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f'ghnviz {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    raise SystemExit(main())
