"""Translation between the wire contract (protos/moecluster/v1/inference.proto) and the engine's types
(router/request/messages.py). No I/O here: the gateway calls these on each request and each engine message.

Field names in errors are the request's proto paths ("sampling.top_p", "input_ids", "messages[1].role",
"messages[0].parts[2].image", "images[1]"), so a client can point at what it sent.
"""

from __future__ import annotations

import dataclasses

from cluster.actor_reports import (
    ChannelStats,
    EncoderStats,
    MemberStatus,
    RouterHealth,
    RouterStats,
    SupervisorStatus,
    WorkerStats,
)
from cluster.actor_state import ActorKind, MemberState
from protos.moecluster.v1 import inference_pb2 as pb
from protos.vocabulary import SAMPLING_FIELDS, SAMPLING_NAMES
from router.images.data_url import data_url_bytes
from router.request.constraint import Constraint
from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage, Delta, EngineRequest, Final, FinishReason, ImageInput, ImagePart
from router.request.model_info import ModelInfo
from router.request.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from router.request.tools import Tool, ToolCall

_SAMPLING_NAMES = frozenset(SAMPLING_NAMES)
# ModelInfo's fields that GetModelInfoResponse carries under the same name (model_info sets the others)
_MODEL_INFO_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelInfo) if f.name in pb.GetModelInfoResponse.DESCRIPTOR.fields_by_name
)
# the engine's finish reasons (router/request/messages.py) -> the wire enum, FINISH_REASON_<NAME>
FINISH_REASON_ENUM = {reason: pb.FinishReason.Value(f"FINISH_REASON_{reason.name}") for reason in FinishReason}


def field_path(field: str) -> str:
    """The proto path of an engine-side field name: sampling parameters live under `sampling.`."""
    return f"sampling.{field}" if field in _SAMPLING_NAMES else field


def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults (None for temperature/top_p/top_k: the model's)."""
    given = {
        f.name: tuple(getattr(msg, f.name)) if f.repeated else getattr(msg, f.name)
        for f in SAMPLING_FIELDS
        if f.repeated or msg.HasField(f.name)
    }
    bias = tuple(sorted(msg.logit_bias.items()))
    return SamplingParams(**given, constraint=constraint(msg), logit_bias=bias)


def constraint(msg: pb.SamplingParams) -> Constraint | None:
    kind = msg.WhichOneof("constraint")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    if kind == "choice":
        return Constraint("choice", choices=tuple(msg.choice.options))
    return Constraint(kind, "" if kind == "json_object" else getattr(msg, kind))


def engine_request(req: pb.GenerateRequest, request_id: str) -> EngineRequest:
    """The engine request for `req`, input as given (the gateway tokenizes it while validating)."""
    params = sampling_params(req.sampling)
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "the request is empty; set one of prompt, input_ids or messages")
    images = request_images(req.images)
    salt = req.cache_salt or None
    tools = tuple(Tool(t.name, t.description, t.parameters or Tool.parameters) for t in req.tools)
    choice = req.tool_choice.WhichOneof("choice")
    tool_choice = getattr(req.tool_choice, choice) if choice else "auto"
    if kind == "messages":
        if images:
            raise InvalidRequest(
                "images", "a chat's images go in its messages' parts; `images` is for prompt and input_ids"
            )
        chat = chat_messages(req.messages)
        return EngineRequest(request_id, params, messages=chat, tools=tools, tool_choice=tool_choice, cache_salt=salt)
    if tools or choice:
        raise InvalidRequest("tools", "tools are offered in a chat; send messages, not a prompt or input_ids")
    if kind == "prompt":
        return EngineRequest(request_id, params, prompt=req.prompt, images=images, cache_salt=salt)
    return EngineRequest(request_id, params, prompt_ids=tuple(req.input_ids.ids), images=images, cache_salt=salt)


def chat_messages(msg: pb.ChatMessages) -> tuple[ChatMessage, ...]:
    return tuple(
        ChatMessage(m.role, _content(i, m), tuple(ToolCall(c.name, c.arguments, c.id) for c in m.tool_calls))
        for i, m in enumerate(msg.messages)
    )


def request_images(images) -> tuple[ImageInput, ...]:
    """GenerateRequest.images (or TokenizeRequest's) as the engine's images, each naming its field."""
    return tuple(ImageInput(image_bytes(im, f"images[{k}]"), f"images[{k}]") for k, im in enumerate(images))


def image_bytes(image: pb.Image, field: str) -> bytes:
    """An Image's bytes: as sent, or from its data: URL (never fetched from a network)."""
    source = image.WhichOneof("source")
    if source == "data":
        return image.data
    if source == "url":
        return data_url_bytes(image.url, f"{field}.url")
    raise InvalidRequest(field, "is empty; set data (the image's bytes) or url (a data: URL)")


def _content(i: int, m: pb.ChatMessage) -> str | tuple[str | ImagePart, ...]:
    if not m.parts:
        return m.content
    if m.content:
        raise InvalidRequest(f"messages[{i}].content", "give the text in content or in parts, not both")
    return tuple(_part(f"messages[{i}].parts[{j}]", part) for j, part in enumerate(m.parts))


def _part(field: str, part: pb.ContentPart) -> str | ImagePart:
    kind = part.WhichOneof("kind")
    if kind == "text":
        return part.text
    if kind == "image":
        return ImagePart(image_bytes(part.image, f"{field}.image"))
    raise InvalidRequest(field, "is empty; set text or image")


def chunk(delta: Delta) -> pb.Chunk:
    return pb.Chunk(
        token_ids=delta.token_ids,
        text=delta.text,
        logprobs=[
            pb.TokenLogprob(
                token_id=lp.token_id, logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
            )
            for lp in delta.logprobs
        ],
        tool_calls=tool_calls(delta.tool_calls),
        tool_call_parts=[
            pb.ToolCallPart(index=p.index, id=p.id, name=p.name, arguments=p.arguments) for p in delta.tool_call_parts
        ],
    )


def tool_calls(calls) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def merged_chunk(deltas: list[Delta]) -> pb.Chunk:
    """Everything of a non-streamed request as one chunk."""
    out = pb.Chunk()
    for d in deltas:
        out.MergeFrom(chunk(d))  # repeated fields append; the text is joined below
    out.text = "".join(d.text for d in deltas)
    out.ClearField("tool_call_parts")  # the whole calls are there
    return out


def complete(final: Final, calls=()) -> pb.Complete:
    """`calls`: every tool call the request's deltas carried."""
    out = pb.Complete(
        finish_reason=FINISH_REASON_ENUM[final.finish_reason],
        prompt_tokens=final.prompt_tokens,
        completion_tokens=final.completion_tokens,
        cached_tokens=final.cached_tokens,
        tool_calls=tool_calls(calls),
    )
    if isinstance(final.matched_stop, str):
        out.stop_string = final.matched_stop
    elif isinstance(final.matched_stop, int):
        out.stop_token_id = final.matched_stop
    return out


def model_info(info: ModelInfo, vision=None) -> pb.GetModelInfoResponse:
    """`vision`: the gateway's VisionPrompt (its limits), or None when the model takes no images."""
    return pb.GetModelInfoResponse(
        **{name: getattr(info, name) for name in _MODEL_INFO_FIELDS},
        num_workers=info.workers,
        max_top_logprobs=MAX_TOP_LOGPROBS,
        **(_image_info(vision) if vision is not None else {}),
    )


def _image_info(vision) -> dict:
    processor = vision.processor
    return {
        "accepts_images": vision.max_images != 0,
        "image_tile_size": processor.tile_size,
        "image_tokens_per_tile": vision.patches_per_tile,
        "max_image_tiles": processor.max_tiles,
        "max_images_per_request": vision.max_images,
        "max_image_bytes": processor.limits.max_bytes,
        "max_image_pixels": processor.limits.max_pixels,
    }


def router_status(
    index: int,
    health: RouterHealth | None,
    router: RouterStats | None,
    engine,
    supervised: MemberStatus | None = None,
) -> pb.RouterStatus:
    """`health`, `router` and `engine` are RouterActor.health(), stats() and engine_stats() (None when the router
    did not answer); `supervised` the supervisor's view of router `index` (None without a supervisor)."""
    out = pb.RouterStatus(index=index, **_supervised(supervised))
    if health is None or router is None or engine is None:
        out.state = supervised.state.value if supervised else MemberState.DEAD.value
        out.failure = "the router does not answer"
        return out
    total = engine.kv_blocks_total
    out.MergeFrom(
        pb.RouterStatus(
            ready=health.ready,
            failure=health.failure or "",
            state=health.state.value,
            device=router.device,
            dtype=router.dtype,
            steps=router.steps,
            running=engine.running,
            waiting=engine.waiting,
            kv_blocks_used=engine.kv_blocks_used,
            kv_blocks_total=total,
            kv_usage=engine.kv_blocks_used / total if total else 0.0,
            tokens_per_second=engine.tokens_per_s,
            kv_token_capacity=engine.kv_token_capacity,
            finished=engine.finished,
            prefix_caching=engine.prefix_caching,
            prompt_tokens=engine.prompt_tokens,
            cached_tokens=engine.cached_tokens,
            prefix_hit_rate=engine.hit_rate,
            cached_blocks=engine.cached_blocks,
            cache_evictions=engine.evictions,
        )
    )
    if router.vision is not None:
        out.images_encoded = router.vision.encodes
        out.image_cache_hits = router.vision.cache_hits
        out.image_encode_retries = router.vision.encoder_retries
    return out


def vision_encoder_status(
    index: int, stats: EncoderStats | None, supervised: MemberStatus | None
) -> pb.VisionEncoderStatus:
    """One vision encoder: its actor's stats() (None when it does not answer) and the supervisor's view of it."""
    answered = MemberState.SERVING if stats else MemberState.DEAD
    out = pb.VisionEncoderStatus(
        index=index, state=(supervised.state if supervised else answered).value, **_supervised(supervised)
    )
    if stats is not None:
        out.images_encoded, out.encode_seconds, out.pid = stats.encoded, stats.seconds, stats.pid
    return out


def worker_status(
    slot: int, stats: WorkerStats | None, supervised: MemberStatus | None, members: tuple[int, ...]
) -> pb.WorkerStatus:
    """One worker slot: its actor's ExpertWorker.stats() (None when it does not answer: dead or still
    starting), the supervisor's view of the slot, and the router's current group (for the rank)."""
    answered = stats.state if stats else MemberState.DEAD
    out = pb.WorkerStatus(
        index=slot,
        rank=members.index(slot) + 1 if slot in members else 0,
        state=(supervised.state if supervised else answered).value,
        **_supervised(supervised),
    )
    if stats is not None:
        out.device, out.bytes_resident, out.steps = stats.device, stats.bytes_resident, stats.steps
        out.generation, out.pid = stats.generation, stats.pid
        out.expert_dtype = stats.expert_dtype
        for layer, counts in sorted(stats.tokens_per_expert.items()):
            out.layers.append(pb.LayerExperts(layer=layer, experts=list(counts), tokens=list(counts.values())))
    return out


def _supervised(member: MemberStatus | None) -> dict:
    """The supervisor's counts of a place, as status fields."""
    return {"replacements": member.replacements, "last_error": member.last_error} if member else {}


def placement(expert_map) -> list[pb.LayerPlacement]:
    """Every MoE layer's copies from an ExpertMap; empty when the router holds the experts (None)."""
    if expert_map is None:
        return []
    out = []
    for layer in expert_map.layers:
        copies = [expert_map.copies(layer, e) for e in range(expert_map.num_experts)]
        out.append(
            pb.LayerPlacement(
                layer=layer,
                worker_of_expert=[c[0] for c in copies],
                copies=[pb.ExpertCopies(workers=c) for c in copies],
            )
        )
    return out


def expert_plane(channel: ChannelStats, supervision: SupervisorStatus | None, expert_map) -> pb.ExpertPlaneStatus:
    """The router's channel stats and the supervisor's status (None without a supervisor)."""
    supervision = supervision or SupervisorStatus()
    counters = supervision.counters
    return pb.ExpertPlaneStatus(
        map_generation=channel.map_generation,
        expert_replicas=expert_map.replicas(),
        state=channel.state.value,
        epoch=channel.epoch,
        members=list(channel.members),
        failovers=channel.failovers,
        replayed_steps=channel.replayed_steps,
        regroups=channel.regroups,
        worker_deaths=counters.died(ActorKind.WORKER),
        replacements_started=counters.replacements_started,
        replacements_succeeded=counters.replacements_succeeded,
        replacements_failed=counters.replacements_failed,
        rebalances=counters.rebalances,
        recent_stalls_s=channel.stalls_s[-16:],
        last_event=channel.last_event,
        failure=supervision.failure or "",
        degraded=dict(supervision.degraded),
    )


def router_expert_tokens(router_stats: RouterStats) -> dict[tuple[int, int], int]:
    """(layer, expert) -> tokens the router routed to it so far (wherever its copies live)."""
    return {
        (layer, e): int(n) for layer, counts in router_stats.tokens_per_expert.items() for e, n in enumerate(counts)
    }
