"""The vision encoder actor: holds the vision tower and turns image bytes into image features for every router.

Life: created by the launcher into its placement-group bundle -> `load` (the tower's weights, with progress) ->
`encode(data)` from any router (one image at a time, on a thread, so `ping` answers while it works) -> `shutdown`.
It holds no request state: it can die at any point; the routers retry the image on another encoder or wait for
the supervisor's replacement (router/images/encoder_pool.py), and `wait_stopped`'s ObjectRef tells the supervisor of
its death.
"""

from __future__ import annotations

import asyncio
import os
import time

import torch

from cluster.actor_reports import EncoderStats, Pong
from cluster.actor_state import ActorKind
from cluster.checkpoint import CheckpointReader
from cluster.load_progress import LoadProgress
from cluster.log_format import setup_logging
from cluster.vision.weights import vision_config_of, vision_tower_bytes
from router.encoder.image_encoder import ImageEncoder, Refusal


class VisionEncoderActor:
    def __init__(
        self,
        model_dir: str,
        index: int,
        device: str = "cpu",
        dtype: str = "auto",
        log: tuple[str, str] = ("INFO", "text"),
    ):
        """Cheap: reads config.json and the checkpoint's headers; `load()` reads the weights."""
        setup_logging(*log)
        self.model_dir, self.index, self.dtype = model_dir, index, dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)  # Ray exposes exactly this actor's GPU
        self.reader = CheckpointReader(model_dir)
        cfg = vision_config_of(model_dir, self.reader)
        if cfg is None:
            raise ValueError(f"{model_dir} has no vision tower; cluster.vision_encoders must be 0 for it")
        self.bytes_total = vision_tower_bytes(cfg, self.reader)
        self.encoder: ImageEncoder | None = None
        self.seconds = 0.0  # spent encoding
        self._lock = asyncio.Lock()
        self._stopped = asyncio.Event()

    async def load(self) -> int:
        await asyncio.to_thread(self._load)
        return self.reader.bytes_read

    def _load(self) -> None:
        self.encoder = ImageEncoder.from_checkpoint(self.model_dir, str(self.device), self.dtype, self.reader)

    def load_progress(self) -> LoadProgress:
        name = f"vision encoder {self.index}"
        return LoadProgress(
            name, self.reader.bytes_read, self.bytes_total, self.reader.tensors_read, bool(self.encoder)
        )

    async def encode(self, data: bytes) -> torch.Tensor | Refusal:
        """Features [P, D] on the CPU, or a Refusal for data that is no decodable image."""
        assert self.encoder is not None, "encode before load"
        async with self._lock:
            started = time.perf_counter()
            try:
                return await asyncio.to_thread(self.encoder.encode, data)
            finally:
                self.seconds += time.perf_counter() - started

    def ping(self) -> Pong:
        return Pong(ActorKind.ENCODER, self.index, os.getpid())

    def stats(self) -> EncoderStats:
        return EncoderStats(
            index=self.index,
            pid=os.getpid(),
            device=str(self.device),
            encoded=self.encoder.encoded if self.encoder else 0,
            seconds=self.seconds,
            loaded=self.encoder is not None,
        )

    async def wait_stopped(self) -> None:
        """Returns when the encoder shuts down; the supervisor holds its ObjectRef to learn of the actor's death."""
        await self._stopped.wait()

    def shutdown(self) -> None:
        self._stopped.set()
