"""Where a router's image features come from: a cache by content hash (least recently used out, within its budget),
one encode however many requests want the same image at once, and a pool of encoders that never fails an image
because an encoder died or hung: the image is retried on another encoder, or waits for a replacement; only an
image that fails every encoder it meets (or no encoder within the wait) ends with EncoderUnavailable. The pool runs
here over fake encoders with the real pool's three calls."""

from __future__ import annotations

import asyncio

import pytest
import torch

from router.encoder.image_encoder import Refusal
from router.images.encoder_pool import EncoderPool
from router.images.errors import EncoderLost, EncoderUnavailable
from router.images.feature_cache import FeatureCache
from router.images.features import ImageFeatures
from router.request.errors import InvalidRequest
from router.request.messages import ImageInput


class FakeEncoder:
    """An encoder link: `mode` "ok" answers at once; "dies" loses the call; "hangs" never answers nor pings;
    "busy" answers after `busy_s` and answers pings meanwhile."""

    def __init__(self, index: int, mode: str = "ok", busy_s: float = 0.0):
        self.index, self.mode, self.busy_s = index, mode, busy_s
        self.calls, self.killed = 0, False

    async def encode(self, data: bytes):
        self.calls += 1
        if self.mode == "dies":
            raise EncoderLost(f"vision encoder {self.index} died: SIGKILL")
        if self.mode == "hangs":
            await asyncio.Event().wait()
        await asyncio.sleep(self.busy_s)
        if data == b"corrupt":
            return Refusal("is a truncated PNG image")
        return torch.full((2, 3), float(len(data)))

    async def ping(self, timeout_s: float) -> bool:
        if self.mode == "hangs":
            await asyncio.sleep(timeout_s)
            return False
        return True

    def kill(self) -> None:
        self.killed = True


def pool_of(*encoders, hang_s: float = 0.05, wait_s: float = 1.0) -> EncoderPool:
    pool = EncoderPool(hang_timeout_s=hang_s, wait_s=wait_s)
    for encoder in encoders:
        pool.use(encoder)
    return pool


def encode(pool: EncoderPool, data: bytes = b"image"):
    return asyncio.run(pool.encode(data))


def test_the_cache_keeps_the_most_recently_used_within_its_budget():
    cache = FeatureCache(budget_bytes=3 * 24)  # three [2, 3] float32 tensors
    for key in (b"a", b"b", b"c"):
        cache.put(key, torch.zeros(2, 3))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(b"d", torch.zeros(2, 3))
    assert (cache.get(b"b"), len(cache), cache.bytes) == (None, 3, 72)
    cache.put(b"huge", torch.zeros(100, 100))
    assert cache.get(b"huge") is None and cache.bytes == 72


def test_an_encoder_that_dies_mid_image_has_the_image_retried_on_another():
    dead, alive = FakeEncoder(0, "dies"), FakeEncoder(1)
    pool = pool_of(dead, alive)
    assert encode(pool).shape == (2, 3)
    assert (dead.calls, alive.calls, pool.live, pool.retries) == (1, 1, [1], 1)


def test_a_hung_encoder_is_killed_and_the_image_retried():
    hung, alive = FakeEncoder(0, "hangs"), FakeEncoder(1)
    pool = pool_of(hung, alive)
    assert encode(pool).shape == (2, 3)
    assert hung.killed and pool.live == [1]


def test_a_busy_encoder_that_answers_pings_is_waited_for():
    busy = FakeEncoder(0, "busy", busy_s=0.3)  # six hang timeouts long
    pool = pool_of(busy)
    assert encode(pool).shape == (2, 3)
    assert not busy.killed and (busy.calls, pool.retries) == (1, 0)


def test_with_no_encoder_live_an_image_waits_for_the_replacement():
    pool = pool_of(FakeEncoder(0, "dies"))

    async def replaced_later():
        task = asyncio.ensure_future(pool.encode(b"image"))
        await asyncio.sleep(0.2)
        assert not task.done()  # waiting: the only encoder is dead
        pool.use(FakeEncoder(0))  # the supervisor's replacement
        return await task

    assert asyncio.run(replaced_later()).shape == (2, 3)


def test_an_image_that_kills_every_encoder_it_meets_ends_after_three():
    encoders = [FakeEncoder(i, "dies") for i in range(5)]
    with pytest.raises(EncoderUnavailable, match="3 vision encoders failed this image in turn"):
        encode(pool_of(*encoders))
    assert sum(e.calls for e in encoders) == 3


def test_no_encoder_within_the_wait_or_a_pool_given_up_is_unavailable():
    with pytest.raises(EncoderUnavailable, match=r"no vision encoder was live within 0\.2s"):
        encode(pool_of(wait_s=0.2))
    pool = pool_of(FakeEncoder(0))
    pool.give_up("vision encoder 0: 3 replacements failed")
    with pytest.raises(EncoderUnavailable, match="given up: vision encoder 0"):
        encode(pool)


def test_the_busiest_encoder_gets_the_next_image_last():
    a, b = FakeEncoder(0, "busy", busy_s=0.1), FakeEncoder(1, "busy", busy_s=0.1)
    pool = pool_of(a, b)

    async def two():
        return await asyncio.gather(pool.encode(b"x"), pool.encode(b"y"))

    asyncio.run(two())
    assert (a.calls, b.calls) == (1, 1)


def features(source: ImageFeatures, images: list[ImageInput]):
    return asyncio.run(source.features(images))


def test_the_same_image_at_once_is_encoded_once_and_then_served_from_the_cache():
    encoder = FakeEncoder(0, "busy", busy_s=0.05)
    source = ImageFeatures(pool_of(encoder), cache_bytes=1 << 20)
    same = [ImageInput(b"image", f"messages[0].parts[{j}].image") for j in range(3)]
    assert [f.shape for f in features(source, same)] == [(2, 3)] * 3
    features(source, same[:1])
    assert (encoder.calls, source.encodes, source.cache.hits) == (1, 1, 1)


def test_a_refused_image_names_each_asking_request_s_own_field():
    source = ImageFeatures(pool_of(FakeEncoder(0)), cache_bytes=1 << 20)
    for field in ("images[0]", "messages[2].parts[1].image"):
        with pytest.raises(InvalidRequest) as err:
            features(source, [ImageInput(b"fine", "images[9]"), ImageInput(b"corrupt", field)])
        assert str(err.value) == f"{field}: is a truncated PNG image"
    assert (len(source.cache), source.encodes) == (1, 1)  # "fine" only: a refusal is not cached
