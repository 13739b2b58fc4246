"""Incremental detokenization emits only whole UTF-8 characters; stop strings split across tokens are found
and never leak into the streamed text; the chat format is Llama 4's."""

from __future__ import annotations

import pytest

from deploy.tiny.tokenizer import build_tokenizer
from router.request.chat import render_chat
from router.request.detokenizer import TextStream
from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage
from router.request.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(build_tokenizer())


def stream_all(tok: Tokenizer, text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, tuple(stop))
    pieces = [stream.push(t) for t in tok.encode(text, add_special_tokens=False)]
    if stream.matched is None:
        pieces.append(stream.flush())
    return pieces, stream


def test_multibyte_characters_are_never_split(tok):
    text = "héllo wörld 日本語 🎉🎉 naïve"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the byte-level vocabulary splits these characters across tokens
    pieces, _ = stream_all(tok, text)
    assert "".join(pieces) == text
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # valid UTF-8 on its own


def test_stop_string_split_across_tokens_is_found_and_cut(tok):
    text = "count to ten: one two three four five"
    ids = tok.encode(text, add_special_tokens=False)
    stop = "ee fo"  # ends one word and starts the next: spans a token boundary
    assert all(stop not in tok.decode([i]) for i in ids)
    pieces, stream = stream_all(tok, text, stop=[stop])
    assert stream.matched == stop
    assert "".join(pieces) == "count to ten: one two thr"
    assert not any("ee" in p and "fo" in p for p in pieces)


def test_no_streamed_piece_shows_the_start_of_a_stop_string(tok):
    pieces, stream = stream_all(tok, "alpha beta gamma delta", stop=["gamma delta"])
    assert stream.matched == "gamma delta"
    assert "".join(pieces) == "alpha beta "


def test_unmatched_stop_string_releases_the_held_back_tail_at_the_end(tok):
    pieces, stream = stream_all(tok, "alpha beta gam", stop=["gamma"])
    assert stream.matched is None and "".join(pieces) == "alpha beta gam"


def test_earliest_of_several_stop_strings_wins(tok):
    pieces, stream = stream_all(tok, "one two three four", stop=["four", "two"])
    assert stream.matched == "two" and "".join(pieces) == "one "


def test_chat_format_is_llama4s():
    text = render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "count from 7")])
    assert text == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\ncount from 7<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )


def test_chat_without_system_has_no_system_block():
    assert render_chat([ChatMessage("user", "hi")]).startswith("<|begin_of_text|><|header_start|>user")


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ([ChatMessage("robot", "hi")], "messages[0].role"),
        ([ChatMessage("user", "hi"), ChatMessage("system", "late")], "messages[1].role"),
    ],
)
def test_bad_chat_messages_name_the_field(messages, field):
    with pytest.raises(InvalidRequest) as err:
        render_chat(messages)
    assert err.value.field == field


def test_chat_tokens_start_with_one_bos(tok):
    ids = tok.encode(render_chat([ChatMessage("user", "hi")]), add_special_tokens=False)
    bos = tok.token_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
