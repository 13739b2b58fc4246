"""One command-line flag per sampling parameter of the wire contract (protos/vocabulary.py): `--top-p 0.9`,
`--stop STR` (repeatable), `--stop-token-ids 1,2`, `--ignore-eos`. Used by `client generate` and `generate`, so a
parameter added to the proto has its flag without touching the command line."""

from __future__ import annotations

import argparse

from deploy.cli.arg_types import token_ids
from protos.vocabulary import SAMPLING_FIELDS

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
    return given


def bias_entry(text: str) -> tuple[int, float]:
    """ "1734=-100" -> (1734, -100.0)."""
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS like 1734=-100, got {text!r}") from None
