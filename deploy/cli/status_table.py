"""The table `moecluster client status` prints: the model, each router, the gateway and the fronts it listens on
(moecluster.v1 and KServe v2 gRPC, the OpenAI HTTP API), the vision encoders, the expert
plane (failover and rebalancing) and, per worker slot, its state and the experts it holds with the tokens each copy
served."""

from __future__ import annotations

from cluster.actor_state import MemberState


def format_status(status, info, readiness: str) -> str:
    g = status.gateway
    lines = [
        f"model    {info.name} ({info.architecture}, {info.num_experts} experts x {len(info.moe_layers)} MoE layers, "
        f"top-{info.experts_per_token})   readiness {readiness}",
        *(_router(r) for r in (status.routers or [status.router])),
        f"gateway  streams {g.active_streams}/{g.max_concurrent_streams}   queue limit "
        f"{g.max_queued_requests or 'none'}   router failovers {g.router_failovers}"
        f"{'   DRAINING' if g.draining else ''}",
        *(f"front    {f.protocol:<32} {f.transport}://{f.address}" for f in g.fronts),
    ]
    if info.accepts_images:
        lines.append(_vision(status))
    if not status.workers:
        lines.append("workers  none: the router holds every expert")
        return "\n".join(lines)
    lines.append(_expert_plane(status.expert_plane))
    rows = [("worker", "state", "gen", "rank", "device", "resident", "layer", "experts", "tokens", "busiest copy")]
    for w in status.workers:
        layers = list(w.layers) or [None]
        for i, layer in enumerate(layers):
            busiest = max(zip(layer.tokens, layer.experts), default=(0, -1)) if layer else (0, -1)
            first = i == 0
            rows.append(
                (
                    str(w.index) if first else "",
                    w.state if first else "",
                    str(w.generation) if first and w.state != MemberState.DEAD.value else "",
                    str(w.rank) if first and w.rank else "",
                    w.device if first else "",
                    f"{_bytes(w.bytes_resident)} {w.expert_dtype}".strip() if first and w.bytes_resident else "",
                    str(layer.layer) if layer else "",
                    _ranges(layer.experts) if layer else "",
                    str(sum(layer.tokens)) if layer else "",
                    f"{busiest[1]} ({busiest[0]})" if busiest[1] >= 0 else "-",
                )
            )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _router(r) -> str:
    replaced = f", replaced {r.replacements}x" if r.replacements else ""
    head = f"router {r.index} ({r.state or 'unknown'}{replaced})"
    if not r.device:
        return f"{head}   {r.failure or 'no answer'}"
    finished = " ".join(f"{k}={v}" for k, v in sorted(r.finished.items())) or "-"
    return (
        f"{head}   {r.device} {r.dtype}   steps {r.steps}   running {r.running}   waiting {r.waiting}   "
        f"KV {r.kv_blocks_used}/{r.kv_blocks_total} blocks ({100 * r.kv_usage:.1f}%)   "
        f"{r.tokens_per_second:.1f} tok/s   finished {finished}{_prefix_cache(r)}"
    )


def _prefix_cache(r) -> str:
    if not r.prefix_caching:
        return "   prefix cache off"
    return (
        f"   prefix cache hit {100 * r.prefix_hit_rate:.1f}% ({r.cached_tokens}/{r.prompt_tokens} prompt tokens), "
        f"{r.cached_blocks} blocks cached, {r.cache_evictions} evicted"
    )


def _vision(status) -> str:
    routers = status.routers or [status.router]
    encoded, hits = sum(r.images_encoded for r in routers), sum(r.image_cache_hits for r in routers)
    retries = sum(r.image_encode_retries for r in routers)
    where = "   ".join(
        f"encoder {e.index} {e.state} ({e.images_encoded} images, {e.encode_seconds:.2f}s"
        f"{f', replaced {e.replacements}x' if e.replacements else ''})"
        for e in status.vision_encoders
    )
    return f"vision   {encoded} images encoded, {hits} from the cache, {retries} retried   {where or 'in the routers'}"


def _expert_plane(p) -> str:
    stalls = ", ".join(f"{s:.2f}s" for s in list(p.recent_stalls_s)[-3:]) or "-"
    line = (
        f"experts  map generation {p.map_generation}, {p.expert_replicas} cop{'y' if p.expert_replicas == 1 else 'ies'}"
        f" of each at least   group epoch {p.epoch} with workers {list(p.members)} ({p.state})   failovers "
        f"{p.failovers} (last stalls {stalls})   deaths {p.worker_deaths}   replacements "
        f"{p.replacements_succeeded}/{p.replacements_started} ({p.replacements_failed} failed)   rebalances "
        f"{p.rebalances}"
    )
    if p.failure:
        line += f"\n         FAILED: {p.failure}"
    for slot, why in sorted(p.degraded.items()):
        line += f"\n         slot {slot} no longer replaced: {why}"
    return line


def _ranges(ids) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
