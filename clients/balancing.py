"""Several replicas behind one channel: the gRPC target that names them all, and the service config
that balances across the healthy ones and retries what is safe to repeat.

gRPC balances by itself once it is told how: `round_robin` keeps one connection per address and
sends each call to the next, and client-side health checking (a `grpc.health.v1.Health/Watch`
stream per connection) takes a replica out of the rotation while it reports NOT_SERVING — its
engine starting or dead, or a SIGTERM draining it — and puts it back when it reports SERVING.
Nothing here runs per call: it is all channel construction.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import invalid_argument

# The health service name the replicas are watched under: the generation service, which reports
# NOT_SERVING exactly when this replica cannot generate (engine not ready or dead, or draining).
HEALTH_SERVICE = "tuneloop.v1.GenerationService"

# Schemes that already name a resolver; such a target is handed to gRPC as it is.
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")

# The calls gRPC may send again, on another replica, after UNAVAILABLE (the replica was down,
# draining, or died before answering). gRPC never retries a call once any response has reached
# the caller (the call is then "committed"), so a repeated call cannot hand the caller output twice.
_RETRIED_METHODS: tuple[tuple[str, str], ...] = (
    # Generate: the caller receives one whole response or nothing, so a failed attempt's text was
    # never seen and cannot draw feedback. The request carries no request id: a repeat runs the
    # generation again (another sample), and a replica that died after logging its completion
    # leaves that row orphaned, which nothing reads for training (training reads feedback).
    ("tuneloop.v1.GenerationService", "Generate"),
    # GenerateStream: repeated only before its first message; a replica dying mid-stream ends the
    # caller's stream with UnavailableError after the deltas it already sent, never a second copy.
    ("tuneloop.v1.GenerationService", "GenerateStream"),
    # Feedback: idempotent by event id (the same id and content again is a no-op). The SDK gives
    # every event an id before sending on a balanced channel, so a repeat cannot store it twice.
    ("tuneloop.v1.FeedbackService", "SubmitFeedback"),
    ("tuneloop.v1.FeedbackService", "SubmitFeedbackBatch"),
    ("tuneloop.v1.FeedbackService", "SubmitFeedbackStream"),
    # ListAdapters only reads.
    ("tuneloop.v1.AdminService", "ListAdapters"),
    # Not retried: Promote, SetCanary and Unload can be refused the second time for the state the
    # first attempt created, and Rollback steps back once per call: twice would go two versions back.
)


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry settings for the calls above. gRPC caps attempts at 5."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0

    def to_json(self) -> dict[str, object]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s}s",
            "maxBackoff": f"{self.max_backoff_s}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }


def service_config(retry: RetryPolicy | None = None) -> str:
    """The channel's service config: round_robin over healthy replicas, retries on UNAVAILABLE."""
    policy = (retry or RetryPolicy()).to_json()
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
            "methodConfig": [
                {"name": [{"service": service, "method": method}], "retryPolicy": policy}
                for service, method in _RETRIED_METHODS
            ],
        }
    )


def split_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """The replicas named by `target`: a list of "host:port", one string of them joined by commas,
    or one gRPC URI ("dns:///name:port", "ipv4:a:p,b:p", ...) kept whole."""
    if isinstance(target, str):
        stripped = target.strip()
        parts = [stripped] if stripped.startswith(_URI_SCHEMES) else stripped.split(",")
    else:
        parts = list(target)
    targets = tuple(p.strip() for p in parts if isinstance(p, str) and p.strip())
    if len(targets) != len(parts) or not targets:
        raise invalid_argument(f"target must be host:port or several joined by commas, got {target!r}")
    return targets


def _host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise invalid_argument(f"each of several targets must be host:port, got {target!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _addresses(target: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    host, port = _host_port(target)
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise invalid_argument(f"cannot resolve {host!r} in target {target!r}: {exc.strerror}") from None
    return [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]


def balanced_target(targets: Sequence[str]) -> str:
    """One gRPC target naming every replica: several host:port become an `ipv4:` (or `ipv6:`)
    address list; a single one becomes `dns:///host:port`, which gRPC re-resolves, so a name with
    one address per replica (a headless service) balances and follows the replicas.

    Host names among several targets are resolved once, here: gRPC's address-list schemes take
    literal addresses only. For replicas whose addresses change, give one DNS name instead.
    """
    if len(targets) == 1:
        only = targets[0]
        return only if only.startswith(_URI_SCHEMES) else f"dns:///{only}"
    if any(t.startswith(_URI_SCHEMES) for t in targets):
        raise invalid_argument(f"a gRPC URI target (dns:, ipv4:, ...) cannot be combined with others: {list(targets)}")
    ports = [_host_port(t)[1] for t in targets]  # every target well-formed before any is resolved
    v4: list[str] = []
    v6: list[str] = []
    for target, port in zip(targets, ports, strict=True):
        addrs = _addresses(target)
        # One address per target (a replica), and one family for all: gRPC's ipv4: and ipv6:
        # lists cannot be mixed.
        v4.extend([f"{a}:{port}" for a in addrs if a.version == 4][:1])
        v6.extend([f"[{a}]:{port}" for a in addrs if a.version == 6][:1])
    if len(v4) == len(targets):
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    if len(v6) == len(targets):
        return "ipv6:" + ",".join(dict.fromkeys(v6))
    raise invalid_argument(
        f"the targets {list(targets)} do not all have an IPv4 or all an IPv6 address; gRPC cannot balance "
        "across both families in one channel: use addresses of one family"
    )


def channel_options(targets: Sequence[str], *, uses_tls: bool) -> list[tuple[str, object]]:
    """The options a balanced channel is opened with."""
    options: list[tuple[str, object]] = [
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        # gRPC backs off reconnecting to an address that refused, up to two minutes by default: a
        # replica restarted after a minute down would wait as long again to get calls. Five seconds
        # at most brings it back soon after it serves, for a few refused connection attempts.
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if uses_tls and len(targets) > 1:
        # An address list has no host name to verify the certificate against: verify against the
        # first target's host, so the replicas' certificates must all name it (e.g. a shared name).
        host, _ = _host_port(targets[0])
        options.append(("grpc.ssl_target_name_override", host))
    return options
