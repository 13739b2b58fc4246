"""Copies of a test checkpoint with its tensors edited or spread over shards, for the loaders' error and layout
tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file

from tests.conftest import write_json


def save_sharded(tensors: dict, dst: Path, shards: int) -> None:
    """`tensors` in `dst` as model.safetensors, or as `shards` files with the index transformers writes."""
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, dst / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, dst / name)
        weight_map.update({k: name for k in part})
    write_json(dst / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def edited_copy(src: Path, dst: Path, edit: Callable[[dict], None] = lambda tensors: None, shards: int = 1) -> Path:
    """`src` (config.json and one model.safetensors) copied to `dst` (created), its tensors changed in place by
    `edit(tensors)` and saved as `shards` files."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_sharded(tensors, dst, shards)
    return dst
