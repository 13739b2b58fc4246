"""The `logging:` section of the serve config; the format itself is cluster/log_format.py, shared with the
actors, which the launcher sets up with the same level and format."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.log_format import setup_logging
from cluster.settings import Settings, choice, setting

__all__ = ["LoggingConfig", "setup_logging"]


@dataclass(frozen=True)
class LoggingConfig(Settings):
    """The `logging:` section of the serve config."""

    level: str = setting("INFO", choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold_case=True))
    format: str = setting("text", choice("text", "json"))  # json: one object per line, for log collectors
