"""The `tuneloop` entry point: builds one parser from every command module and runs the one named.

Each command module registers its subparser and sets `run` (parsed args -> exit status); adding
a command is one entry in `COMMANDS`. Exit status: 0 success, 1 a failed call (printed as
`error: <CODE>: <message>`), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tuneloop.client.errors import TuneloopError
from tuneloop.server.errors import TuneloopError as ServerError

from . import adapters, feedback, generate, reward, serve, trainer
from .common import UsageError, client_options

# name -> registrar(subparsers, client options parent). The registrar adds the command's parser
# and sets `run`.
COMMANDS: dict[str, Callable[[Any, argparse.ArgumentParser], None]] = {
    "serve": serve.register,
    "generate": generate.register,
    "feedback": feedback.register,
    "adapters": adapters.register,
    "trainer": trainer.register,
    "reward": reward.register,
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


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
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
    except ServerError as exc:  # a command that reads the store or the registry itself
        print(f"tuneloop {args.command}: {exc}", file=sys.stderr)
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
