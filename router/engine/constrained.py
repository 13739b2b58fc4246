"""The engine's constrained requests: their grammars compiling (off the step loop), and the matchers of those
admitted. The engine asks it each step which requests became ready or failed, for the bitmasks of the batch's
constrained rows, and tells it each emitted token.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

from router.engine.sampler import RowMasks
from router.request.constraint import Constraint
from router.request.errors import InvalidRequest
from router.request.tokenizer import Tokenizer


@dataclass
class _Pending:
    constraint: Constraint
    future: concurrent.futures.Future
    deadline: float
    payload: Any = field(default=None)


class ConstrainedRequests:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int, eos_ids, timeout_s: float):
        self.tokenizer, self.vocab_size, self.eos_ids, self.timeout_s = tokenizer, vocab_size, eos_ids, timeout_s
        self._grammars = None  # made (xgrammar loaded) with the first constrained request
        self.pending: dict[str, _Pending] = {}
        self.matchers: dict = {}  # request_id -> Matcher

    @property
    def grammars(self):
        if self._grammars is None:
            from router.engine.grammar import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_ids, timeout_s=self.timeout_s)
        return self._grammars

    def start(self, request_id: str, constraint: Constraint, payload) -> None:
        """Compile `constraint` for a request (InvalidRequest when the model has no tokenizer to compile with)."""
        if self.tokenizer is None:
            raise InvalidRequest(constraint.field, "this model has no tokenizer.json; a constraint needs one")
        future = self.grammars.submit(constraint)
        self.pending[request_id] = _Pending(constraint, future, time.monotonic() + self.timeout_s, payload)

    def settled(self) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, InvalidRequest]]]:
        """Requests whose compile ended: ([(id, payload, compiled)], [(id, why it failed or timed out)])."""
        ready, failed, now = [], [], time.monotonic()
        for request_id, p in list(self.pending.items()):
            if p.future.done():
                del self.pending[request_id]
                error = p.future.exception()
                if error is None:
                    ready.append((request_id, p.payload, p.future.result()))
                else:
                    failed.append((request_id, InvalidRequest(p.constraint.field, f"does not compile: {error}")))
            elif now > p.deadline:
                del self.pending[request_id]
                why = f"took longer than {self.timeout_s:g}s to compile; simplify it"
                failed.append((request_id, InvalidRequest(p.constraint.field, why)))
        return ready, failed

    def wait(self, timeout_s: float) -> None:
        """Block until a compile ends (at most `timeout_s`): the engine's idle wait while only compiles are left."""
        futures = [p.future for p in self.pending.values()]
        if futures:
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def admit(self, request_id: str, compiled, stop_ids, streamed: tuple[int, ...]) -> None:
        """The request's matcher, advanced by the tokens it already streamed (a resumed request)."""
        from router.engine.grammar import Matcher

        matcher = Matcher(compiled, stop_ids)
        for k, token in enumerate(streamed):
            if not matcher.accept(token):
                raise InvalidRequest("resume.output_ids", f"token {k} ({token}) does not follow the constraint")
        self.matchers[request_id] = matcher

    def masks(self, request_ids: list[str]) -> RowMasks | None:
        """The bitmasks of the constrained rows among a step's sampling rows (None when there are none)."""
        rows = [i for i, rid in enumerate(request_ids) if rid in self.matchers]
        if not rows:
            return None
        bitmask = self.grammars.bitmask(len(rows))
        for j, i in enumerate(rows):
            self.matchers[request_ids[i]].fill(bitmask, j)
        return RowMasks(rows, bitmask)

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's matcher by an emitted token; True when its output is now complete."""
        matcher = self.matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.accept(token):
            raise RuntimeError(f"request {request_id}: token {token} was sampled outside its constraint")
        return matcher.done

    def drop(self, request_id: str) -> None:
        self.pending.pop(request_id, None)
        self.matchers.pop(request_id, None)
