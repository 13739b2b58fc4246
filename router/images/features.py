"""A router's image features: what the engine merges at a prompt's `<|patch|>` positions. Looked up by content hash
in a small cache (router/images/feature_cache.py), else encoded once however many requests ask for the same image at the
same time: by the vision encoder actors (router/images/encoder_pool.py), or with `cluster.vision_encoders: 0` in this
process on a thread of its own (never the engine's: other streams keep stepping while an image encodes).

`features(images)` gives one [P, D] tensor per image, in order; InvalidRequest naming the image's field when its
data is refused (corrupt past its header), EncoderUnavailable when no encoder could encode it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.actor_reports import ImageStats
from cluster.checkpoint import CheckpointReader
from cluster.vision.weights import vision_config_of
from router.encoder.image_encoder import ImageEncoder, Refusal
from router.images.encoder_pool import EncoderPool
from router.images.feature_cache import FeatureCache
from router.request.errors import InvalidRequest
from router.request.messages import ImageInput

HASH_OFF_LOOP_BYTES = 1 << 20  # hash larger images on a thread: the event loop also delivers every stream's tokens


@dataclass(frozen=True)
class VisionSettings:
    """How a router gets image features; the deployment fills it from the `cluster:` section."""

    encoders: int = 0  # vision encoder actors; 0: this process encodes
    cache_bytes: int = 256 * 2**20  # the feature cache's budget
    hang_timeout_s: float = 5.0  # an encode without an answer this long: ping the encoder (no answer: killed)
    wait_s: float = 600.0  # how long an encode waits for a live encoder (a replacement loading its weights)


class LocalEncoder:
    """The router's own vision tower, one image at a time, off the event loop and off the engine thread."""

    def __init__(self, encoder: ImageEncoder):
        self.encoder = encoder
        self._lock = asyncio.Lock()

    async def encode(self, data: bytes):
        async with self._lock:
            return await asyncio.to_thread(self.encoder.encode, data)


class ImageFeatures:
    def __init__(self, encoder: LocalEncoder | EncoderPool, cache_bytes: int):
        self.encoder, self.cache = encoder, FeatureCache(cache_bytes)
        self._encoding: dict[bytes, asyncio.Future] = {}
        self.encodes = 0

    async def features(self, images: Sequence[ImageInput]) -> list:
        results = await asyncio.gather(*(self._one(im) for im in images), return_exceptions=True)
        for result in results:  # the first failure in prompt order, whichever finished first
            if isinstance(result, BaseException):
                raise result
        return results

    async def _one(self, image: ImageInput):
        data = image.data
        key = await asyncio.to_thread(_digest, data) if len(data) > HASH_OFF_LOOP_BYTES else _digest(data)
        features = self.cache.get(key)
        if features is None:
            task = self._encoding.get(key)
            if task is None:
                task = self._encoding[key] = asyncio.ensure_future(self._encode(key, data))
            features = await asyncio.shield(task)  # a request that leaves does not cancel another's wait
        if isinstance(features, Refusal):
            raise InvalidRequest(image.field, features.problem)
        return features

    async def _encode(self, key: bytes, data: bytes):
        try:
            result = await self.encoder.encode(data)
        finally:
            self._encoding.pop(key, None)
        if not isinstance(result, Refusal):
            self.encodes += 1
            self.cache.put(key, result)
        return result

    def stats(self) -> ImageStats:
        pool = self.encoder if isinstance(self.encoder, EncoderPool) else None
        return ImageStats(
            encodes=self.encodes,
            cache_hits=self.cache.hits,
            cache_misses=self.cache.misses,
            cache_bytes=self.cache.bytes,
            encoder_retries=pool.retries if pool else 0,
            live_encoders=tuple(pool.live) if pool else (),
        )


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def image_features_for(
    model_dir: str, settings: VisionSettings, device: str, dtype: str, reader: CheckpointReader
) -> ImageFeatures | None:
    """The router's image features for a checkpoint: None when it has no vision tower; its own tower when
    `settings.encoders` is 0; else a pool that the deployment hands the encoder actors (`EncoderPool.use`)."""
    if vision_config_of(model_dir, reader) is None:
        return None
    if settings.encoders == 0:
        return ImageFeatures(
            LocalEncoder(ImageEncoder.from_checkpoint(model_dir, device, dtype, reader)), settings.cache_bytes
        )
    return ImageFeatures(EncoderPool(settings.hang_timeout_s, settings.wait_s), settings.cache_bytes)
