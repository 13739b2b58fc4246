"""Reads tensors from a Hugging Face safetensors checkpoint: one file or sharded with
`model.safetensors.index.json`, keys with or without the multimodal `language_model.` prefix.

Names are the model's parameter names. In a multimodal checkpoint the text model's names gain `language_model.`;
the vision tower's and projector's (`vision_model.*`, `multi_modal_projector.*`) are stored as they are.

Only the tensors asked for are read, and a subset of experts can be read from a fused expert tensor without
touching the other experts' bytes (safetensors slices are read from the memory-mapped file), so an expert
worker holds only its own experts. `bytes_read` counts what was actually materialised.

FP8 checkpoints (compressed-tensors, cluster/quant_config.py): the reader parses config.json's
`quantization_config` and checks every stored weight against it when it is opened, from the headers alone, so a
checkpoint it would read wrongly fails before any weight is read (`fp8` holds the parsed config, None when there
is none); `read_fp8` reads one quantized module's weight and scale.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from cluster.config import ConfigError
from cluster.quant_config import FIELD, Fp8Config, check_scale, parse_quantization

INDEX_FILE = "model.safetensors.index.json"
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MULTIMODAL_PREFIX = "language_model."
UNPREFIXED = ("vision_model.", "multi_modal_projector.")  # stored beside `language_model.`, never under it


class CheckpointError(ValueError):
    """A checkpoint that lacks a tensor or has one of the wrong shape; the message names the key."""


class CheckpointReader:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.key_to_file = _index(self.dir)
        self.prefix = MULTIMODAL_PREFIX if any(k.startswith(MULTIMODAL_PREFIX) for k in self.key_to_file) else ""
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.tensors_read = 0
        self.fp8: Fp8Config | None = _quantization(self.dir)
        check_stored(self.fp8, self)

    def stored_dtype(self, key: str) -> str:
        """The safetensors dtype (e.g. "BF16", "F8_E4M3") of the stored key `key` (header only)."""
        return self._handle_of(key).get_slice(key).get_dtype()

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle_of(key).get_slice(key).get_shape())

    def is_fp8(self, module: str) -> bool:
        """Whether module `module` (e.g. `model.layers.1.feed_forward.experts.3.up_proj`) is stored in FP8."""
        return self.fp8 is not None and self.fp8.quantizes(module, self.prefix)

    def read_fp8(self, module: str, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [out, in] float8_e4m3fn, scale [out] fp32) of FP8 module `module`, its weight checked against
        `shape` ([out, in], from config.json)."""
        q = self.read(f"{module}.weight", shape=shape)
        scale = self.read(f"{module}.weight_scale", shape=(shape[0], 1))
        return q, scale.reshape(-1).float()

    def key(self, name: str) -> str:
        """The stored key of `name`."""
        return name if name.startswith(UNPREFIXED) else self.prefix + name

    def __contains__(self, name: str) -> bool:
        return self.key(name) in self.key_to_file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def nbytes(self, name: str, rows: Sequence[int] | None = None) -> int:
        """Bytes `read` (or `read_rows` with these rows) will take from the file, before reading them."""
        sl = self._slice(name)
        shape = sl.get_shape()
        n = 1
        for dim in shape[1:]:
            n *= dim
        return n * (len(rows) if rows is not None else (shape[0] if shape else 1)) * _DTYPE_BYTES[sl.get_dtype()]

    def read(self, name: str, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor `name` (a parameter name, without `language_model.`), checked against `shape`."""
        if shape is not None:
            self._check_shape(name, tuple(shape))
        tensor = self._handle(name).get_tensor(self.key(name))
        return self._account(tensor, dtype)

    def read_rows(
        self, name: str, rows: Sequence[int], shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows `rows` of the first dimension (e.g. experts of a fused [E, ...] tensor), in the order given.

        Contiguous runs are read as one slice each; the other rows' bytes are never read."""
        if shape is not None:
            self._check_shape(name, tuple(shape))
        sl = self._slice(name)
        n = sl.get_shape()[0]
        bad = [r for r in rows if not 0 <= r < n]
        if bad:
            raise CheckpointError(f"{name}: rows {bad} out of range for first dimension {n}")
        parts = [sl[a:b] for a, b in _runs(list(rows))]
        tensor = torch.cat(parts) if len(parts) != 1 else parts[0]
        return self._account(tensor, dtype)

    def _account(self, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        self.bytes_read += tensor.nbytes
        self.tensors_read += 1
        return tensor if dtype is None else tensor.to(dtype)

    def _check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        found = self.shape(name)
        if found != expected:
            raise CheckpointError(
                f"tensor '{self.key(name)}' has shape {list(found)}, expected {list(expected)} from config.json"
            )

    def _slice(self, name: str):
        return self._handle(name).get_slice(self.key(name))

    def _handle(self, name: str):
        return self._handle_of(self.key(name))

    def _handle_of(self, key: str):
        file = self.key_to_file.get(key)
        if file is None:
            raise CheckpointError(f"tensor '{key}' is missing from the checkpoint in {self.dir}")
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.dir / file), framework="pt", device="cpu")
        return self._handles[file]


def _quantization(model_dir: Path) -> Fp8Config | None:
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return parse_quantization(raw, str(path)) if isinstance(raw, dict) else None


def _index(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: names shard files that do not exist: {missing}")
        return dict(weight_map)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no model.safetensors, *.safetensors or {INDEX_FILE}")
    key_to_file = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            key_to_file.update({k: f.name for k in h.keys()})
    return key_to_file


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """[3,4,5,9] -> [(3,6), (9,10)]: half-open runs of consecutive rows, order kept."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def check_stored(fp8: Fp8Config | None, reader) -> None:
    """Header-only: every stored weight agrees with `fp8` (a CheckpointReader's view), so that no actor starts
    loading a checkpoint it would read wrongly. Raises CheckpointError naming the tensor."""
    for key in reader.key_to_file:
        dtype = reader.stored_dtype(key)
        if dtype == "F8_E5M2":
            raise CheckpointError(f"tensor '{key}' is F8_E5M2; supported FP8 weights are F8_E4M3")
        text = key.startswith(reader.prefix) and not key.startswith(UNPREFIXED)
        if not key.endswith(".weight") or not text:
            if dtype == "F8_E4M3":
                raise CheckpointError(
                    f"tensor '{key}' is F8_E4M3; moecluster reads FP8 only for the text model's Linear weights "
                    f"(`*.weight` with a `*.weight_scale`); list its module in {FIELD}.ignore and store it unquantized"
                )
            continue
        module = key[len(reader.prefix) : -len(".weight")]
        wanted = fp8 is not None and fp8.quantizes(module, reader.prefix)
        if wanted and dtype != "F8_E4M3":
            raise CheckpointError(
                f"tensor '{key}' is {dtype}, but {FIELD} quantizes module '{module}' (a config group's targets match "
                f"it and no ignore entry does): expected F8_E4M3 with a weight_scale, or the module in {FIELD}.ignore"
            )
        if not wanted and dtype == "F8_E4M3":
            why = f"{FIELD} does not quantize module '{module}'" if fp8 else f"config.json has no {FIELD}"
            raise CheckpointError(f"tensor '{key}' is F8_E4M3, but {why}: its scales would be ignored")
        if wanted:
            check_scale(reader, key, CheckpointError)
