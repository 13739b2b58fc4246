"""A request resumed on another engine (after its router died) from its prompt plus the tokens already streamed
continues exactly as the undisturbed run: the same tokens (seeded sampling included), the same text, and a stop
string that spans the failover point still matches."""

from __future__ import annotations

import pytest

from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.request.errors import InvalidRequest
from router.request.messages import Delta, EngineRequest, Final, Resume
from router.request.sampling_params import SamplingParams

PROMPT = (1, 40, 41, 42, 7)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("tiny"), "scout", train_steps=0)
    return Engine.from_checkpoint(str(path), config=EngineConfig(max_num_seqs=4))


def run(engine: Engine, request: EngineRequest) -> tuple[list[int], list[str], Final]:
    """Per token its id and the text delivered with it; and the final message."""
    engine.add(request)
    tokens, texts, final = [], [], None
    while final is None:
        for item in engine.step():
            if isinstance(item, Delta):
                tokens += item.token_ids
                texts.append(item.text)
            else:
                final = item
    return tokens, texts, final


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 40, "ignore_eos": True, **kw})


@pytest.mark.parametrize("cut", [1, 13, 39])
def test_a_resumed_request_continues_with_the_undisturbed_tokens_and_text(engine, cut):
    tokens, texts, _ = run(engine, EngineRequest("whole", params(), prompt_ids=PROMPT))
    resume = Resume(tuple(tokens[:cut]), len("".join(texts[:cut])))
    rest, rest_texts, resumed = run(engine, EngineRequest("rest", params(), prompt_ids=PROMPT, resume=resume))
    assert tokens[:cut] + rest == tokens
    assert "".join(texts[:cut] + rest_texts) == "".join(texts)
    assert (resumed.finish_reason, resumed.completion_tokens, resumed.prompt_tokens) == ("length", 40, len(PROMPT))


def test_a_stop_string_spanning_the_failover_point_still_matches(engine):
    tokens, _, _ = run(engine, EngineRequest("probe", params(), prompt_ids=PROMPT))
    decoded = [engine.tokenizer.decode(tokens[: i + 1]) for i in range(len(tokens))]

    def spanning(i: int) -> str:  # the last character of token i's text and the first of token i + 1's
        return decoded[i + 1][len(decoded[i]) - 1 : len(decoded[i]) + 1]

    # a stop string spanning tokens cut and cut + 1 (from token 19 on), found nowhere earlier, of whole characters
    # (U+FFFD stands for the bytes of a character that a later token completes)
    cut = next(
        i
        for i in range(19, 35)
        if len(decoded[i]) > len(decoded[i - 1]) and len(decoded[i + 1]) > len(decoded[i])
        if spanning(i) not in decoded[i][:-1] and "\ufffd" not in spanning(i)
    )
    stop = spanning(cut)
    stopped, texts, final = run(engine, EngineRequest("stopped", params(stop=(stop,)), prompt_ids=PROMPT))
    assert final.finish_reason == "stop" and final.matched_stop == stop and len(stopped) == cut + 2
    resume = Resume(tuple(stopped[: cut + 1]), len("".join(texts[: cut + 1])))  # fails over inside the stop string
    rest, rest_texts, resumed = run(
        engine, EngineRequest("resumed", params(stop=(stop,)), prompt_ids=PROMPT, resume=resume)
    )
    assert stopped[: cut + 1] + rest == stopped
    assert "".join(texts[: cut + 1] + rest_texts) == "".join(texts)
    assert (resumed.finish_reason, resumed.matched_stop) == ("stop", stop)


def test_a_resume_with_nothing_left_to_generate_is_refused_naming_the_field(engine):
    with pytest.raises(InvalidRequest, match=r"resume\.output_ids: 40 tokens already streamed"):
        engine.add(EngineRequest("full", params(), prompt_ids=PROMPT, resume=Resume(tuple([5] * 40), 0)))
