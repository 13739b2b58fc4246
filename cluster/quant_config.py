"""Which weights of a checkpoint are FP8: its compressed-tensors `quantization_config`, checked against the stored
tensors before any weight is read.

Supported: compressed-tensors `float-quantized` FP8 as in meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8 and
llm-compressor's FP8_DYNAMIC recipes: weights 8-bit float, per output channel, symmetric, static (a `weight_scale`
of shape [out, 1] beside each weight); input activations none or 8-bit float per token, dynamic (no stored scale).
Anything else (block-wise FP8, int4/w4a16, static activation scales, a KV-cache scheme, another quant_method or
format) is refused at load, naming the field and its value.

Per module, the config decides (never the model's name): a Linear module is quantized when one of a config
group's `targets` matches it and no `ignore` entry does. An entry matches a module by its name (with or without
the multimodal `language_model.` prefix), by `re:<regex>` (re.match, as compressed-tensors does), or by its class
name (`Linear`, or a parent's: `Llama4TextAttention`, `Llama4TextMLP`, `Llama4TextExperts`, `Llama4Router`). Then
the stored tensors must agree: a quantized module's weight is F8_E4M3 with its scale, every other weight is not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cluster.config import ConfigError

FIELD = "quantization_config"
FORMATS = ("float-quantized",)
_WEIGHTS = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
_INPUTS = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
_EMPTY = (None, {}, [])  # a field given as null/empty means "not set"


@dataclass(frozen=True)
class Fp8Config:
    """A checked compressed-tensors FP8 config: what it targets and what it ignores."""

    targets: tuple[str, ...]
    ignore: tuple[str, ...]

    def quantizes(self, module: str, prefix: str = "") -> bool:
        """`module`: a text-model module name without the multimodal prefix (e.g. `model.layers.1.feed_forward.
        experts.3.up_proj`); `prefix`: the checkpoint's (`language_model.` or "")."""
        if not module_classes(module):
            return False
        names = {module, prefix + module}
        return _matches_any(self.targets, names, module) and not _matches_any(self.ignore, names, module)


SCALE_DTYPES = ("F32", "BF16", "F16")


def module_classes(module: str) -> tuple[str, ...]:
    """The transformers classes a text-model module is (or sits in): () for modules that are not Linear layers."""
    parts = module.split(".")
    if parts[-1] == "router":
        return ("Llama4Router",)
    if parts[-1] == "lm_head":
        return ("Linear",)
    if not parts[-1].endswith("_proj"):
        return ()
    parent = {"self_attn": "Llama4TextAttention", "shared_expert": "Llama4TextMLP", "feed_forward": "Llama4TextMLP"}
    if len(parts) >= 3 and parts[-3] == "experts":
        return ("Linear", "Llama4TextExperts")
    return ("Linear", parent[parts[-2]]) if parts[-2] in parent else ("Linear",)


def _matches_any(entries: tuple[str, ...], names: set[str], module: str) -> bool:
    classes = module_classes(module)
    for entry in entries:
        if entry.startswith("re:"):
            if any(re.match(entry[3:], name) for name in names):
                return True
        elif entry in names or entry in classes:
            return True
    return False


def parse_quantization(raw: dict[str, Any], source: str = "config.json") -> Fp8Config | None:
    """The FP8 config in a config.json (top level, or under text_config), None when there is none; raises
    ConfigError naming the field and value for anything this loader does not support."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    q = raw.get(FIELD, text.get(FIELD))
    if q is None:
        return None
    if not isinstance(q, dict):
        raise _error(source, FIELD, q, "an object")
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise _error(source, f"{FIELD}.quant_method", method, "'compressed-tensors' (FP8 per channel)")
    _check_format(source, f"{FIELD}.format", q.get("format"), required=True)
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        raise _error(source, f"{FIELD}.quantization_status", status, "'compressed' (weights stored in FP8)")
    if q.get("kv_cache_scheme") not in _EMPTY:
        raise _error(source, f"{FIELD}.kv_cache_scheme", q["kv_cache_scheme"], "null (the KV cache is not quantized)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _error(source, f"{FIELD}.config_groups", groups, "a non-empty object of quantization groups")
    targets: list[str] = []
    for name, group in groups.items():
        targets += _check_group(source, f"{FIELD}.config_groups.{name}", group)
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise _error(source, f"{FIELD}.ignore", ignore, "a list of module names or 're:' patterns")
    for entry in [*targets, *ignore]:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise _error(source, FIELD, entry, f"valid 're:' patterns ({e})") from None
    return Fp8Config(tuple(targets), tuple(ignore))


def _check_group(source: str, where: str, group: Any) -> list[str]:
    if not isinstance(group, dict):
        raise _error(source, where, group, "an object with targets, weights and input_activations")
    targets = group.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise _error(source, f"{where}.targets", targets, "a non-empty list of module names, classes or 're:' patterns")
    if "format" in group:
        _check_format(source, f"{where}.format", group["format"], required=False)
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise _error(source, f"{where}.weights", weights, "an object (FP8 weights per channel)")
    _check_args(source, f"{where}.weights", weights, _WEIGHTS)
    inputs = group.get("input_activations")
    if inputs not in _EMPTY:
        if not isinstance(inputs, dict):
            raise _error(source, f"{where}.input_activations", inputs, "null or an object")
        _check_args(source, f"{where}.input_activations", inputs, _INPUTS)
    if group.get("output_activations") not in _EMPTY:
        raise _error(source, f"{where}.output_activations", group["output_activations"], "null")
    return targets


def _check_args(source: str, where: str, args: dict, want: dict) -> None:
    for key, value in want.items():
        got = args.get(key, value if key in ("symmetric",) else None)
        if got != value or (isinstance(value, int) and isinstance(got, bool) != isinstance(value, bool)):
            raise _error(source, f"{where}.{key}", got, repr(value))
    for key in ("group_size", "block_structure"):
        if args.get(key) not in _EMPTY:
            raise _error(source, f"{where}.{key}", args[key], "null (per-channel scales, not groups or blocks)")


def _check_format(source: str, where: str, value: Any, required: bool) -> None:
    if value in FORMATS or (value is None and not required):
        return
    raise _error(source, where, value, " or ".join(repr(f) for f in FORMATS))


def _error(source: str, field: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"{source}: {field} is {value!r}; supported: {want}")


def check_scale(reader, key: str, error: type) -> None:
    shape = reader.stored_shape(key)
    scale_key = key + "_scale"
    if len(shape) != 2:
        raise error(f"tensor '{key}' has shape {list(shape)}; FP8 weights are [out, in]")
    if scale_key not in reader.key_to_file:
        raise error(f"tensor '{scale_key}' is missing: the FP8 weight '{key}' needs its per-channel scale")
    scale_shape, scale_dtype = reader.stored_shape(scale_key), reader.stored_dtype(scale_key)
    if scale_shape != (shape[0], 1):
        raise error(
            f"tensor '{scale_key}' has shape {list(scale_shape)}, expected {[shape[0], 1]} (one scale per output "
            f"channel of '{key}' {list(shape)}; block-wise or per-tensor scales are not supported)"
        )
    if scale_dtype not in SCALE_DTYPES:
        raise error(f"tensor '{scale_key}' is {scale_dtype}; expected one of {', '.join(SCALE_DTYPES)}")
