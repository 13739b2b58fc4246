"""The serve configuration: one YAML file, parsed once at the edge into the frozen settings dataclasses that the
runtime itself uses (each section is the class its consumer takes: `scheduler` is the engine's EngineConfig,
`gateway` the gateway's GatewayConfig, `cluster` the launcher's ClusterConfig), then passed down.

Every value is checked where its field is declared (cluster/settings.py), so a value from the file, a flag or code
meets the same rule; an error names the file, the key path, the bad value and what would be allowed, e.g.
`config.yaml: cluster.workers: expected an integer >= 0, got -1`. Unknown keys are errors too. Command-line flags
override the file through `apply_overrides`, which validates the merged result again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.settings import SettingError, Settings, build, choice, optional, section, setting, text, to_mapping
from deploy.cluster_config import ClusterConfig
from deploy.logging_setup import LoggingConfig
from router.engine.config import EngineConfig
from router.gateway.config import GatewayConfig, MetricsConfig

TINY_PRESETS = ("scout", "maverick")  # the presets of deploy/tiny/model.py, named here so loading needs no torch


@dataclass(frozen=True)
class ModelSource(Settings):
    """The `model:` section: which checkpoint to serve, in which dtype, under which name."""

    path: str | None = setting(None, optional(text))  # None: the embedded tiny model, written on first use
    dtype: str = setting("auto", choice("auto", "float32", "bfloat16", "float16"))
    name: str | None = setting(None, optional(text))  # the served model name that requests must match
    tiny_preset: str = setting("scout", choice(*TINY_PRESETS))  # used only when path is None

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).name if self.path else f"tiny-{self.tiny_preset}"


@dataclass(frozen=True)
class ServeConfig(Settings):
    model: ModelSource = section(ModelSource)
    cluster: ClusterConfig = section(ClusterConfig)
    scheduler: EngineConfig = section(EngineConfig)
    gateway: GatewayConfig = section(GatewayConfig)
    metrics: MetricsConfig = section(MetricsConfig)
    logging: LoggingConfig = section(LoggingConfig)
    source: str = field(default="<defaults>", compare=False)  # where it came from, for error messages

    def check_across(self) -> None:
        m, g = self.metrics, self.gateway
        if m.enabled and m.port and m.port == g.port:
            raise SettingError(
                "metrics.port", f"{m.port} is also gateway.port; expected a different port (or 0 for any free one)"
            )


def load_serve_config(path: str | os.PathLike | None) -> ServeConfig:
    """Read and validate a YAML serve config; None gives all defaults."""
    if path is None:
        return parse_serve_config(None, "<defaults>")
    try:
        text_ = Path(path).read_text()
    except OSError as e:
        raise SettingError("(file)", f"cannot read the config file: {e.strerror or e}", str(path)) from None
    try:
        raw = yaml.load(text_, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise SettingError("(file)", f"not valid YAML: {e}", str(path)) from None
    return parse_serve_config(raw, str(path))


def parse_serve_config(raw: Any, source: str = "<mapping>") -> ServeConfig:
    """Validate an already-parsed mapping (e.g. a ConfigMap's YAML) into a ServeConfig."""
    if isinstance(raw, dict) and "source" in raw:
        raise SettingError(
            "source",
            "unknown key (allowed at the top level: model, cluster, scheduler, gateway, metrics, logging)",
            source,
        )
    cfg = build(ServeConfig, raw, source)
    object.__setattr__(cfg, "source", source)
    return cfg


# Command-line flag -> key path. A flag left at None was not given and keeps the file's value.
OVERRIDES = {
    "model_path": "model.path",
    "model_name": "model.name",
    "dtype": "model.dtype",
    "tiny_preset": "model.tiny_preset",
    "device": "cluster.device",
    "workers": "cluster.workers",
    "placement": "cluster.placement",
    "expert_replicas": "cluster.expert_replicas",
    "routers": "cluster.routers",
    "vision_encoders": "cluster.vision_encoders",
    "ray_address": "cluster.ray_address",
    "collective_timeout_s": "cluster.collective_timeout_s",
    "startup_timeout_s": "cluster.startup_timeout_s",
    "max_num_seqs": "scheduler.max_num_seqs",
    "max_num_batched_tokens": "scheduler.max_num_batched_tokens",
    "max_model_len": "scheduler.max_model_len",
    "kv_cache_memory": "scheduler.kv_cache_memory",
    "host": "gateway.host",
    "port": "gateway.port",
    "http_port": "gateway.http_port",
    "max_concurrent_streams": "gateway.max_concurrent_streams",
    "max_queued_requests": "gateway.max_queued_requests",
    "max_message_bytes": "gateway.max_message_bytes",
    "drain_grace_s": "gateway.drain_grace_s",
    "request_timeout_s": "gateway.request_timeout_s",
    "metrics_enabled": "metrics.enabled",
    "metrics_port": "metrics.port",
    "log_level": "logging.level",
    "log_format": "logging.format",
}


def apply_overrides(cfg: ServeConfig, **flags: Any) -> ServeConfig:
    """A new config with the given command-line values in place of the file's, validated as a whole again."""
    unknown = sorted(set(flags) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"apply_overrides: unknown flags {unknown}; known: {sorted(OVERRIDES)}")
    raw = to_mapping(cfg)
    for flag, value in flags.items():
        if value is not None:
            section_name, key = OVERRIDES[flag].split(".")
            raw[section_name][key] = value
    source = f"{cfg.source} with command-line flags"
    try:
        return parse_serve_config(raw, source)
    except SettingError as e:
        given = {OVERRIDES[f]: f for f, v in flags.items() if v is not None}
        if e.key in given:  # name the flag the person typed, not only the key it sets
            raise SettingError(f"--{given[e.key].replace('_', '-')} ({e.key})", e.problem, "command line") from None
        raise


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice, which plain YAML loading resolves silently to the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                continue  # unhashable: the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)
