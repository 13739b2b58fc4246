"""Structured output on the tiny model at temperature 1.0: every JSON-schema output validates (hand-written and random
schemas), regex outputs match in full, choices are among the choices, constrained and free requests share batches
(the free ones get their tokens of a batch without constraints); compiling never holds the step, a grammar that fails
or times out ends only its request naming the field; a resumed request's matcher is rebuilt from its tokens."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading

import jsonschema
import pytest

from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.request.constraint import Constraint
from router.request.errors import InvalidRequest
from router.request.messages import ChatMessage, Delta, EngineRequest, Final, Resume
from router.request.sampling_params import SamplingParams
from router.request.tools import Tool

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 70}}, "required": ["a"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -2.5, "maximum": 10}}, "required": ["x"]},
    {"type": "object", "properties": {"s": {"type": "string", "maxLength": 6}, "e": {"enum": ["red", "green", 3]}},
     "required": ["s", "e"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"n": {"type": "object", "properties": {
        "k": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}},
        "required": ["k"]}}, "required": ["n"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}}, "required": ["ok", "none"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}}, "required": ["id"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 2, "maxItems": 2}}, "required": ["tags"]},
    {"type": "object", "properties": {"p": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5}},
     "required": ["p"]},
    {"type": "object", "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 5},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"enum": ["north", "south", "east", "west"]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                      {"type": "boolean"}]}}, "required": ["v"]},
    {"type": "object", "properties": {"pt": {"type": "array", "prefixItems": [
        {"type": "integer", "minimum": -5, "maximum": 5}, {"type": "integer", "minimum": -5, "maximum": 5}],
        "items": False}}, "required": ["pt"]},
    {"type": "object", "properties": {"c": {"const": "fixed"}}, "required": ["c"]},
    {"type": "object", "properties": {"m": {"type": "object", "properties": {"q": {"type": "integer", "minimum": 1,
     "maximum": 3}}, "required": ["q"], "additionalProperties": False}}, "required": ["m"],
     "additionalProperties": False},
    {"type": "integer", "minimum": 100, "maximum": 999},
]  # fmt: skip


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A bounded schema (so a random model's output ends): objects, arrays, enums, bounded numbers and strings."""
    kinds = ["integer", "number", "string", "boolean", "enum"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": rng.choice([-1, 0, 2]), "maximum": rng.choice([3, 10])}
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 6)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["x", "y", "zz", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    names = rng.sample(["a", "b", "c", "d", "e"], rng.randint(1, 3))
    props = {n: random_schema(rng, depth + 1) for n in names}
    return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(1, len(names)))}


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    cfg = EngineConfig(max_num_seqs=48, max_num_batched_tokens=2048, kv_cache_memory=64 << 20)
    return Engine.from_checkpoint(tiny_model_dir, config=cfg)


CALLS: dict[str, list] = {}  # request id -> the tool calls its deltas carried (ids are unique per test)


def run(engine: Engine, requests: list[EngineRequest], on_step=None) -> tuple[dict[str, str], dict[str, Final], dict]:
    texts, finals, tokens = {}, {}, {}
    for r in requests:
        engine.add(r)
    steps = 0
    while engine.has_work():
        for item in engine.step():
            if isinstance(item, Delta):
                texts[item.request_id] = texts.get(item.request_id, "") + item.text
                tokens.setdefault(item.request_id, []).extend(item.token_ids)
                CALLS.setdefault(item.request_id, []).extend(item.tool_calls)
            else:
                finals[item.request_id] = item
        steps += 1
        if on_step:
            on_step(steps, finals)
        assert steps < 2000, "the engine does not finish"
    return texts, finals, tokens


def constrained(i: int, constraint: Constraint, max_tokens: int = 160) -> EngineRequest:
    params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, constraint=constraint)
    return EngineRequest(f"c{i}", params, prompt="Answer in JSON: ")


def free(i: int) -> EngineRequest:
    params = SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=12, ignore_eos=True)
    return EngineRequest(f"f{i}", params, prompt=f"Count {i}:")


def test_json_schema_outputs_validate_in_a_batch_with_free_requests(engine):
    rng = random.Random(19)
    schemas = SCHEMAS + [random_schema(rng) for _ in range(20)]
    reqs = [constrained(i, Constraint("json_schema", json.dumps(s))) for i, s in enumerate(schemas)]
    texts, finals, tokens = run(engine, reqs + [free(i) for i in range(4)])
    for i, schema in enumerate(schemas):
        assert finals[f"c{i}"].finish_reason == "stop", (schema, texts.get(f"c{i}"))
        jsonschema.validate(json.loads(texts[f"c{i}"]), schema)
    _, _, alone = run(engine, [free(i) for i in range(4)])
    assert all(tokens[f"f{i}"] == alone[f"f{i}"] for i in range(4))  # constraints touch only their rows


def test_regex_choice_json_object_and_grammar_outputs_conform(engine):
    regexes = [r"[a-z]{3}-\d{2}", r"(yes|no)!", r"\d{1,3}(\.\d\d)?", r"[A-Z][a-z]{0,4} [0-9]"]
    choices = ("alpha", "beta", "gamma delta")
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [0-9] | "x"'
    reqs = [constrained(i, Constraint("regex", r)) for i, r in enumerate(regexes)]
    reqs += [constrained(10 + s, Constraint("choice", choices=choices)) for s in range(6)]
    reqs += [constrained(20 + s, Constraint("json_object")) for s in range(3)]
    reqs += [constrained(30 + s, Constraint("grammar", grammar), max_tokens=40) for s in range(3)]
    texts, finals, _ = run(engine, [*reqs, free(0)])
    for i, r in enumerate(regexes):
        assert re.fullmatch(r, texts[f"c{i}"]), (r, texts[f"c{i}"])
    assert all(texts[f"c{10 + s}"] in choices for s in range(6))
    for s in range(3):  # any JSON object: a random model may not close it within max_tokens
        text, reason = texts[f"c{20 + s}"], finals[f"c{20 + s}"].finish_reason
        assert isinstance(json.loads(text), dict) if reason == "stop" else (reason == "length" and text[0] == "{")
    for s in range(3):
        text = texts[f"c{30 + s}"]
        assert finals[f"c{30 + s}"].finish_reason == "length" or re.fullmatch(r"\(([0-9x])(,[0-9x])*\)", text), text


@pytest.mark.parametrize(
    "constraint, field, words",
    [
        (Constraint("json_schema", "{not json"), "json_schema", "not valid JSON"),
        (Constraint("json_schema", '{"type": "nonsense"}'), "json_schema", "nonsense"),
        (Constraint("regex", "(unclosed"), "regex", "parenthesis"),
        (Constraint("grammar", "root ::= missing"), "grammar", "missing"),
        (Constraint("choice", choices=()), "choice", "at least one"),
    ],
)
def test_a_constraint_that_does_not_compile_is_refused_naming_its_field(engine, constraint, field, words):
    with pytest.raises(InvalidRequest) as e:
        engine.add(constrained(0, constraint))
    assert e.value.field == field and words in str(e.value)
    with pytest.raises(InvalidRequest, match="min_tokens"):
        engine.add(EngineRequest("m", SamplingParams(min_tokens=2, constraint=Constraint("json_object")), prompt="a"))


def test_the_step_never_waits_for_a_compile_and_a_slow_one_ends_its_request_alone(engine):
    gate = threading.Event()
    pool = engine.constrained.grammars._pool
    blockers = [pool.submit(gate.wait, 30) for _ in range(pool._max_workers)]  # every compile thread busy
    saved, engine.constrained.timeout_s = engine.constrained.timeout_s, 0.5
    progress = []
    try:
        schema = {"type": "object", "properties": {"slow": {"type": "integer"}}, "required": ["slow"]}
        req = constrained(7, Constraint("json_schema", json.dumps(schema)))
        texts, finals, _ = run(engine, [req, free(0), free(1)], on_step=lambda n, f: progress.append(set(f)))
    finally:
        gate.set()
        engine.constrained.timeout_s = saved
    assert [f.result() for f in blockers] == [True] * len(blockers)
    final = finals["c7"]
    assert final.finish_reason == "error" and final.error_kind == "request" and final.error_field == "json_schema"
    assert "longer than 0.5s" in final.error
    assert finals["f0"].finish_reason == "length" and len(texts["f0"]) > 0
    assert {"f0", "f1"} <= progress[-1]


def test_a_resumed_constrained_request_continues_exactly(engine):
    schema = {"type": "object", "properties": {"w": {"type": "array", "items": {"type": "integer", "minimum": 0,
              "maximum": 99}, "minItems": 3, "maxItems": 5}}, "required": ["w"]}  # fmt: skip
    req = constrained(3, Constraint("json_schema", json.dumps(schema)))
    texts, _, tokens = run(engine, [req])
    whole = tokens["c3"]
    k = len(whole) // 2
    resumed = EngineRequest("c3", req.params, prompt=req.prompt, resume=Resume(tuple(whole[:k]), 0))
    _, finals, rest = run(engine, [resumed])
    assert rest["c3"] == whole[k:] and finals["c3"].finish_reason == "stop"
    jsonschema.validate(json.loads(texts["c3"]), schema)
    off = EngineRequest("c4", req.params, prompt=req.prompt, resume=Resume((whole[1], whole[0]), 0))
    _, finals, _ = run(engine, [off])
    assert finals["c4"].finish_reason == "error" and finals["c4"].error_field == "resume.output_ids"


ALARM = {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
         "label": {"type": "string", "maxLength": 8}, "days": {"type": "array", "items": {"enum": ["mon", "tue"]},
         "maxItems": 2}}, "required": ["hour", "days"]}  # fmt: skip
NOTE = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 6}}, "required": ["text"]}


def tool_request(rid: str, seed: int, choice: str) -> EngineRequest:
    tools = (Tool("set_alarm", "Set an alarm", json.dumps(ALARM)), Tool("note", "Write a note", json.dumps(NOTE)))
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=120)
    chat = (ChatMessage("user", "Wake me at seven on Mondays."),)
    return EngineRequest(rid, params, messages=chat, tools=tools, tool_choice=choice)


def test_named_and_required_tool_choices_give_calls_whose_arguments_validate(engine):
    reqs = [tool_request(f"named{s}", s, "set_alarm") for s in range(3)]
    reqs += [tool_request(f"req{s}", s, "required") for s in range(3)]
    reqs += [tool_request(f"auto{s}", s, "auto") for s in range(2)]
    texts, finals, tokens = run(engine, reqs)
    for rid in [r.request_id for r in reqs[:6]]:
        assert finals[rid].finish_reason == "tool_calls" and texts.get(rid, "") == "", (rid, texts.get(rid))
        (call,) = CALLS[rid]
        assert call.id == f"{rid}-call-0" and (call.name == "set_alarm" or rid.startswith("req"))
        jsonschema.validate(json.loads(call.arguments), ALARM if call.name == "set_alarm" else NOTE)
    for s in range(2):  # auto on a random model: text, none of it lost
        rid = f"auto{s}"
        assert texts[rid] == engine.tokenizer.decode(tokens[rid]) and not CALLS.get(rid)


def test_a_resumed_tool_call_stream_gives_the_same_whole_call(engine):
    req = tool_request("resumed", 4, "set_alarm")
    _, _, tokens = run(engine, [req])
    whole, first = tokens["resumed"], CALLS.pop("resumed")
    k = len(whole) // 2  # the old router held the call's text back: the client has none of it
    _, finals, rest = run(engine, [dataclasses.replace(req, resume=Resume(tuple(whole[:k]), 0))])
    assert rest["resumed"] == whole[k:] and finals["resumed"].finish_reason == "tool_calls"
    assert CALLS["resumed"] == first


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 8}])
def test_json_strings_take_no_utf16_surrogate_and_no_control_character(engine, schema):
    """xgrammar's own string rule admits ED A0-BF xx (a surrogate as 3-byte UTF-8, which no decoder takes) and,
    with a length bound, control characters: ours refuse both, byte by byte, and still take real characters."""
    from router.engine.grammar import Grammars, Matcher

    tok = engine.tokenizer
    grammars = Grammars(tok, engine.runner.model.config.vocab_size, engine.eos_ids)
    compiled = grammars.submit(Constraint("json_schema", json.dumps(schema))).result(timeout=60)

    def accepts(prefix: bytes) -> bool:
        m = Matcher(compiled, engine.eos_ids)
        ids = [tok.token_id(_byte_level(b)) for b in b'"' + prefix]
        return all(m._m.accept_token(i) for i in ids)

    assert accepts("é€".encode()) and accepts(b"ab")
    assert not accepts(b"\xed\xab\xbd")  # U+DAFD, a surrogate
    assert not accepts(b"\x01")
    grammars.shutdown()


def _byte_level(b: int) -> str:
    """The byte-level BPE symbol of one byte (GPT-2's printable mapping, which the tiny tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [x for x in range(256) if x not in printable]
    table = {x: chr(x) for x in printable} | {x: chr(256 + i) for i, x in enumerate(extra)}
    return table[b]
