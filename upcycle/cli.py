"""The `upcycle` command line.

Each command is a small function registered in `COMMANDS` with its argument setup. Every
user-fixable problem raises `UpcycleError`; `main` prints its one sentence to stderr and exits with
code 2, with a traceback only under `--debug`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from upcycle import __version__
from upcycle.errors import UpcycleError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint folder (HF dense or upcycle native)")
    parser.add_argument("--no-tensors", action="store_true", help="print the summary only, not every tensor")


def _run_inspect(args: argparse.Namespace) -> int:
    from upcycle.inspect import inspect_checkpoint

    inspect_checkpoint(args.path, show_tensors=not args.no_tensors)
    return 0


def _configure_init(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file with ModelConfig keys (see README, 'Model config')")
    parser.add_argument("out_dir", help="the native checkpoint folder to create")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument(
        "--std", type=float, default=0.02, help="std of the normal initialisation (default 0.02)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def _run_init(args: argparse.Namespace) -> int:
    from upcycle.checkpoint.atomic import check_target
    from upcycle.checkpoint.native import save_native
    from upcycle.model.config import ModelConfig
    from upcycle.model.init import init_weights
    from upcycle.model.transformer import Transformer
    from upcycle.yaml_config import load_yaml_model

    config = load_yaml_model(args.config, ModelConfig)
    check_target(Path(args.out_dir), args.overwrite)
    model = init_weights(Transformer(config), std=args.std, seed=args.seed)
    save_native(model, args.out_dir, overwrite=args.overwrite)
    print(f"wrote a freshly initialised model to {args.out_dir}")
    return 0


def _configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a convert YAML (see README, 'Convert config')")
    parser.add_argument("out_dir", help="the checkpoint folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_convert(args: argparse.Namespace) -> int:
    from upcycle.conversion import convert

    out = convert(args.config, args.out_dir, overwrite=args.overwrite, quiet=args.quiet)
    print(f"wrote {out}")
    return 0


def _configure_recipes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one recipe's parameters in full")


def _run_recipes(args: argparse.Namespace) -> int:
    from upcycle.recipes.describe import describe_recipes

    describe_recipes(args.name)
    return 0


COMMANDS: list[Command] = [
    Command(
        "convert",
        "turn dense checkpoints into an MoE checkpoint with a recipe",
        _configure_convert,
        _run_convert,
    ),
    Command("recipes", "list the recipes with their papers and parameters", _configure_recipes, _run_recipes),
    Command(
        "init", "create a freshly initialised model from a model config YAML", _configure_init, _run_init
    ),
    Command(
        "inspect",
        "print a checkpoint's architecture, parameter count and tensors",
        _configure_inspect,
        _run_inspect,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upcycle",
        description="Turn dense language models into Mixture-of-Experts models and train them.",
    )
    parser.add_argument("--version", action="version", version=f"upcycle {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
        )
        command.configure(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UpcycleError as error:
        if args.debug:
            raise
        print(f"upcycle: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("upcycle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
