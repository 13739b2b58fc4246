"""Incremental detokenization that never emits half a UTF-8 character, and stop-string matching across
token boundaries with hold-back, so streamed text never shows the beginning of a stop string it later cuts.

One `TextStream` per request: feed it each new token id, get the text that is now safe to emit.
"""

from __future__ import annotations

from router.request.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a short window of recent tokens (vLLM's prefix/read offsets) instead of the whole output."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""  # an incomplete character (or a special token that decodes to nothing): wait


class TextStream:
    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer else None
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded text so far (up to a stop string, once found)
        self.emitted = 0  # characters of `text` already handed out
        self.matched: str | None = None

    def push(self, token_id: int) -> str:
        """Text safe to emit after this token; after a stop string matched, everything up to it."""
        if self.detok is None or self.matched is not None:
            return ""
        new = self.detok.push(token_id)
        if not new:
            return ""
        search_from = max(0, len(self.text) - self.holdback)
        self.text += new
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) != -1]
            if hits:
                cut, self.matched = min(hits)
                self.text = self.text[:cut]
                return self._take(len(self.text))
        return self._take(len(self.text) - self.holdback)

    def restore(self, token_ids, text_chars: int) -> None:
        """Continue a stream another router started: push the tokens it streamed, then count `text_chars`
        characters as already handed out (whatever it held back is emitted from here on)."""
        for token_id in token_ids:
            self.push(token_id)
        self.emitted = min(text_chars, len(self.text))

    def flush(self) -> str:
        """At the end of the request, the held-back tail (no stop string can complete any more)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : upto], upto
        return out
