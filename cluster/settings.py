"""Typed settings: frozen dataclasses whose fields carry their own check, so a value is validated the same way
whether it comes from a YAML file, a command-line flag or Python code, and each key has one default, in one place.

    @dataclass(frozen=True)
    class EngineConfig(Settings):
        max_num_seqs: int = setting(64, integer(1))

`EngineConfig(max_num_seqs=0)` raises `SettingError("max_num_seqs", "expected an integer >= 1, got 0")`;
`build(ServeConfig, yaml_mapping, "serve.yaml")` builds nested sections (`section(EngineConfig)`) in one hop and
names the whole key path (`scheduler.max_num_seqs`) and the file. Unknown keys are errors with a suggestion: a
misspelt key silently ignored is a default silently used.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], Any]  # returns the value to store (possibly normalised) or raises Invalid


class Invalid(Exception):
    """Raised by a check; the caller adds the key."""


class SettingError(ValueError):
    """`key: problem`; `source` names the file or flags the value came from, when known."""

    def __init__(self, key: str, problem: str, source: str = ""):
        super().__init__(f"{source}: {key}: {problem}" if source else f"{key}: {problem}")
        self.key, self.problem, self.source = key, problem, source

    def __reduce__(self):  # survives pickling, e.g. when raised inside a Ray task
        return type(self), (self.key, self.problem, self.source)


class Settings:
    """Mixin for frozen dataclasses of `setting` fields: checks (and normalises) every field on construction,
    then calls `check_across()` for rules that involve several fields."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            try:
                object.__setattr__(self, f.name, check(getattr(self, f.name)))
            except Invalid as e:
                raise SettingError(f.name, str(e)) from None
        self.check_across()

    def check_across(self) -> None:
        """Override for rules across fields; raise SettingError naming the key to change."""


def setting(default: Any, check: Check) -> Any:
    return dataclasses.field(default=default, metadata={"check": check})


def section(cls: type) -> Any:
    """A nested group of settings (a YAML mapping)."""
    return dataclasses.field(default_factory=cls, metadata={"section": cls})


def build(cls: type, raw: Any, source: str, path: str = "") -> Any:
    """`cls` from a parsed YAML/JSON mapping (None: all defaults); errors name `source` and the key path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SettingError(path or "(top level)", f"expected a mapping of keys, got {raw!r}", source)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata}
    values = {}
    for name, value in raw.items():
        key = f"{path}.{name}" if path else str(name)
        if name not in fields:
            raise SettingError(key, _unknown_key(str(name), list(fields), path), source)
        if "section" in fields[name].metadata:
            values[name] = build(fields[name].metadata["section"], value, source, key)
        else:
            values[name] = value
    try:
        return cls(**values)
    except SettingError as e:
        if e.source:  # from a nested section: already complete
            raise
        raise SettingError(f"{path}.{e.key}" if path else e.key, e.problem, source) from None


def to_mapping(obj: Any) -> dict:
    """The inverse of `build`: nested plain dicts of every setting."""
    return {
        f.name: (to_mapping(getattr(obj, f.name)) if "section" in f.metadata else getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if f.metadata
    }


def _unknown_key(name: str, allowed: list[str], path: str) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f"in {path}" if path else "at the top level"
    return f"unknown key{hint} (allowed {where}: {', '.join(allowed)})"


# ---- checks ----------------------------------------------------------------------------------------------------


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML `true` is a Python int


def number(lo: float, hi: float | None = None, *, above: bool = False, integral: bool = False) -> Check:
    kind = "an integer" if integral else "a number"
    want = f"{kind} in {lo}..{hi}" if hi is not None else f"{kind} {'>' if above else '>='} {lo}"

    def check(v: Any) -> float | int:
        ok = is_int(v) or (not integral and isinstance(v, float) and math.isfinite(v))
        if not ok or v < lo or (above and v == lo) or (hi is not None and v > hi):
            raise Invalid(f"expected {want}, got {v!r}")
        return v if integral else float(v)

    return check


def integer(lo: int, hi: int | None = None) -> Check:
    return number(lo, hi, integral=True)


def choice(*options: str, fold_case: bool = False) -> Check:
    def check(v: Any) -> str:
        key = v.upper() if fold_case and isinstance(v, str) else v
        if key not in options:
            raise Invalid(f"expected one of {'|'.join(options)}, got {v!r}")
        return key

    return check


def typed(want: str, ok: Callable[[Any], bool]) -> Check:
    def check(v: Any) -> Any:
        if not ok(v):
            raise Invalid(f"expected {want}, got {v!r}")
        return v

    return check


text = typed("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
flag = typed("true or false", lambda v: isinstance(v, bool))


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_bytes(v: Any) -> int:
    """Bytes from an int or a size string: "2GiB", "512MiB", "1.5 GB", "4096". Raises ValueError otherwise."""
    if is_int(v) and v >= 1:
        return v
    match = _SIZE.match(v) if isinstance(v, str) else None
    size = int(float(match[1]) * _UNITS[(match[2] or "").lower()]) if match else 0
    if size < 1:
        raise ValueError(f"expected bytes as an integer >= 1 or a size like '2GiB' or '512MiB', got {v!r}")
    return size


def byte_size(hi: int | None = None) -> Check:
    def check(v: Any) -> int:
        try:
            size = parse_bytes(v)
        except ValueError as e:
            raise Invalid(str(e)) from None
        if hi is not None and size > hi:
            raise Invalid(f"expected at most {hi} bytes, got {v!r} ({size} bytes)")
        return size

    return check
