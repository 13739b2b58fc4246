"""The serve configuration: one YAML file, parsed once at the edge into frozen dataclasses, then passed down.

Every value is checked here so nothing further in can be surprised by one; an error names the file, the key path,
the bad value and what would be allowed, e.g. `config.yaml: cluster.workers: expected an integer >= 0, got -1`.
Unknown keys are errors too (a misspelt key silently ignored is a default silently used). Command-line flags
override the file through `apply_overrides`, which validates the merged result again.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TINY_PRESETS = ("scout", "maverick")  # the presets of deploy/tiny_model.py, named here so loading needs no torch


class ServeConfigError(ValueError):
    """A configuration that cannot run: `source: key.path: problem (what is allowed, what was given)`."""

    def __init__(self, source: str, key: str, problem: str):
        super().__init__(f"{source}: {key}: {problem}")
        self.source, self.key, self.problem = source, key, problem

    def __reduce__(self):  # survives pickling, e.g. when raised inside a Ray task
        return type(self), (self.source, self.key, self.problem)


class _Bad(Exception):  # raised by a value check; the builder adds the file and key path
    pass


Check = Callable[[Any], Any]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML `true` is a Python int


def _num(lo: float, hi: float | None = None, *, integer: bool = False, above: bool = False) -> Check:
    kind = "an integer" if integer else "a number"
    want = f"{kind} in {lo}..{hi}" if hi is not None else f"{kind} {'>' if above else '>='} {lo}"

    def check(v: Any) -> float | int:
        ok = _is_int(v) or (not integer and isinstance(v, float) and math.isfinite(v))
        if not ok or v < lo or (above and v == lo) or (hi is not None and v > hi):
            raise _Bad(f"expected {want}, got {v!r}")
        return v if integer else float(v)
    return check


def _int(lo: int, hi: int | None = None) -> Check:
    return _num(lo, hi, integer=True)


def _choice(*options: str, fold_case: bool = False) -> Check:
    def check(v: Any) -> str:
        key = v.upper() if fold_case and isinstance(v, str) else v
        if key not in options:
            raise _Bad(f"expected one of {'|'.join(options)}, got {v!r}")
        return key
    return check


def _typed(want: str, ok: Callable[[Any], bool]) -> Check:
    def check(v: Any) -> Any:
        if not ok(v):
            raise _Bad(f"expected {want}, got {v!r}")
        return v
    return check


_text = _typed("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
_flag = _typed("true or false", lambda v: isinstance(v, bool))


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(v: Any) -> int:
    """Bytes from an int or a size string: "2GiB", "512MiB", "1.5 GB", "4096". Raises ValueError otherwise."""
    if _is_int(v) and v >= 1:
        return v
    match = _SIZE.match(v) if isinstance(v, str) else None
    size = int(float(match[1]) * _UNITS[(match[2] or "").lower()]) if match else 0
    if size < 1:
        raise ValueError(f"expected bytes as an integer >= 1 or a size like '2GiB' or '512MiB', got {v!r}")
    return size


def _bytes(hi: int | None = None) -> Check:
    def check(v: Any) -> int:
        try:
            size = parse_bytes(v)
        except ValueError as e:
            raise _Bad(str(e)) from None
        if hi is not None and size > hi:
            raise _Bad(f"expected at most {hi} bytes, got {v!r} ({size} bytes)")
        return size
    return check


_RANGES = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")
_PLACEMENT_FORMS = ("expected null, expert ranges per worker like '0-5;6-10;11-15', "
                    "or a mapping MoE layer -> list of expert lists (one per worker)")


def _placement(v: Any) -> str | dict[int, tuple[tuple[int, ...], ...]] | None:
    """Checks the shape only; which experts and layers exist is checked against the model at start-up."""
    if v is None:
        return None
    if isinstance(v, str) and all(_RANGES.match(part) for part in v.split(";")):
        return v
    if isinstance(v, Mapping) and v:
        per_layer = {_layer_key(k): _expert_groups(k, groups) for k, groups in v.items()}
        if len({len(groups) for groups in per_layer.values()}) > 1:
            counts = {layer: len(groups) for layer, groups in per_layer.items()}
            raise _Bad(f"every layer must be split over the same number of workers, got {counts}")
        return per_layer
    raise _Bad(f"{_PLACEMENT_FORMS}, got {v!r}")


def _layer_key(k: Any) -> int:
    if (_is_int(k) and k >= 0) or (isinstance(k, str) and k.isdigit()):
        return int(k)
    raise _Bad(f"layer keys must be integers >= 0, got {k!r}")


def _expert_groups(layer: Any, groups: Any) -> tuple[tuple[int, ...], ...]:
    ok = isinstance(groups, (list, tuple)) and groups and all(
        isinstance(g, (list, tuple)) and g and all(_is_int(e) and e >= 0 for e in g) for g in groups)
    if not ok:
        raise _Bad(f"layer {layer}: expected a list of non-empty expert lists (one per worker), got {groups!r}")
    return tuple(tuple(g) for g in groups)


def placement_workers(placement: str | Mapping | None) -> int | None:
    """How many workers a placement names (None when there is no placement)."""
    if placement is None:
        return None
    if isinstance(placement, str):
        return len(placement.split(";"))
    return max(len(groups) for groups in placement.values())


def _routers(v: Any) -> int:
    if _int(1)(v) != 1:
        raise _Bad(f"only 1 router is supported for now, got {v!r}")
    return v


def _opt(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


def _section(cls: type) -> Any:
    return field(default_factory=cls, metadata={"section": cls})


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = _opt(None, _optional(_text))  # None: the embedded tiny model, written on first use
    dtype: str = _opt("auto", _choice("auto", "float32", "bfloat16", "float16"))
    name: str | None = _opt(None, _optional(_text))  # the served model name that requests must match
    tiny_preset: str = _opt("scout", _choice(*TINY_PRESETS))  # used only when path is None

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).name if self.path else f"tiny-{self.tiny_preset}"


@dataclass(frozen=True)
class ResourceConfig:
    """What one Ray actor asks for; num_gpus None means 1 on cuda, else 0."""

    num_cpus: float = _opt(1.0, _num(0))
    num_gpus: float | None = _opt(None, _optional(_num(0)))
    memory: int | None = _opt(None, _optional(_bytes()))

    def gpus(self, device: str) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if device == "cuda" else 0.0


@dataclass(frozen=True)
class ClusterConfig:
    device: str = _opt("cpu", _choice("cpu", "cuda"))
    routers: int = _opt(1, _routers)
    workers: int = _opt(2, _int(0))  # 0: experts in-process in the router
    router_resources: ResourceConfig = _section(ResourceConfig)
    worker_resources: ResourceConfig = _section(ResourceConfig)
    placement: str | dict[int, tuple[tuple[int, ...], ...]] | None = _opt(None, _placement)
    collective_timeout_s: float = _opt(60.0, _num(0, above=True))
    startup_timeout_s: float = _opt(600.0, _num(0, above=True))
    ray_address: str | None = _opt(None, _optional(_text))  # None: start a local Ray; "auto": join the cluster


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _opt(64, _int(1))
    max_num_batched_tokens: int = _opt(2048, _int(1))
    max_model_len: int | None = _opt(None, _optional(_int(1)))  # None: the model's own limit
    block_size: int = _opt(16, _int(1))
    kv_cache_memory: int | None = _opt(None, _optional(_bytes()))  # bytes; None: sized automatically


@dataclass(frozen=True)
class GatewayConfig:
    host: str = _opt("0.0.0.0", _text)
    port: int = _opt(50051, _int(0, 65535))  # 0: any free port
    max_concurrent_streams: int = _opt(256, _int(1))
    max_queued_requests: int = _opt(1024, _int(1))
    max_message_bytes: int = _opt(4 * 2**20, _bytes(hi=2**31 - 1))  # gRPC limits are int32
    drain_grace_s: float = _opt(30.0, _num(0))
    request_timeout_s: float | None = _opt(None, _optional(_num(0, above=True)))


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = _opt(True, _flag)
    port: int = _opt(9090, _int(0, 65535))  # 0: any free port


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _opt("INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold_case=True))
    format: str = _opt("text", _choice("text", "json"))


@dataclass(frozen=True)
class ServeConfig:
    model: ModelConfig = _section(ModelConfig)
    cluster: ClusterConfig = _section(ClusterConfig)
    scheduler: SchedulerConfig = _section(SchedulerConfig)
    gateway: GatewayConfig = _section(GatewayConfig)
    metrics: MetricsConfig = _section(MetricsConfig)
    logging: LoggingConfig = _section(LoggingConfig)
    source: str = field(default="<defaults>", compare=False)  # where it came from, for error messages


def load_serve_config(path: str | os.PathLike | None) -> ServeConfig:
    """Read and validate a YAML serve config; None gives all defaults."""
    if path is None:
        return parse_serve_config(None, "<defaults>")
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ServeConfigError(str(path), "(file)", f"cannot read the config file: {e.strerror or e}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ServeConfigError(str(path), "(file)", f"not valid YAML: {e}") from None
    return parse_serve_config(raw, str(path))


def parse_serve_config(raw: Mapping | None, source: str = "<mapping>") -> ServeConfig:
    """Validate an already-parsed mapping (e.g. a ConfigMap's YAML) into a ServeConfig."""
    cfg = _build(ServeConfig, raw, source, "")
    cfg = dataclasses.replace(cfg, source=source)
    _check_across(cfg)
    return cfg


# Command-line flag -> key path. A flag left at None was not given and keeps the file's value.
OVERRIDES = {
    "model_path": "model.path", "model_name": "model.name", "dtype": "model.dtype",
    "tiny_preset": "model.tiny_preset", "device": "cluster.device", "workers": "cluster.workers",
    "placement": "cluster.placement", "ray_address": "cluster.ray_address",
    "max_num_seqs": "scheduler.max_num_seqs", "max_model_len": "scheduler.max_model_len",
    "kv_cache_memory": "scheduler.kv_cache_memory", "host": "gateway.host", "port": "gateway.port",
    "metrics_port": "metrics.port", "log_level": "logging.level", "log_format": "logging.format",
}


def apply_overrides(cfg: ServeConfig, **flags: Any) -> ServeConfig:
    """A new config with the given command-line values in place of the file's, validated as a whole again."""
    unknown = sorted(set(flags) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"apply_overrides: unknown flags {unknown}; known: {sorted(OVERRIDES)}")
    raw = {name: dataclasses.asdict(getattr(cfg, name)) for name in _keys(ServeConfig)}
    for flag, value in flags.items():
        if value is not None:
            section, key = OVERRIDES[flag].split(".")
            raw[section][key] = value
    source = f"{cfg.source} with command-line flags"
    try:
        return parse_serve_config(raw, source)
    except ServeConfigError as e:
        given = {OVERRIDES[f]: f for f, v in flags.items() if v is not None}
        if e.key in given:  # name the flag the person typed, not only the key it sets
            raise ServeConfigError("command line", f"--{given[e.key].replace('_', '-')} ({e.key})", e.problem) from None
        raise


def _keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata]


def _build(cls: type, raw: Any, source: str, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ServeConfigError(source, path or "(top level)", f"expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata}
    values = {}
    for name, value in raw.items():
        key = f"{path}.{name}" if path else str(name)
        if name not in fields:
            raise ServeConfigError(source, key, _unknown_key(str(name), list(fields), path))
        meta = fields[name].metadata
        if "section" in meta:
            values[name] = _build(meta["section"], value, source, key)
            continue
        try:
            values[name] = meta["check"](value)
        except _Bad as e:
            raise ServeConfigError(source, key, str(e)) from None
    return cls(**values)


def _unknown_key(name: str, allowed: list[str], path: str) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f"in {path}" if path else "at the top level"
    return f"unknown key{hint} (allowed {where}: {', '.join(allowed)})"


def _check_across(cfg: ServeConfig) -> None:
    """Rules that involve more than one key; each error names the key to change."""
    c, s = cfg.cluster, cfg.scheduler
    if c.device == "cuda":
        roles = [("router_resources", c.router_resources)] + ([("worker_resources", c.worker_resources)]
                                                             if c.workers > 0 else [])
        for key, res in roles:
            if res.gpus("cuda") < 1:
                raise ServeConfigError(cfg.source, f"cluster.{key}.num_gpus", "device cuda runs each actor on its "
                                       f"own GPU: expected a number >= 1, got {res.num_gpus!r}")
    named = placement_workers(c.placement)
    if named is not None and named != c.workers:
        raise ServeConfigError(cfg.source, "cluster.placement", f"names {named} workers but cluster.workers is "
                               f"{c.workers}; give one expert list per worker")
    if s.max_num_batched_tokens < s.max_num_seqs:
        raise ServeConfigError(cfg.source, "scheduler.max_num_batched_tokens", "every running sequence needs one "
                               f"token per step: expected an integer >= scheduler.max_num_seqs ({s.max_num_seqs}), "
                               f"got {s.max_num_batched_tokens}")
    if cfg.metrics.enabled and cfg.metrics.port and cfg.metrics.port == cfg.gateway.port:
        raise ServeConfigError(cfg.source, "metrics.port", f"{cfg.metrics.port} is also gateway.port; "
                               "expected a different port (or 0 for any free one)")


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
