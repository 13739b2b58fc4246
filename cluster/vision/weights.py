"""Builds the vision tower from a Hugging Face checkpoint (one file or sharded), reading each parameter under its own
name through the same CheckpointReader as the text model: `vision_model.*` and `multi_modal_projector.*` keys are
stored beside `language_model.`, and the reader takes them as stored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.checkpoint import CheckpointReader
from cluster.vision.config import VisionConfig, load_vision_config
from cluster.vision.model import VisionTower

PATCH_EMBEDDING_KEY = "vision_model.patch_embedding.linear.weight"


def has_vision_tower(reader: CheckpointReader) -> bool:
    """Whether the checkpoint stores a vision tower (a text-only checkpoint, or one whose vision weights were
    stripped, does not; load_vision_tower then names any other missing tensor)."""
    return PATCH_EMBEDDING_KEY in reader


def vision_config_of(model_dir: str | Path, reader: CheckpointReader) -> VisionConfig | None:
    """The checkpoint's vision tower config, or None when it stores no vision tower (text-only, or stripped)."""
    return load_vision_config(model_dir) if has_vision_tower(reader) else None


def load_vision_tower(
    cfg: VisionConfig, reader: CheckpointReader, device: torch.device, dtype: torch.dtype
) -> VisionTower:
    """Every tensor checked against the shape `cfg` implies; CheckpointError names a missing or mis-shaped key."""
    with torch.device("meta"):
        tower = VisionTower(cfg)
    state = {
        name: reader.read(name, shape=param.shape, dtype=dtype).to(device) for name, param in tower.named_parameters()
    }
    tower.load_state_dict(state, strict=True, assign=True)
    return tower.eval().requires_grad_(False)


def vision_tower_bytes(cfg: VisionConfig, reader: CheckpointReader) -> int:
    """What `load_vision_tower` will read, for progress display."""
    with torch.device("meta"):
        names = [name for name, _ in VisionTower(cfg).named_parameters()]
    return sum(reader.nbytes(name) for name in names)
