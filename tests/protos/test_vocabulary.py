"""The request vocabulary comes from the proto, and every proto name has its counterpart in the engine: a sampling
field the engine's SamplingParams lacks, or a finish reason the engine cannot produce, fails here."""

from __future__ import annotations

import dataclasses

from protos.vocabulary import CONSTRAINT_NAMES, FINISH_REASON_NAMES, SAMPLING_FIELDS, SAMPLING_NAMES
from router.request.constraint import KINDS as CONSTRAINT_KINDS
from router.request.messages import FinishReason
from router.request.sampling_params import SamplingParams


def test_every_proto_sampling_field_is_a_field_of_the_engines_sampling_params():
    engine_fields = {f.name for f in dataclasses.fields(SamplingParams)}
    missing = [name for name in SAMPLING_NAMES if name not in engine_fields and name not in CONSTRAINT_NAMES]
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


def test_every_constraint_of_the_proto_is_a_kind_of_the_engines_constraint():
    assert "constraint" in {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(CONSTRAINT_NAMES) <= set(CONSTRAINT_KINDS), set(CONSTRAINT_NAMES) - set(CONSTRAINT_KINDS)
    assert not {f.name for f in SAMPLING_FIELDS} & set(CONSTRAINT_NAMES)


def test_logit_bias_reaches_the_wire_from_the_client_and_the_engine_from_the_wire():
    from protos.client_types import build_request
    from router.gateway.convert import sampling_params

    pairs = build_request("x", logit_bias=((7, 100.0), (2, -100.0))).sampling  # as SamplingParams holds them
    mapping = build_request("x", logit_bias={7: 100.0, 2: -100.0}).sampling
    assert dict(pairs.logit_bias) == dict(mapping.logit_bias) == {7: 100.0, 2: -100.0}
    assert sampling_params(pairs).logit_bias == ((2, -100.0), (7, 100.0))
