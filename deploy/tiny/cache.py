"""The default model of `moecluster serve` without --model: the tiny Scout-like checkpoint with its vision tower,
made once and kept in the user's cache directory. Written to a temporary directory first and renamed into place, so a
crash or a second process never sees half a checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from deploy.tiny.model import write_tiny_model

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-scout-v2"  # bump the suffix when the tiny model's recipe changes (v2: the vision tower)


def cache_dir(env: Mapping[str, str]) -> Path:
    """$MOECLUSTER_CACHE, else $XDG_CACHE_HOME/moecluster, else ~/.cache/moecluster."""
    if env.get("MOECLUSTER_CACHE"):
        return Path(env["MOECLUSTER_CACHE"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "moecluster"
    return Path.home() / ".cache" / "moecluster"


def tiny_model(root: Path, preset: str = "scout", train_steps: int | None = None) -> Path:
    """`root/tiny-<preset>-v2`, written first if it is not there yet."""
    name = TINY_MODEL_NAME.replace("scout", preset)
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    log.warning("writing the tiny model to %s (once; training it takes about a minute on 2 idle cores)", final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write_tiny_model(tmp, preset, train_steps=train_steps, vision=True)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a concurrent writer that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def model_dir_for(model_path: str | None, tiny_preset: str, env: Mapping[str, str]) -> str:
    """The checkpoint a serve config names (`model.path`), or the embedded tiny model, made once in the cache."""
    return model_path or str(tiny_model(cache_dir(env), tiny_preset))
