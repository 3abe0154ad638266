"""Container health probe for the tuneloop image (Docker HEALTHCHECK and compose).

Two checks, one per process the image runs:

    tuneloop-healthcheck [grpc] [--address 127.0.0.1:50051] [--service ""]   # the server
    tuneloop-healthcheck grpc --ca ca.crt [--server-name tuneloop]            # the server with TLS
    tuneloop-healthcheck http --url http://127.0.0.1:9401/metrics            # the trainer sidecar

`grpc` asks the standard grpc.health.v1 service, which the server flips to NOT_SERVING when the
vLLM engine dies, so a dead engine makes the container unhealthy even though the port still answers.
`http` only proves the trainer's metrics endpoint answers: the trainer has no gRPC port.
Exit status 0 means healthy, 1 unhealthy (the reason goes to stderr, which `docker inspect` shows).
Kubernetes probes grpc.health.v1 natively, but only in plaintext: with TLS on, an exec probe runs
this file with --ca (and --cert/--key when the server requires client certificates).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tls:
    """Client-side TLS for the check: the CA that signed the server, and a client pair for mTLS."""

    ca: str
    cert: str = ""
    key: str = ""
    # The name the server certificate is issued to, when it is not the probed address (127.0.0.1).
    server_name: str = ""


def check_grpc(address: str, service: str, timeout: float, tls: Tls | None = None) -> str | None:
    """Return None if `service` reports SERVING at `address`, else the reason it is unhealthy."""
    # Imported here so the `http` check works in an image without grpc (and starts faster).
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(tls.ca).read_bytes(),
            private_key=Path(tls.key).read_bytes() if tls.key else None,
            certificate_chain=Path(tls.cert).read_bytes() if tls.cert else None,
        )
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return f"health check on {address} failed: {err.code().name} {err.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return f"{address} service {service!r} is {name}"
    return None


def check_http(url: str, timeout: float) -> str | None:
    """Return None if `url` answers 200, else the reason it is unhealthy."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status != 200:
                return f"{url} answered HTTP {response.status}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url} unreachable: {err}"
    return None


def _parser() -> argparse.ArgumentParser:
    port = os.environ.get("TUNELOOP_PORT", "50051")
    parser = argparse.ArgumentParser(prog="tuneloop-healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    sub = parser.add_subparsers(dest="check")
    grpc_p = sub.add_parser("grpc", help="ask grpc.health.v1 (the default)")
    grpc_p.add_argument("--address", default=f"127.0.0.1:{port}", help="host:port of the gRPC server")
    grpc_p.add_argument("--service", default="", help="health service name; '' is the whole server")
    grpc_p.add_argument("--ca", default="", help="PEM CA bundle: connect with TLS and verify the server")
    grpc_p.add_argument("--cert", default="", help="PEM client certificate, for a server that requires one")
    grpc_p.add_argument("--key", default="", help="PEM private key of --cert")
    grpc_p.add_argument("--server-name", default="", help="name in the server certificate, if not the address")
    http_p = sub.add_parser("http", help="GET a URL and expect 200")
    http_p.add_argument("--url", required=True)
    parser.set_defaults(check="grpc", address=f"127.0.0.1:{port}", service="", ca="", cert="", key="", server_name="")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.check == "http":
        problem = check_http(args.url, args.timeout)
    else:
        if bool(args.cert) != bool(args.key) or (args.cert and not args.ca):
            print("--cert and --key go together, and need --ca", file=sys.stderr)
            return 2
        tls = Tls(args.ca, args.cert, args.key, args.server_name) if args.ca else None
        problem = check_grpc(args.address, args.service, args.timeout, tls)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
