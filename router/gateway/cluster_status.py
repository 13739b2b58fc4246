"""GetClusterStatus: every router's state and load, every worker slot's state and experts, every vision encoder,
the expert map, the expert plane's failover figures and the gateway's own limits, gathered in one pass. An actor
that does not answer (dead, or still starting) is reported as such instead of failing the call."""

from __future__ import annotations

import asyncio

import ray

from cluster.actor_reports import RouterHealth, RouterStats, SupervisorStatus
from cluster.actor_state import ActorKind
from protos.moecluster.v1 import inference_pb2 as pb
from router.gateway import convert
from router.gateway.health import resolve


async def gather_status(view, gateway: pb.GatewayStatus, timeout_s: float) -> pb.GetClusterStatusResponse:
    routers = view.routers
    per_router = await asyncio.gather(*(_router(r, timeout_s) for r in routers))
    workers = await asyncio.gather(*(_answer(w.stats.remote(), timeout_s) for w in view.workers))
    encoders = await asyncio.gather(*(_answer(e.stats.remote(), timeout_s) for e in view.encoders))
    supervision = view.supervision() or SupervisorStatus()
    answered = [stats for _, stats, _ in per_router if stats is not None]
    lead = next((s for s in answered if s.channel is not None), answered[0] if answered else None)
    router_states = supervision.of(ActorKind.ROUTER)
    out = pb.GetClusterStatusResponse(
        routers=[convert.router_status(i, *s, router_states.get(i)) for i, s in enumerate(per_router)],
        gateway=gateway,
    )
    if out.routers:
        out.router.CopyFrom(out.routers[0])
    supervised = supervision.of(ActorKind.ENCODER)
    out.vision_encoders.extend(convert.vision_encoder_status(i, e, supervised.get(i)) for i, e in enumerate(encoders))
    if lead is None:
        return out
    members = lead.channel.members if lead.channel else ()
    slots = supervision.of(ActorKind.WORKER)
    out.workers.extend(convert.worker_status(slot, w, slots.get(slot), members) for slot, w in enumerate(workers))
    out.placement.extend(convert.placement(lead.expert_map))
    if lead.channel is not None:
        out.expert_plane.CopyFrom(convert.expert_plane(lead.channel, supervision, lead.expert_map))
    return out


async def _router(router, timeout_s: float) -> tuple[RouterHealth | None, RouterStats | None, object]:
    """(health, stats, engine stats), each None when the router does not answer."""
    return tuple(
        await asyncio.gather(
            _answer(router.health.remote(), timeout_s),
            _answer(router.stats.remote(), timeout_s),
            _answer(router.engine_stats.remote(), timeout_s),
        )
    )


async def _answer(ref, timeout_s: float):
    try:
        return await resolve(ref, timeout_s)
    except (ray.exceptions.RayError, asyncio.TimeoutError):
        return None
