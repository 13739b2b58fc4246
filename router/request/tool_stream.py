"""Tool calls in a streamed output: text that may be a Llama 4 call list is held back until the output ends, then
sent as calls when it parses, or as the text it is when it does not (nothing is lost). Text that cannot be a call
(it does not start with `[`) streams as usual.

When decoding is constrained to a call (`tool_choice` required or a named tool: the output is a call list by
construction), each call also streams as it is written (`incremental`), in `ToolCallPart`s: one when its name is
complete (with its id and empty arguments), one per complete argument (`{"city": "Paris"`, then `, "days": 3`), one
when it closes (`}`). A call's parts' arguments, joined, are its whole `arguments` exactly; at the end anything the
scanner could not place is sent as a last part, so the joined parts never fall short of the call. The parts depend
only on the text, not on how it was cut into pieces, so a router that resumes a stream (`skip_parts`: what its
client already has) emits the same parts and drops the ones sent before. With `auto` the output may turn out to be
text, and a part cannot be taken back: those calls are sent whole at the end.

One per request whose tool choice parses calls; fed the text the TextStream releases.
"""

from __future__ import annotations

import json

from router.request.tools import ToolCall, ToolCallPart, parse_calls


class ToolCallStream:
    def __init__(self, request_id: str, incremental: bool = False, skip_parts: int = 0):
        self.request_id = request_id
        self.held = ""
        self.deciding = True  # only whitespace so far
        self.may_be_calls = False
        self.scanner = _CallScanner(self.call_id) if incremental else None
        self.skip = skip_parts  # parts the client already has (a resumed stream)
        self.parts: list[ToolCallPart] = []  # made, not yet taken
        self.sent: dict[int, str] = {}  # call index -> the arguments its parts carried so far

    def call_id(self, index: int) -> str:
        return f"{self.request_id}-call-{index}"

    def push(self, text: str) -> str:
        """The text to send now (the calls' parts made meanwhile: `take_parts`)."""
        if not self.deciding and not self.may_be_calls:
            return text
        self.held += text
        if self.may_be_calls:  # decided: only the new text is scanned
            if self.scanner is not None:
                self._add(self.scanner.scan(self.held))
            return ""
        start = self.held.lstrip()
        if not start:
            return ""
        self.deciding = False
        if start.startswith("["):
            self.may_be_calls = True
            if self.scanner is not None:
                self._add(self.scanner.scan(self.held))
            return ""
        out, self.held = self.held, ""
        return out

    def take_parts(self) -> tuple[ToolCallPart, ...]:
        """The parts made since the last call, less those a resumed stream's client already has."""
        out, self.parts = tuple(self.parts), []
        return out

    def restore(self, text: str) -> None:
        """On a resumed request: the text its client already has (held-back text is not part of it)."""
        self.push(text)
        self.take_parts()

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """At the end: (text still to send, calls). Calls when the held output is a call list, else its text. An
        incremental stream's last parts (what completes each call) are then in `take_parts`."""
        calls = parse_calls(self.held) if self.may_be_calls else None
        if calls:
            self.held = ""
            calls = tuple(ToolCall(c.name, c.arguments, self.call_id(j)) for j, c in enumerate(calls))
            if self.scanner is not None:
                self._add(self._completions(calls))
            return "", calls
        out, self.held = self.held, ""
        return out, ()

    def _add(self, parts: list[ToolCallPart]) -> None:
        for part in parts:
            self.sent[part.index] = self.sent.get(part.index, "") + part.arguments
            if self.skip:
                self.skip -= 1
            else:
                self.parts.append(part)

    def _completions(self, calls: tuple[ToolCall, ...]) -> list[ToolCallPart]:
        """What each call's parts still lack: the call itself when none was sent, else the rest of its arguments."""
        out = []
        for j, call in enumerate(calls):
            sent = self.sent.get(j)
            if sent is None:
                out += [ToolCallPart(j, call.id, call.name, ""), ToolCallPart(j, arguments=call.arguments)]
            elif call.arguments.startswith(sent) and len(call.arguments) > len(sent):
                out.append(ToolCallPart(j, arguments=call.arguments[len(sent) :]))
        return out


class _CallScanner:
    """Reads a call list `[name(key=value, ...), ...]` as it grows and makes the parts of what is complete. Values
    are JSON (constrained decoding writes JSON); each argument is read by the same parser as the whole call."""

    def __init__(self, call_id):
        self.call_id = call_id
        self.pos = 0
        self.phase = "start"  # start -> between -> name -> args -> between ... -> done
        self.index = 0  # the call being read
        self.mark = 0  # where the name or the current argument starts
        self.args = 0  # arguments of the current call sent
        self.depth, self.in_string, self.escape = 0, False, False
        self.broken = False  # an argument it could not read: it makes no more parts (the last parts carry the rest)

    def scan(self, text: str) -> list[ToolCallPart]:
        parts = []
        for i in range(self.pos, len(text)):
            if self.broken:
                break
            c = text[i]
            if self.phase == "start":
                if c == "[":
                    self.phase = "between"
            elif self.phase == "between":
                if c == "]":
                    self.phase = "done"
                elif c.isalpha() or c == "_":
                    self.phase, self.mark = "name", i
            elif self.phase == "name":
                if c == "(":
                    parts.append(ToolCallPart(self.index, self.call_id(self.index), text[self.mark : i].strip(), ""))
                    self.phase, self.mark, self.args, self.depth = "args", i + 1, 0, 0
            elif self.phase == "args":
                parts += self._arg_char(text, i, c)
        self.pos = len(text)
        return parts

    def _arg_char(self, text: str, i: int, c: str) -> list[ToolCallPart]:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
            return []
        if c == '"':
            self.in_string = True
        elif c in "([{":
            self.depth += 1
        elif c in ")]}" and self.depth:
            self.depth -= 1
        elif c == "," and not self.depth:
            part = self._argument(text[self.mark : i])
            self.mark = i + 1
            return part
        elif c == ")":
            parts = self._argument(text[self.mark : i])
            if self.broken:
                return parts
            parts.append(ToolCallPart(self.index, arguments="}" if self.args else "{}"))
            self.phase, self.index = "between", self.index + 1
            return parts
        return []

    def _argument(self, source: str) -> list[ToolCallPart]:
        """The part of one complete `key=value` (none for blank text, or text the parser does not take: the call's
        last part then carries it)."""
        if not source.strip():
            return []
        parsed = parse_calls(f"[f({source})]")
        if not parsed:
            self.broken = True
            return []
        ((key, value),) = json.loads(parsed[0].arguments).items()
        self.args += 1
        lead = "{" if self.args == 1 else ", "
        return [ToolCallPart(self.index, arguments=f"{lead}{json.dumps(key)}: {json.dumps(value)}")]
