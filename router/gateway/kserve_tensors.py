"""KServe v2 tensors and parameters <-> the engine's types, by the LLM convention Triton's backends, Dynamo and AIPerf
use. No I/O.

Inputs (by name; the shape's element count is checked, the datatype must be one listed):
  text_input  BYTES [1]         the prompt (UTF-8)
  input_ids   INT32|INT64 [n]   the prompt as token ids, instead of text_input
  image       BYTES [k]         images for the prompt's `<|image|>` placeholders, each an encoded file (PNG, JPEG,
                                WebP, GIF) or a data: URL; the gateway's image limits apply
  max_tokens  INT32|INT64 [1]   also a parameter
  stream      BOOL [1]          (or `streaming`) ModelStreamInfer only: false -> one response with the whole text
Parameters: the SamplingParams names (temperature, top_p, top_k, min_p, seed, max_tokens, min_tokens,
presence_penalty, frequency_penalty, repetition_penalty, ignore_eos, logprobs, top_logprobs; stop and
stop_token_ids as a string: one stop string, or a JSON list), plus `stream`/`streaming`, and `sampling_parameters`
(a JSON object of the same names, as Triton's vLLM backend takes it). Other parameters are ignored (Triton's own,
such as triton_enable_empty_final_response).
Outputs: text_output BYTES [1] (the text of this response) and output_ids INT64 [n] (its tokens); finish_reason,
prompt_tokens and completion_tokens as response parameters of the last response.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from protos.kserve.v2 import grpc_predict_v2_pb2 as kpb
from protos.vocabulary import SAMPLING_NAMES
from router.images.data_url import data_url_bytes
from router.request.errors import InvalidRequest
from router.request.messages import EngineRequest, Final, ImageInput
from router.request.sampling_params import SamplingParams, logit_bias_from

SAMPLING_FIELDS = frozenset(SAMPLING_NAMES)  # the wire contract's sampling parameters (protos/vocabulary.py)
OUTPUTS = {"text_output": "BYTES", "output_ids": "INT64"}
INPUTS = {  # name -> allowed datatypes
    "text_input": ("BYTES",),
    "input_ids": ("INT32", "INT64"),
    "image": ("BYTES",),
    "max_tokens": ("INT32", "INT64"),
    "stream": ("BOOL",),
    "streaming": ("BOOL",),
}
_NUMPY = {"INT32": "<i4", "INT64": "<i8", "BOOL": "?"}


@dataclass(frozen=True)
class KServeRequest:
    engine: EngineRequest
    stream: bool | None  # None: not said
    outputs: tuple[str, ...]  # which outputs the client asked for (all when it named none)


def engine_request(req: kpb.ModelInferRequest, request_id: str) -> KServeRequest:
    """The engine request for a ModelInferRequest; InvalidRequest naming `inputs[i]...` or `parameters.<name>`."""
    tensors = _inputs(req)
    given = _parameters(req.parameters)
    if "max_tokens" in tensors:
        given["max_tokens"] = _scalar(tensors["max_tokens"], "inputs.max_tokens")
    stream = given.pop("stream", None)
    for name in ("stream", "streaming"):
        if name in tensors:
            stream = bool(_scalar(tensors[name], f"inputs.{name}"))
    images = tuple(ImageInput(b, f"inputs.image[{k}]") for k, b in enumerate(_images(tensors.get("image", []))))
    params = SamplingParams(**given)
    if "text_input" in tensors and "input_ids" in tensors:
        raise InvalidRequest("inputs", "give text_input or input_ids, not both")
    if "text_input" in tensors:
        text = _scalar(tensors["text_input"], "inputs.text_input")
        engine = EngineRequest(request_id, params, prompt=_utf8(text, "inputs.text_input"), images=images)
    elif "input_ids" in tensors:
        ids = tuple(int(i) for i in tensors["input_ids"])
        engine = EngineRequest(request_id, params, prompt_ids=ids, images=images)
    else:
        raise InvalidRequest("inputs", "expected a text_input tensor (BYTES, shape [1]) or input_ids (INT32/INT64)")
    return KServeRequest(engine, stream, _outputs(req))


def field_name(field: str) -> str:
    """An engine field as a KServe client wrote it: a sampling setting is a request parameter."""
    if field in SAMPLING_FIELDS:
        return f"parameters.{field}"
    return {"prompt": "inputs.text_input", "input_ids": "inputs.input_ids"}.get(field, field)


def response(
    model: str, rid: str, text: str, token_ids, outputs: tuple[str, ...], final: Final | None = None, last=False
) -> kpb.ModelInferResponse:
    """One response: `text` and `token_ids` as the requested outputs; `final` adds finish_reason and the token
    counts; `last` (ModelStreamInfer) adds triton_final_response."""
    out = kpb.ModelInferResponse(model_name=model, model_version="1", id=rid)
    for name in outputs:
        if name == "text_output":
            data = text.encode()
            raw, shape = struct.pack("<I", len(data)) + data, [1]
        else:
            raw, shape = np.asarray(token_ids, dtype="<i8").tobytes(), [len(token_ids)]
        out.outputs.add(name=name, datatype=OUTPUTS[name], shape=shape)
        out.raw_output_contents.append(raw)
    if final is not None:
        out.parameters["finish_reason"].string_param = final.finish_reason.value
        out.parameters["prompt_tokens"].int64_param = final.prompt_tokens
        out.parameters["completion_tokens"].int64_param = final.completion_tokens
    if last:
        out.parameters["triton_final_response"].bool_param = True
    return out


def _inputs(req: kpb.ModelInferRequest) -> dict[str, list]:
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidRequest(
            "raw_input_contents", f"holds {len(req.raw_input_contents)} tensors for {len(req.inputs)} inputs"
        )
    out = {}
    for i, t in enumerate(req.inputs):
        field = f"inputs[{i}]"
        if t.name not in INPUTS:
            raise InvalidRequest(f"{field}.name", f"must be one of {', '.join(INPUTS)}, got {t.name!r}")
        if t.datatype not in INPUTS[t.name]:
            allowed = " or ".join(INPUTS[t.name])
            raise InvalidRequest(f"{field}.datatype", f"{t.name} must be {allowed}, got {t.datatype!r}")
        raw = req.raw_input_contents[i] if req.raw_input_contents else None
        values = _values(t, raw, field)
        count = int(np.prod(t.shape)) if len(t.shape) else 1
        if count != len(values):
            raise InvalidRequest(
                f"{field}.shape", f"{list(t.shape)} holds {count} elements; the data has {len(values)}"
            )
        out[t.name] = values
    return out


def _values(t, raw: bytes | None, field: str) -> list:
    if raw is None:
        c = t.contents
        if t.datatype == "BYTES":
            return list(c.bytes_contents)
        if t.datatype == "BOOL":
            return list(c.bool_contents)
        return list(c.int64_contents if t.datatype == "INT64" else c.int_contents)
    if t.datatype != "BYTES":
        width = np.dtype(_NUMPY[t.datatype]).itemsize
        if len(raw) % width:
            raise InvalidRequest(field, f"{t.datatype} data must be a multiple of {width} bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype=_NUMPY[t.datatype]).tolist()
    values, at = [], 0
    while at < len(raw):  # each element: a 4-byte little-endian length, then its bytes
        if at + 4 > len(raw):
            raise InvalidRequest(field, "BYTES data is truncated (each element is a 4-byte length, then its bytes)")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise InvalidRequest(field, f"BYTES element of {n} bytes runs past the data's end")
        values.append(raw[at + 4 : at + 4 + n])
        at += 4 + n
    return values


def _scalar(values: list, field: str):
    if len(values) != 1:
        raise InvalidRequest(field, f"must hold exactly one element (shape [1]), got {len(values)}")
    return values[0]


def _utf8(data: bytes, field: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise InvalidRequest(field, f"is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _images(values: list) -> list[bytes]:
    return [data_url_bytes(v.decode(errors="replace"), f"inputs.image[{k}]") if v[:5] == b"data:" else v
            for k, v in enumerate(values)]  # fmt: skip


def _parameters(params) -> dict:
    """The sampling settings among the request's parameters (`sampling_parameters`: a JSON object of them)."""
    given = {}
    if "sampling_parameters" in params:
        text = _param(params["sampling_parameters"])
        try:
            given.update(json.loads(text) if isinstance(text, str) else None)
        except (TypeError, ValueError):
            raise InvalidRequest("parameters.sampling_parameters", "must be a JSON object as a string") from None
    for name, value in params.items():
        if name in SAMPLING_FIELDS or name in ("stream", "streaming"):
            given["stream" if name == "streaming" else name] = _param(value)
    for name in ("stop", "stop_token_ids"):
        if name in given:
            given[name] = _listed(given[name], f"parameters.{name}")
    if "logit_bias" in given:  # a JSON object in a string parameter (or an object in sampling_parameters)
        given["logit_bias"] = logit_bias_from(given["logit_bias"], "parameters.logit_bias")
    return given


def _param(p: kpb.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _listed(value, field: str) -> tuple:
    """A stop setting: one string, or a JSON list in a string (or a list, from sampling_parameters)."""
    if isinstance(value, str) and value.startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest(field, "starts with '[' but is not a JSON list") from None
    if isinstance(value, (str, int)):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    raise InvalidRequest(field, f"must be a string or a JSON list, got {value!r}")


def _outputs(req: kpb.ModelInferRequest) -> tuple[str, ...]:
    names = tuple(o.name for o in req.outputs)
    for i, name in enumerate(names):
        if name not in OUTPUTS:
            raise InvalidRequest(f"outputs[{i}].name", f"must be one of {', '.join(OUTPUTS)}, got {name!r}")
    return names or tuple(OUTPUTS)
