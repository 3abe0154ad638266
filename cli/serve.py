"""`tuneloop serve`: run the gRPC server with the embedded defaults, a TOML file, environment
variables and flags (later sources win). vLLM is imported only once the flags are parsed."""

from __future__ import annotations

import argparse
from typing import Any

from tuneloop.server.config import SERVE_DESCRIPTION, add_arguments
from tuneloop.server.main import run_flags  # light: the server itself (vLLM) is imported when it runs


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve", help="run the gRPC server", description=SERVE_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_flags({k: v for k, v in vars(args).items() if k not in ("command", "run")})
