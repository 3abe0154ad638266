"""What every client command of the `tuneloop` CLI shares: connection options and output helpers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from tuneloop.client._transport import DEFAULT_TARGET
from tuneloop.client.client import Client

ENV_TARGET = "TUNELOOP_TARGET"
ENV_API_KEY = "TUNELOOP_API_KEY"


class UsageError(Exception):
    """A command line that cannot run as given; the CLI prints it and exits with status 2."""


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def client_options() -> argparse.ArgumentParser:
    """A parent parser with the connection options every client command takes."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get(ENV_TARGET, DEFAULT_TARGET),
        help=f"server host:port, or several replicas joined by commas (h1:50051,h2:50051), balanced "
        f"round-robin over the healthy ones (default: ${ENV_TARGET} or {DEFAULT_TARGET})",
    )
    # The key's value never appears in --help: the default comes from the environment.
    group.add_argument(
        "--api-key", default=os.environ.get(ENV_API_KEY) or None, help=f"API key (default: ${ENV_API_KEY})"
    )
    group.add_argument("--tls", action="store_true", help="use TLS, verifying the server with the system's roots")
    group.add_argument("--tls-ca", metavar="PEM", help="root CA file that verifies the server (implies --tls)")
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", help="client private key for mutual TLS (with --tls-cert)")
    group.add_argument("--timeout", type=positive_float, metavar="SECONDS", help="per-call deadline (default: none)")
    return parser


def connect(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        api_key=args.api_key,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        timeout=args.timeout,
    )


def print_json(obj: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(obj, out, ensure_ascii=False)
    out.write("\n")


def read_text_arg(value: str, what: str) -> str:
    """`value` itself, or standard input when it is "-"."""
    if value != "-":
        return value
    if sys.stdin.isatty():
        raise UsageError(f"{what} is '-' but standard input is a terminal; pipe the text in")
    return sys.stdin.read()
