"""What the benchmarks measure on: the checkpoint given, or a fresh random tiny Scout in a temporary
directory; and the transformers baseline model, when transformers is installed."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deploy.bench.presets import BENCH_MODELS
from deploy.tiny.model import write_tiny_model

__all__ = ["BENCH_MODELS", "bench_checkpoint", "load_transformers"]


@contextmanager
def bench_checkpoint(model_dir: str | None, overrides: dict | None = None) -> Iterator[str]:
    """`model_dir`, or a random (untrained) tiny Scout with `overrides`, removed afterwards."""
    if model_dir is not None:
        yield model_dir
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield str(write_tiny_model(tmp, "scout", seed=0, train_steps=0, overrides=overrides))


def load_transformers(model_dir: str, device: str = "cpu", dtype: str = "float32"):
    """transformers' Llama4ForCausalLM on the same checkpoint, or None (said once) without transformers."""
    try:
        from transformers import Llama4ForCausalLM
    except ImportError:
        print("baseline skipped: transformers is not installed (pip install 'moecluster[test]')")
        return None
    return (
        Llama4ForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
        .to(device)
        .eval()
    )
