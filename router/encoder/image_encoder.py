"""Image bytes in, image features out: decode (refusing corrupt data), tile, and run the vision tower. A vision
encoder actor holds one (router/encoder/actor.py); with `cluster.vision_encoders: 0` the router holds one itself.
On a GPU it runs on a CUDA stream of its own, so a router's decode steps (on the default stream) do not queue
behind an image's kernels.

Legend: T tiles, N `<|patch|>` tokens per tile, P = T * N feature rows, D text hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.vision.model import VisionTower
from cluster.vision.weights import load_vision_tower, vision_config_of
from cluster.weights import resolve_dtype
from router.images.processor import ImageProcessor
from router.images.request import HARD_LIMITS
from router.images.tiles import MAX_TILES
from router.request.errors import InvalidRequest


@dataclass(frozen=True)
class Refusal:
    """Image data the encoder would not take (corrupt past its header, say): the request's fault, not the
    encoder's. Without a field: whoever asked names its own request's field (a cached or shared encode may have
    been asked for by another request)."""

    problem: str


class ImageEncoder:
    def __init__(self, tower: VisionTower):
        self.tower = tower
        self.processor = ImageProcessor(tower.config.image_size, MAX_TILES, HARD_LIMITS)
        self.stream = torch.cuda.Stream(tower.device) if tower.device.type == "cuda" else None
        self.encoded = 0  # images encoded so far

    @classmethod
    def from_checkpoint(
        cls, model_dir: str, device: str = "cpu", dtype: str = "auto", reader: CheckpointReader | None = None
    ) -> ImageEncoder | None:
        """The checkpoint's vision tower in the text model's dtype; None when it has none."""
        reader = reader or CheckpointReader(model_dir)
        cfg = vision_config_of(model_dir, reader)
        if cfg is None:
            return None
        dev = torch.device(device)
        tower = load_vision_tower(cfg, reader, dev, resolve_dtype(dtype, load_model_config(model_dir), dev))
        return cls(tower)

    @torch.inference_mode()
    def encode(self, data: bytes) -> torch.Tensor | Refusal:
        """Features [P, D] on the CPU (rows in `<|patch|>` order: the grid's tiles, then the global tile)."""
        try:
            image = self.processor.preprocess(data, "image")
        except InvalidRequest as e:
            return Refusal(e.problem)
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            features_PD = self.tower(image.pixels_T3SS).cpu()  # .cpu() waits for this stream's kernels only
        self.encoded += 1
        return features_PD
