"""The request layer's one error: a request the engine cannot run, naming the field at fault. Raised by request
preparation, the image checks and the engine's `add`; the gateway turns it into INVALID_ARGUMENT (or its
front's own error), and it never disturbs another request."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine cannot run; the message names the offending field and what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.problem = field, message
