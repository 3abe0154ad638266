"""AdminService servicer: protobuf in, AdminService call, protobuf out."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc

from tuneloop.v1 import admin_pb2 as pb
from tuneloop.v1 import admin_pb2_grpc as pb_grpc

from ..admin import AdapterView, AdminService
from ..errors import InvalidArgument
from ..metrics import Metrics
from .rpc import unary

SERVICE = "tuneloop.v1.AdminService"
REQUIRED_ROLES = {f"/{SERVICE}/{m}": "admin" for m in ("ListAdapters", "Promote", "Rollback", "SetCanary", "Unload")}


def _need(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    return value


def to_pb(view: AdapterView) -> pb.AdapterState:
    state = pb.AdapterState(
        name=view.name,
        current_version=view.current_version,
        canary_version=view.canary_version,
        canary_share=view.canary_share,
    )
    for v in view.versions:
        f = v.feedback
        state.versions.append(
            pb.VersionState(
                version=v.version,
                status=v.status,
                parent_version=v.parent_version,
                created_at=v.created_at,
                loaded=v.loaded,
                active_requests=v.active_requests,
                traffic_share=v.traffic_share,
                role=v.role,
                feedback=pb.LiveFeedback(
                    thumbs_up=f.thumbs_up,
                    thumbs_down=f.thumbs_down,
                    ratings=f.ratings,
                    rating_mean=f.rating_sum / f.ratings if f.ratings else 0.0,
                    pairwise_wins=f.pairwise_wins,
                    pairwise_losses=f.pairwise_losses,
                ),
                metrics=v.metrics,
                refusal=v.refusal,
            )
        )
    if view.canary is not None:
        c = view.canary
        state.canary.CopyFrom(
            pb.CanaryStatus(decision=c.decision, llr=c.llr, wins=c.wins, losses=c.losses, auto_decide=view.auto_decide)
        )
    return state


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, admin: Callable[[], AdminService], metrics: Metrics) -> None:
        # A provider, not the service: it exists only once the engine is up (until then the
        # provider raises UNAVAILABLE).
        self._admin = admin
        self.metrics = metrics

    @unary("ListAdapters")
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return pb.ListAdaptersResponse(adapters=[to_pb(v) for v in await self._admin().list(request.name)])

    @unary("Promote")
    async def Promote(self, request: pb.PromoteRequest, context: grpc.aio.ServicerContext) -> pb.AdapterState:
        return to_pb(await self._admin().promote(_need(request.name, "name"), _need(request.version, "version")))

    @unary("Rollback")
    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext) -> pb.AdapterState:
        return to_pb(await self._admin().rollback(_need(request.name, "name"), request.to_version))

    @unary("SetCanary")
    async def SetCanary(self, request: pb.SetCanaryRequest, context: grpc.aio.ServicerContext) -> pb.AdapterState:
        if not (0.0 <= request.share <= 1.0) or math.isnan(request.share):
            raise InvalidArgument(f"share must be in [0, 1], got {request.share}")
        if request.share > 0:
            _need(request.version, "version")
        return to_pb(
            await self._admin().set_canary(
                _need(request.name, "name"), request.version, request.share, request.auto_decide
            )
        )

    @unary("Unload")
    async def Unload(self, request: pb.UnloadRequest, context: grpc.aio.ServicerContext) -> pb.AdapterState:
        return to_pb(await self._admin().unload(_need(request.name, "name"), _need(request.version, "version")))
