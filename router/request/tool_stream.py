"""Tool calls in a streamed output: text that may be a Llama 4 call list is held back until the output ends, then
sent as calls when it parses, or as the text it is when it does not (nothing is lost). Text that cannot be a call
(it does not start with `[`) streams as usual.

One per request whose tool choice parses calls; fed the text the TextStream releases.
"""

from __future__ import annotations

from router.request.tools import ToolCall, parse_calls


class ToolCallStream:
    def __init__(self, request_id: str):
        self.request_id = request_id
        self.held = ""
        self.deciding = True  # only whitespace so far
        self.may_be_calls = False

    def push(self, text: str) -> str:
        """The text to send now."""
        if not self.deciding and not self.may_be_calls:
            return text
        self.held += text
        start = self.held.lstrip()
        if not start:
            return ""
        self.deciding = False
        if start.startswith("["):
            self.may_be_calls = True
            return ""
        out, self.held = self.held, ""
        return out

    def restore(self, text: str) -> None:
        """On a resumed request: the text its client already has (held-back text is not part of it)."""
        self.push(text)

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """At the end: (text still to send, calls). Calls when the held output is a call list, else its text."""
        calls = parse_calls(self.held) if self.may_be_calls else None
        if calls:
            self.held = ""
            return "", tuple(ToolCall(c.name, c.arguments, f"{self.request_id}-call-{j}") for j, c in enumerate(calls))
        out, self.held = self.held, ""
        return out, ()
