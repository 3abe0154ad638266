"""AdminService: list adapter versions, promote, roll back, run a canary, unload (admin role)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tuneloop.v1 import admin_pb2 as pb
from tuneloop.v1.admin_pb2_grpc import AdminServiceStub

from ._transport import ServiceMethods
from .errors import invalid_argument


@dataclass(frozen=True)
class VersionInfo:
    version: str
    status: str  # "accepted" | "rejected"
    parent_version: str
    created_at: float
    loaded: bool
    active_requests: int
    traffic_share: float
    role: str  # "stable" | "canary" | ""
    thumbs_up: int
    thumbs_down: int
    ratings: int
    rating_mean: float
    pairwise_wins: int
    pairwise_losses: int
    metrics: dict[str, float] = field(default_factory=dict)
    refusal: str = ""


@dataclass(frozen=True)
class CanaryInfo:
    decision: str  # "continue" | "promote" | "roll_back"
    llr: float
    wins: int
    losses: int
    auto_decide: bool


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    current_version: str  # "" while the base model serves
    canary_version: str
    canary_share: float
    versions: list[VersionInfo]
    canary: CanaryInfo | None


def adapter_from_pb(m: pb.AdapterState) -> AdapterInfo:
    versions = [
        VersionInfo(
            version=v.version, status=v.status, parent_version=v.parent_version, created_at=v.created_at,
            loaded=v.loaded, active_requests=v.active_requests, traffic_share=v.traffic_share, role=v.role,
            thumbs_up=v.feedback.thumbs_up, thumbs_down=v.feedback.thumbs_down, ratings=v.feedback.ratings,
            rating_mean=v.feedback.rating_mean, pairwise_wins=v.feedback.pairwise_wins,
            pairwise_losses=v.feedback.pairwise_losses, metrics=dict(v.metrics), refusal=v.refusal,
        )
        for v in m.versions
    ]  # fmt: skip
    canary = None
    if m.HasField("canary"):
        c = m.canary
        canary = CanaryInfo(c.decision, c.llr, c.wins, c.losses, c.auto_decide)
    return AdapterInfo(m.name, m.current_version, m.canary_version, m.canary_share, versions, canary)


def _adapters_from_pb(m: pb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [adapter_from_pb(a) for a in m.adapters]


InfoT = TypeVar("InfoT")
ListT = TypeVar("ListT")


class AdminMethods(ServiceMethods, Generic[InfoT, ListT]):
    def list_adapters(self, name: str = "") -> ListT:
        """Every adapter (or one) with its versions, traffic shares and live feedback."""
        stub = self._transport.stub(AdminServiceStub)
        result: ListT = self._transport.unary(stub.ListAdapters, pb.ListAdaptersRequest(name=name), _adapters_from_pb)
        return result

    def promote(self, name: str, version: str) -> InfoT:
        """Route the adapter's default traffic to `version` (loaded and probed first)."""
        return self._call("Promote", pb.PromoteRequest(name=name, version=version))

    def rollback(self, name: str, to_version: str = "") -> InfoT:
        """Return default traffic to the version served before the current one (or `to_version`)."""
        return self._call("Rollback", pb.RollbackRequest(name=name, to_version=to_version))

    def set_canary(self, name: str, version: str = "", share: float = 0.1, *, auto_decide: bool = True) -> InfoT:
        """Send `share` of default traffic (sticky per user id) to `version`; share 0 ends the canary."""
        if not 0.0 <= share <= 1.0:
            raise invalid_argument(f"share must be in [0, 1], got {share}")
        return self._call(
            "SetCanary", pb.SetCanaryRequest(name=name, version=version, share=share, auto_decide=auto_decide)
        )

    def unload(self, name: str, version: str) -> InfoT:
        return self._call("Unload", pb.UnloadRequest(name=name, version=version))

    def _call(self, method: str, request: object) -> InfoT:
        stub = self._transport.stub(AdminServiceStub)
        result: InfoT = self._transport.unary(getattr(stub, method), request, adapter_from_pb)
        return result
