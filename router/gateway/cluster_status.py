"""GetClusterStatus: every router's state and load, every worker slot's state and experts, every vision encoder,
the expert map, the expert plane's failover figures and the gateway's own limits, gathered in one pass. An actor
that does not answer (dead, or still starting) is reported as such instead of failing the call."""

from __future__ import annotations

import asyncio

import ray

from protos.moecluster.v1 import inference_pb2 as pb
from router.gateway import convert
from router.gateway.health import resolve


async def gather_status(view, gateway: pb.GatewayStatus, timeout_s: float) -> pb.GetClusterStatusResponse:
    routers = view.routers
    per_router = await asyncio.gather(*(_router(r, timeout_s) for r in routers))
    workers = await asyncio.gather(*(_answer(w.stats.remote(), timeout_s) for w in view.workers))
    encoders = await asyncio.gather(*(_answer(e.stats.remote(), timeout_s) for e in view.encoders))
    supervision = view.supervision() or {}
    answered = [(i, s) for i, s in enumerate(per_router) if s[1] is not None]
    lead = next((s for _, s in answered if s[1]["channel"] is not None), answered[0][1] if answered else None)
    router_states = {r["slot"]: r for r in supervision.get("routers", [])}
    out = pb.GetClusterStatusResponse(
        routers=[convert.router_status(i, *s, router_states.get(i)) for i, s in enumerate(per_router)],
        gateway=gateway,
    )
    if out.routers:
        out.router.CopyFrom(out.routers[0])
    supervised = {e["slot"]: e for e in supervision.get("encoders", [])}
    out.vision_encoders.extend(convert.vision_encoder_status(i, e, supervised.get(i)) for i, e in enumerate(encoders))
    if lead is None:
        return out
    stats = lead[1]
    expert_map = stats["expert_map"]
    members = stats["channel"]["members"] if stats["channel"] else ()
    slots = {s["slot"]: s for s in supervision.get("slots", [])}
    out.workers.extend(convert.worker_status(slot, w, slots.get(slot), members) for slot, w in enumerate(workers))
    out.placement.extend(convert.placement(expert_map))
    if stats["channel"] is not None:
        out.expert_plane.CopyFrom(convert.expert_plane(stats["channel"], supervision, expert_map))
    return out


async def _router(router, timeout_s: float) -> tuple[dict | None, dict | None, object]:
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
