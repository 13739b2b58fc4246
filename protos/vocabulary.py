"""The request vocabulary, read from the wire contract itself (inference.proto's descriptors): the sampling
parameters' names and kinds and the finish reasons' names. The gateway's conversion, the client libraries and the
command line all take their lists from here, so a new sampling parameter is added in the proto, the engine's
`SamplingParams` and the sampler, and nowhere else (tests/protos/test_vocabulary.py checks that every proto field has
its counterpart). No grpc or engine imports: any process can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor

from protos.moecluster.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class SamplingField:
    name: str
    kind: type  # the Python type of one value: int, float, bool or str
    repeated: bool  # a list of values (stop strings, stop token ids)


_KINDS = {
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_UINT32: int,
    FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_STRING: str,
}


def _sampling_fields() -> tuple[SamplingField, ...]:
    """The SamplingParams fields of plain values, in proto order (message-typed fields, such as a constraint, are
    converted by name where they are used)."""
    return tuple(
        SamplingField(f.name, _KINDS[f.type], f.is_repeated)
        for f in pb.SamplingParams.DESCRIPTOR.fields
        if f.type in _KINDS
    )


SAMPLING_FIELDS: tuple[SamplingField, ...] = _sampling_fields()
SAMPLING_NAMES: tuple[str, ...] = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)  # every field
FINISH_PREFIX = "FINISH_REASON_"
# wire enum number -> the engine's name ("length", "stop", ...), FINISH_REASON_UNSPECIFIED included
FINISH_REASON_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix(FINISH_PREFIX).lower() for v in pb.FinishReason.DESCRIPTOR.values
}
