"""What a checkpoint says about generation beyond config.json: generation_config.json's sampling defaults and
its EOS set. Read by the engine (defaults, stop tokens) and the reference decode loop."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.config import ModelConfig


def load_generation_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def eos_token_ids(model_dir: str | Path, cfg: ModelConfig) -> tuple[int, ...]:
    """generation_config.json's EOS set when present, else config.json's."""
    eos = load_generation_config(model_dir).get("eos_token_id", cfg.eos_token_ids)
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
