"""Command-line value parsers shared by the subcommands; each failure is argparse's one-line usage error."""

from __future__ import annotations

import argparse

from cluster.settings import parse_bytes


def token_ids(text: str) -> list[int]:
    """ "1,2,3" -> [1, 2, 3] (an empty string is an empty list; the command says why that is not allowed)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None


def positive_ints(text: str) -> list[int]:
    """ "1,16,256" -> [1, 16, 256], every value >= 1."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,16,256, got {text!r}")
    return values


def byte_size(text: str) -> int:
    """ "512MiB", "2GiB" or a plain number of bytes."""
    try:
        return parse_bytes(int(text) if text.isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
