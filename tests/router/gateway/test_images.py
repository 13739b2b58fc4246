"""Images end to end, on a real local Ray (2 routers, 2 expert workers, 2 vision encoders) behind the real gRPC
gateway: what a client streams for an image request is what the in-process engine (`--workers 0`, the router
encoding itself) computes; image and text requests share the batch; every bad image is refused with its field
named while other streams go on; a repeated image comes from the cache; and neither a vision encoder killed or
hung mid-image nor a router killed mid-stream costs an image request anything.

One server for the module; the tests that kill actors come last.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from deploy.server import Server
from deploy.tiny.squares import QUESTION, square_png
from protos.async_client import AsyncInferenceClient
from protos.client import InferenceClient
from protos.client_types import GenerationError
from tests.procs import pid_of
from tests.router.gateway.harness import StreamThread, router_pid, serve_config
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

GREEDY = dict(temperature=0.0, ignore_eos=True)
RED, BLUE, GRID = square_png("red", 40, 50, 1), square_png("blue", 30, 30, 2), square_png("green", 100, 90, 3)


def image_chat(*parts) -> list[dict]:
    content = [{"type": "image", "data": p} if isinstance(p, bytes) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


REQUESTS = {  # name: generate() keyword arguments
    "one tile": dict(messages=image_chat(RED, QUESTION)),
    "grid": dict(messages=image_chat(GRID, QUESTION)),
    "two images": dict(messages=image_chat(BLUE, "and", RED, QUESTION)),
    "beside a prompt": dict(prompt="<|image|>is it red?", images=[BLUE]),
    "text": dict(messages=[{"role": "user", "content": "count from 17"}]),
    # images that no test sends before the failure tests (a router's cache would answer for one it has seen)
    **{
        f"unseen {i}": dict(messages=image_chat(square_png("orange", 30 + 9 * i, 60, 50 + i), QUESTION))
        for i in range(2)
    },
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("vlm"), "scout", train_steps=0, vision=True))


@pytest.fixture(scope="module")
def server(model_dir):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    config = serve_config(
        model_dir,
        cluster={"routers": 2, "workers": 2, "vision_encoders": 2, "hang_timeout_s": 1.0},
        scheduler={"max_num_seqs": 16},
        gateway={"max_images_per_request": 2, "max_image_bytes": 64 * 1024, "max_image_pixels": 1_000_000},
    )
    with Server(config, show_progress=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model_dir):
    """Tokens of each REQUESTS entry from the in-process engine, as `moecluster generate --workers 0` runs it."""
    from cluster.checkpoint import CheckpointReader
    from router.engine.async_engine import AsyncEngine, collect
    from router.engine.engine import Engine
    from router.gateway import convert
    from router.images.features import VisionSettings, image_features_for

    reader = CheckpointReader(model_dir)
    images = image_features_for(model_dir, VisionSettings(encoders=0), "cpu", "auto", reader)
    engine = AsyncEngine(Engine.from_checkpoint(model_dir, reader=reader), images)

    async def run(n: int) -> dict[str, list[int]]:
        requests = {
            name: convert.engine_request(build(kwargs, max_tokens=n), name) for name, kwargs in REQUESTS.items()
        }
        results = await asyncio.gather(*(collect(engine.generate(r)) for r in requests.values()))
        return {name: r["token_ids"] for name, r in zip(requests, results)}

    try:
        yield {n: asyncio.run(run(n)) for n in (12, 48)}
    finally:
        engine.shutdown()


def build(kwargs: dict, **sampling):
    from protos.client_types import build_request

    return build_request(**kwargs, **GREEDY, **sampling)


def tokens_of(client, name: str, n: int = 12, **kwargs) -> list[int]:
    return client.generate_text(**REQUESTS[name], max_tokens=n, **GREEDY, **kwargs).token_ids


def background(target: str, name: str, n: int) -> StreamThread:
    """A greedy stream of REQUESTS[name] on a client of its own, read on a thread."""
    client = InferenceClient(target)
    return StreamThread(client.generate(**REQUESTS[name], max_tokens=n, **GREEDY), closing=client)


def retries(client) -> int:
    return sum(r.image_encode_retries for r in client.cluster_status().routers)


def encoders_serving(client) -> bool:
    return [e.state for e in client.cluster_status().vision_encoders] == ["serving", "serving"]


# ---- answers -------------------------------------------------------------------------------------------------


def test_image_requests_stream_what_the_in_process_engine_generates(client, reference):
    for name in [name for name in REQUESTS if not name.startswith("unseen")]:
        assert tokens_of(client, name) == reference[12][name], name


def test_images_and_text_share_the_batch_and_each_gets_its_own_answer(server, reference):
    names = [name for name in list(REQUESTS)[:4] for _ in range(2)] + ["text"] * 8  # 8 image requests, 8 text

    async def run_all():
        async with AsyncInferenceClient(server.target) as aclient:

            async def one(name):
                gen = aclient.generate(**REQUESTS[name], max_tokens=12, **GREEDY)
                return [t async for chunk in gen for t in chunk.token_ids]

            return await asyncio.gather(*(one(n) for n in names))

    for name, tokens in zip(names, asyncio.run(run_all())):
        assert tokens == reference[12][name], name


def test_model_info_tokenize_and_status_describe_images(client):
    info = client.model_info()
    assert (info.accepts_images, info.image_tile_size, info.image_tokens_per_tile) == (True, 56, 4)
    assert (info.max_images_per_request, info.max_image_bytes, info.max_image_pixels) == (2, 65536, 1_000_000)
    ids = client.tokenize(messages=REQUESTS["grid"]["messages"])
    assert ids.count(ids[ids.index(client.tokenize("<|patch|>", add_special_tokens=False)[0])]) == 4 * 5
    assert client.generate_text(**REQUESTS["grid"], max_tokens=1).prompt_tokens == len(ids)
    status = client.cluster_status()
    assert [e.index for e in status.vision_encoders] == [0, 1] and sum(e.images_encoded for e in status.vision_encoders)


def test_a_repeated_image_is_served_from_the_cache(client):
    def totals():
        routers = client.cluster_status().routers
        return sum(r.images_encoded for r in routers), sum(r.image_cache_hits for r in routers)

    fresh = square_png("yellow", 33, 44, 99)
    encoded, hits = totals()
    for _ in range(3):  # over two routers: one of them sees it twice
        client.generate_text(messages=image_chat(fresh, QUESTION), max_tokens=2, **GREEDY)
    encoded_after, hits_after = totals()
    assert encoded_after - encoded <= 2 and hits_after - hits >= 1


def test_the_command_line_client_sends_images(server, tmp_path, reference):
    (tmp_path / "red.png").write_bytes(RED)
    done = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "client", "generate", "--target", server.target, "--chat", "--image",
         str(tmp_path / "red.png"), QUESTION, "--max-tokens", "12", "--temperature", "0", "--ignore-eos", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == reference[12]["one tile"]


# ---- refusals ------------------------------------------------------------------------------------------------

TRUNCATED = RED[:-40]  # its header is whole: the encoder finds the damage when it decodes
BIG = square_png("red", 900, 900, 4)  # over max_image_bytes (its noise does not compress)
HUGE_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (40000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
ZERO_WIDE = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (0).to_bytes(4, "big") + (10).to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
)
DATA_URL = "data:image/png;base64," + base64.b64encode(RED).decode()
BAD = [  # (generate kwargs, the field named, a fragment of the message)
    (dict(messages=image_chat(TRUNCATED, QUESTION)), "messages[0].parts[0].image", "is a truncated or corrupt PNG"),
    (dict(messages=image_chat(b"", QUESTION)), "messages[0].parts[0].image", "is empty"),
    (dict(messages=image_chat(ZERO_WIDE, QUESTION)), "messages[0].parts[0].image", "is 0x10 pixels"),
    (dict(messages=image_chat(HUGE_HEADER, QUESTION)), "messages[0].parts[0].image", "at most 1000000 pixels"),
    (dict(messages=image_chat(b"%PDF-1.7 not an image", QUESTION)), "messages[0].parts[0].image", "is not a PNG"),
    (dict(messages=image_chat(RED, BLUE, RED)), "messages[0].parts[2].image", "at most 2 images are allowed"),
    (dict(messages=image_chat(BIG)), "messages[0].parts[0].image", "at most 65536 bytes are allowed per image"),
    (
        dict(messages=[{"role": "user", "content": [{"type": "image", "url": "https://example.com/cat.png"}]}]),
        "messages[0].parts[0].image.url",
        "only data: URLs are accepted",
    ),
    (dict(prompt="<|image|>hi", images=[DATA_URL[:-4] + "!!!!"]), "images[0].url", "invalid base64"),
    (dict(prompt="no placeholder", images=[RED]), "prompt", "has 0 image placeholders (<|image|>) but 1 images"),
]


def test_each_bad_image_is_refused_naming_its_field_while_other_streams_go_on(server, client, reference):
    text, image = background(server.target, "text", 48), background(server.target, "grid", 48)
    wait_for(lambda: text.tokens and image.tokens, what="both background streams' first tokens")
    failures = []
    for kwargs, field, fragment in BAD:
        try:
            client.generate_text(**kwargs, max_tokens=4, **GREEDY)
            failures.append(f"{field}: accepted")
        except GenerationError as e:
            # the message starts with the field (and an Error sent on a started stream names it too)
            ok = e.code == grpc.StatusCode.INVALID_ARGUMENT and e.field in ("", field) and e.message.startswith(field)
            if not (ok and fragment in e.message):
                failures.append(f"{field}: {e.code.name} field={e.field!r} {e.message!r}")
    assert not failures, "\n".join(failures)
    assert (text.result(), image.result()) == (reference[48]["text"], reference[48]["grid"])
    assert client.health_status() == "SERVING" and encoders_serving(client)


# ---- failures ------------------------------------------------------------------------------------------------


def test_a_hung_vision_encoder_is_killed_and_its_image_retried_on_the_other(server, client, reference):
    hung, before = server.cluster.encoders[0], client.cluster_status().vision_encoders[0].replacements
    retried = retries(client)
    os.kill(pid_of(hung), signal.SIGSTOP)  # each router sends its next image to encoder 0 (least busy, lowest index)
    assert tokens_of(client, "unseen 0") == reference[12]["unseen 0"]
    assert retries(client) == retried + 1
    wait_for(lambda: encoders_serving(client) and server.cluster.encoders[0] is not hung, what="the replacement")
    assert client.cluster_status().vision_encoders[0].replacements == before + 1


def test_vision_encoders_killed_mid_image_cost_the_request_nothing(server, client, reference):
    before, retried = [e.replacements for e in client.cluster_status().vision_encoders], retries(client)
    pids = [pid_of(e) for e in server.cluster.encoders]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # an image sent now waits in an encoder ...
    request = background(server.target, "unseen 1", 12)
    time.sleep(0.5)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # ... which dies mid-image, and so does the other: it waits for a replacement
    assert request.result() == reference[12]["unseen 1"]
    assert retries(client) == retried + 2  # on the encoder it was sent to, then on the other: then it waited
    wait_for(lambda: encoders_serving(client), what="both replacements")
    assert [e.replacements for e in client.cluster_status().vision_encoders] == [n + 1 for n in before]


def test_a_router_killed_mid_stream_of_an_image_request_costs_it_nothing(server, client, reference):
    stream = background(server.target, "two images", 48)
    wait_for(lambda: len(stream.tokens) >= 4, what="the stream's first tokens")
    (relay,) = server.gateway.service.streams.values()
    os.kill(router_pid(server, relay.router.index), signal.SIGKILL)
    assert stream.result() == reference[48]["two images"]
    assert relay.failovers == 1
