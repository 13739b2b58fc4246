"""What the benchmarks measure on: the checkpoint given, or a fresh random tiny Scout in a temporary
directory; and the transformers baseline model, when transformers is installed."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def skew_gates(model_dir: str, hot: tuple[int, int] = (0, 1)) -> None:
    """Rewrite the checkpoint's MoE gates so every token goes to expert hot[0] or hot[1] in every layer: the two
    gate rows are v and -v (one of them always scores >= 0), every other row 0. For load-balancing benchmarks."""
    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(0)
    for name, weight in tensors.items():
        if name.endswith("feed_forward.router.weight"):
            v = torch.randn(weight.shape[1], generator=g)
            weight.zero_()
            weight[hot[0]], weight[hot[1]] = v, -v
    save_file(tensors, path, metadata={"format": "pt"})
