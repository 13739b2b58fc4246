"""SamplingParams' logit_bias: parsed from the shapes clients send (OpenAI's {"id": bias} with string keys, KServe's
JSON text) and refused naming the field when it is not a map of token ids in the vocabulary to biases in
[-100, 100]."""

from __future__ import annotations

import pytest

from router.request.errors import InvalidRequest
from router.request.sampling_params import SamplingParams, logit_bias_from


def test_logit_bias_is_read_from_json_objects_and_text_sorted_by_token():
    assert logit_bias_from({"17": -100, "3": 2.5}) == ((3, 2.5), (17, -100.0))
    assert logit_bias_from('{"5": 100}') == ((5, 100.0),)
    assert logit_bias_from({4: 1}) == ((4, 1.0),)
    assert logit_bias_from({}) == ()


@pytest.mark.parametrize(
    "value, words",
    [
        ('{"5": ', "JSON object"),
        ([5, 100], "object of token ids"),
        ({"five": 1}, "keys must be token ids"),
        ({"5": "high"}, "biases must be numbers"),
        ({"5": float("nan")}, "biases must be numbers"),
    ],
)
def test_a_logit_bias_that_is_not_a_map_of_ids_to_numbers_names_the_field(value, words):
    with pytest.raises(InvalidRequest) as e:
        logit_bias_from(value, "parameters.logit_bias")
    assert e.value.field == "parameters.logit_bias" and words in e.value.problem


@pytest.mark.parametrize(
    "bias, words",
    [
        (((5, 101.0),), "[-100, 100]"),
        (((50, 1.0),), "outside the vocabulary [0, 50)"),
        (((-1, 1.0),), "outside the vocabulary"),
        (((5, 1.0), (5, 2.0)), "given twice"),
    ],
)
def test_validate_refuses_biases_out_of_range_and_ids_outside_the_vocabulary(bias, words):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(temperature=0.0, logit_bias=bias).with_defaults({}).validate(vocab_size=50)
    assert e.value.field == "logit_bias" and words in e.value.problem
    ok = SamplingParams(temperature=0.0, logit_bias=((5, -100.0), (49, 100.0))).with_defaults({})
    assert ok.validate(vocab_size=50) is ok
