"""The `tuneloop` command: `serve` runs the server; the other commands are clients of it.

Each command module registers its subparser and sets `run` (parsed args -> exit status); adding
a command is one entry in `COMMANDS`. Exit status: 0 success, 1 a failed call (printed as
`error: <CODE>: <message>`), 2 a usage error, 130 interrupted.

The client commands must start fast: nothing here imports torch or vLLM. `serve` imports the
server only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import cli_adapters, cli_feedback, cli_generate
from .cli_common import UsageError, client_options
from .errors import TuneloopError

SERVE_HELP = "run the gRPC server (see `tuneloop serve --help`)"


def _register_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    # Listed for `tuneloop --help` only: `main` hands `serve`'s arguments to the server untouched
    # before parsing, so the server's own parser owns them (and its --help).
    sub.add_parser("serve", help=SERVE_HELP, add_help=False)


def _register_trainer(sub: Any, common: argparse.ArgumentParser) -> None:
    # Like serve: `main` hands the arguments to the trainer's own parser.
    sub.add_parser("trainer", help="train adapters from feedback (see `tuneloop trainer --help`)", add_help=False)


def _register_reward(sub: Any, common: argparse.ArgumentParser) -> None:
    sub.add_parser("reward", help="score replies with a reward model (see `tuneloop reward --help`)", add_help=False)


# name -> registrar(subparsers, client options parent). The registrar adds the command's parser
# and sets `run`.
COMMANDS: dict[str, Callable[[Any, argparse.ArgumentParser], None]] = {
    "serve": _register_serve,
    "generate": cli_generate.register,
    "feedback": cli_feedback.register,
    "adapters": cli_adapters.register,
    "trainer": _register_trainer,
    "reward": _register_reward,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneloop",
        description="Serve an LLM over gRPC and teach it from its users' feedback.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = client_options()
    for register in COMMANDS.values():
        register(sub, common)
    return parser


def serve(argv: list[str]) -> int:
    from tuneloop.server.main import main as server_main  # noqa: PLC0415 - imports vLLM: only for serve

    return server_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["serve"]:
        return serve(args_list[1:])
    if args_list[:1] == ["trainer"]:
        from tuneloop.trainer.cli import main as trainer_main  # noqa: PLC0415 - imports torch: only here

        return trainer_main(args_list[1:])
    if args_list[:1] == ["reward"]:
        from tuneloop.trainer.cli import reward_main  # noqa: PLC0415 - imports torch: only here

        return reward_main(args_list[1:])
    if args_list[:1] == ["adapters"] and args_list[1:2] in (["list"], ["show"]):
        from tuneloop.trainer.cli import adapters_main  # noqa: PLC0415 - reads the registry files

        return adapters_main(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help (0) or a usage error (2): report, don't exit the caller
        return exc.code if isinstance(exc.code, int) else 2
    try:
        status: int = args.run(args)
        return status
    except UsageError as exc:
        print(f"tuneloop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TuneloopError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); point stdout at /dev/null so the interpreter's
        # final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
