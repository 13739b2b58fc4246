"""The image path's errors between a router and its vision encoders (a refused image is an InvalidRequest)."""

from __future__ import annotations


class EncoderLost(Exception):
    """The encoder's call failed because the encoder is gone."""


class EncoderUnavailable(Exception):
    """No encoder could encode the image; the message says why."""
