"""The default model of `moecluster serve` without --model: the tiny Scout-like checkpoint with its vision tower,
copied once from the trained checkpoint that ships in the repository (deploy/tiny/shipped.py) into the user's cache
directory. Written to a temporary directory first and renamed into place, so a crash or a second process never sees
half a checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from deploy.tiny.shipped import RECIPE_VERSION, copy_shipped

log = logging.getLogger(__name__)

TINY_MODEL_NAME = f"tiny-scout-v{RECIPE_VERSION}"  # the cache copy's name; other presets replace "scout"


def cache_dir(env: Mapping[str, str]) -> Path:
    """$MOECLUSTER_CACHE, else $XDG_CACHE_HOME/moecluster, else ~/.cache/moecluster."""
    if env.get("MOECLUSTER_CACHE"):
        return Path(env["MOECLUSTER_CACHE"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "moecluster"
    return Path.home() / ".cache" / "moecluster"


def tiny_model(root: Path, preset: str = "scout") -> Path:
    """`root/tiny-<preset>-v<RECIPE_VERSION>`, copied from the shipped checkpoint first if it is not there yet."""
    name = TINY_MODEL_NAME.replace("scout", preset)
    final = root / name
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    log.info("copying the shipped tiny %s model to %s (once)", preset, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        copy_shipped(preset, tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():  # not a concurrent writer that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def model_dir_for(model_path: str | None, tiny_preset: str, env: Mapping[str, str]) -> str:
    """The checkpoint a serve config names (`model.path`), or the embedded tiny model, copied once to the cache."""
    return model_path or str(tiny_model(cache_dir(env), tiny_preset))
