"""One command-line flag per sampling parameter of the wire contract (protos/vocabulary.py): `--top-p 0.9`,
`--stop STR` (repeatable), `--stop-token-ids 1,2`, `--ignore-eos`. Used by `client generate` and `generate`, so a
parameter added to the proto has its flag without touching the command line. Besides them: `--logit-bias ID=BIAS`
and one output constraint (`--json-schema`, `--json-object`, `--regex`, `--grammar`, `--choice`), given to
SamplingParams as `constraint`; `wire_sampling` turns that into the proto's fields for the gRPC client."""

from __future__ import annotations

import argparse
from pathlib import Path

from deploy.cli.arg_types import token_ids
from protos.moecluster.v1 import inference_pb2 as pb
from protos.vocabulary import CONSTRAINT_NAMES, SAMPLING_FIELDS
from router.request.constraint import Constraint

CONSTRAINT_HELP = {
    "json_schema": "the output is JSON valid under this JSON schema (its text, or @FILE)",
    "json_object": "the output is a JSON object",
    "regex": "the output matches this regular expression in full",
    "grammar": "the output is a sentence of this EBNF grammar (xgrammar's dialect, start rule root; or @FILE)",
    "choice": "the output is exactly one of these strings (repeatable)",
}

HELP = {
    "temperature": "0 = greedy; default: the model's (generation_config.json)",
    "top_p": "(0, 1]; default: the model's",
    "top_k": ">= 0, 0 = off; default: the model's",
    "min_p": "[0, 1]",
    "seed": "[0, 2**63): the same seed gives the same tokens",
    "max_tokens": ">= 1 (default 64)",
    "min_tokens": "stop tokens are suppressed until this many tokens exist",
    "stop": "stop string (repeatable)",
    "stop_token_ids": "comma-separated extra stop token ids",
    "ignore_eos": "the model's EOS tokens do not stop",
}


def add_sampling_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """A flag for every plain sampling field except `skip`; unset flags stay None (the server's default)."""
    group = parser.add_argument_group("sampling")
    for f in SAMPLING_FIELDS:
        if f.name in skip:
            continue
        flag, help_text = "--" + f.name.replace("_", "-"), HELP.get(f.name, "see SamplingParams in inference.proto")
        if f.repeated and f.kind is int:
            group.add_argument(flag, type=token_ids, default=None, help=help_text)
        elif f.repeated:
            group.add_argument(flag, type=f.kind, action="append", default=None, help=help_text)
        elif f.kind is bool:
            group.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, type=f.kind, default=None, help=help_text)
    constraints = parser.add_argument_group("output constraint (one of)").add_mutually_exclusive_group()
    for name in CONSTRAINT_NAMES:
        flag = "--" + name.replace("_", "-")
        if name == "json_object":
            constraints.add_argument(flag, action="store_true", default=None, help=CONSTRAINT_HELP[name])
        elif name == "choice":
            constraints.add_argument(flag, action="append", default=None, metavar="TEXT", help=CONSTRAINT_HELP[name])
        else:
            constraints.add_argument(flag, type=_text_or_file, default=None, help=CONSTRAINT_HELP[name])
    if "logit_bias" not in skip:  # a map, not a plain field
        group.add_argument(
            "--logit-bias",
            type=bias_entry,
            action="append",
            default=None,
            metavar="ID=BIAS",
            help="add BIAS in [-100, 100] to token ID's logit (repeatable): -100 bans the token, 100 forces it",
        )


def sampling_from_args(args: argparse.Namespace) -> dict:
    """The sampling fields the user set, as SamplingParams / client keywords (lists as tuples)."""
    given = {}
    for f in SAMPLING_FIELDS:
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = tuple(value) if f.repeated else value
    if getattr(args, "logit_bias", None):
        given["logit_bias"] = tuple(sorted(dict(args.logit_bias).items()))
    for name in CONSTRAINT_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            given["constraint"] = (
                Constraint(name, choices=tuple(value))
                if name == "choice"
                else Constraint(name, "" if name == "json_object" else value)
            )
    return given


def wire_sampling(sampling: dict) -> dict:
    """`sampling_from_args`' settings as the proto's SamplingParams fields (the constraint as its oneof field)."""
    out = dict(sampling)
    c = out.pop("constraint", None)
    if c is None:
        return out
    if c.kind == "choice":
        out["choice"] = pb.Choice(options=c.choices)
    elif c.kind == "json_object":
        out["json_object"] = True
    else:
        out[c.kind] = c.spec
    return out


def _text_or_file(text: str) -> str:
    """The text itself, or the contents of FILE for @FILE."""
    if not text.startswith("@"):
        return text
    try:
        return Path(text[1:]).read_text()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {e.strerror or e}") from None


def bias_entry(text: str) -> tuple[int, float]:
    """ "1734=-100" -> (1734, -100.0)."""
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS like 1734=-100, got {text!r}") from None
