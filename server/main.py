"""`tuneloop serve`: parse the config, run the server until SIGTERM/SIGINT, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from .config import ConfigError, ServerConfig, build_arg_parser, config_from_flags

log = logging.getLogger("tuneloop.server")


def _warn_if_exposed(config: ServerConfig) -> None:
    if config.is_loopback():
        return
    if not config.tls:
        log.warning("binding %s without TLS: traffic, prompts and API keys travel in clear text", config.host)
    if not config.api_keys_file:
        log.warning(
            "binding %s without API keys: anyone who can reach the port can generate and administer", config.host
        )


async def serve(config: ServerConfig) -> None:
    from .app import TuneloopServer  # noqa: PLC0415 - keeps `--help` fast
    from .registry import RegistryUnavailable  # noqa: PLC0415

    try:
        server = TuneloopServer(config)
    except RegistryUnavailable as exc:  # a bucket missing, unreachable or refusing us: one line, not a traceback
        raise SystemExit(f"tuneloop serve: {exc}") from None
    try:
        await server.start()
    except OSError as exc:  # a port in use: say so in one line, not a traceback
        raise SystemExit(f"tuneloop serve: {exc}") from None
    print(
        f"tuneloop: gRPC on {config.host}:{server.port}, metrics on :{server.metrics_port}; "
        "the engine is starting (health NOT_SERVING until ready)",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received; draining for up to %.0f s", config.grace_period_s)
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    """The server process on its own (`python -m tuneloop.server.main [flags]`); `tuneloop serve`
    parses the same flags and calls `run_flags`."""
    return run_flags(vars(build_arg_parser().parse_args(argv)))


def run_flags(flags: dict[str, Any]) -> int:
    """Serve with these parsed flags over the TOML file, the environment and the defaults; exit
    status 2 with the reason for a bad setting."""
    try:
        config = config_from_flags(flags)
    except ConfigError as exc:
        print(f"tuneloop serve: {exc}", file=sys.stderr)
        return 2
    return run(config)


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, then drain."""
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    _warn_if_exposed(config)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
