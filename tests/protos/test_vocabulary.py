"""The request vocabulary comes from the proto, and every proto name has its counterpart in the engine: a sampling
field the engine's SamplingParams lacks, or a finish reason the engine cannot produce, fails here."""

from __future__ import annotations

import dataclasses

from protos.vocabulary import FINISH_REASON_NAMES, SAMPLING_FIELDS, SAMPLING_NAMES
from router.request.messages import FinishReason
from router.request.sampling_params import SamplingParams


def test_every_proto_sampling_field_is_a_field_of_the_engines_sampling_params():
    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    missing = [name for name in SAMPLING_NAMES if name not in engine_fields]
    assert not missing, f"inference.proto SamplingParams fields without a SamplingParams counterpart: {missing}"


def test_plain_sampling_fields_carry_their_kinds():
    kinds = {f.name: (f.kind, f.repeated) for f in SAMPLING_FIELDS}
    assert kinds["temperature"] == (float, False)
    assert kinds["top_k"] == (int, False)
    assert kinds["ignore_eos"] == (bool, False)
    assert kinds["stop"] == (str, True)
    assert kinds["stop_token_ids"] == (int, True)


def test_finish_reasons_match_the_engines_both_ways():
    wire = {name for name in FINISH_REASON_NAMES.values() if name != "unspecified"}
    assert wire == {reason.value for reason in FinishReason}
