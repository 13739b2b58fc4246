"""The trained tiny checkpoints that ship in the repository (deploy/tiny/checkpoints/<preset>/), so the embedded
default, the demo and the tests see the same weights on any CPU.

Training is deterministic only on one machine type: another CPU's kernels round differently, the runs drift apart,
and the other machine's model may miss a held-out prompt ("count from 76" -> "77 77 78 ..."). So the weights are
trained once and committed; `copy_shipped` puts them where a server reads them. To regenerate them (after a change
to the recipe in deploy/tiny/model.py or training.py; then bump RECIPE_VERSION, which names the cache copies):

    moecluster tiny-model --train deploy/tiny/checkpoints/scout --preset scout
    moecluster tiny-model --train deploy/tiny/checkpoints/maverick --preset maverick

and run `pytest tests/deploy/tiny` (its held-out checks read these files).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from deploy.config import TINY_PRESETS

CHECKPOINTS = Path(__file__).parent / "checkpoints"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SEED = 0  # the shipped weights are write_tiny_model(dir, preset, seed=SEED, vision=True) on the default steps
RECIPE_VERSION = 3  # v2: the vision tower; v3: shipped weights instead of training at first use


class MissingCheckpoint(FileNotFoundError):
    """A shipped file is not there (an install without the package data, or a checkout that lost it)."""


def shipped_dir(preset: str) -> Path:
    """deploy/tiny/checkpoints/<preset>: the committed trained checkpoint, every file of FILES present."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; allowed: {', '.join(TINY_PRESETS)}")
    path = CHECKPOINTS / preset
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise MissingCheckpoint(
            f"the shipped tiny {preset!r} checkpoint lacks {missing} in {path}; reinstall the package with its "
            f"data, or regenerate it: moecluster tiny-model --train {path} --preset {preset}"
        )
    return path


def copy_shipped(preset: str, out_dir: str | Path) -> Path:
    """Copy the shipped `preset` checkpoint to `out_dir` (created if needed), byte for byte; returns `out_dir`."""
    source, out = shipped_dir(preset), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(source / name, out / name)
        (out / name).chmod(0o644)  # readable by a server running as another user, as write_tiny_model leaves them
    return out
