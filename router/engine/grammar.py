"""Constraints compiled into token masks, with xgrammar, off the step loop.

`Grammars.submit(constraint)` starts compiling on a small thread pool and returns a future; identical constraints
share one compilation (cached by content, the most recent `CACHE_SIZE`). The engine keeps a request whose grammar is
compiling out of the batch, and ends it with an error naming the field if compiling fails or takes longer than
`timeout_s` (the thread cannot be stopped; its result is cached for the next request that asks). The other requests
step on meanwhile.

A `Matcher` follows one request's output: `fill(bitmask, row)` writes the tokens allowed next, `accept(token)`
advances it by a token the engine emitted (only emitted tokens: a worker failover replays the step's forward, never
its sampling), and a resumed request's matcher is rebuilt by accepting the tokens already streamed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from router.request.constraint import Constraint
from router.request.grammars import grammar_of
from router.request.tokenizer import Tokenizer

CACHE_SIZE = 256


class Grammars:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids, threads: int = 2, timeout_s: float = 30.0):
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.serialized())
        self.info = xgr.TokenizerInfo(
            tokenizer.encoded_vocab(vocab_size),
            vocab_type=meta["vocab_type"],
            vocab_size=vocab_size,
            stop_token_ids=sorted(stop_ids),
            add_prefix_space=meta["add_prefix_space"],
        )
        self.vocab_size, self.timeout_s = vocab_size, timeout_s
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # compilations started (cache misses)

    def submit(self, constraint: Constraint) -> Future:
        """The compiled grammar of `constraint`, as a future (shared by every request with the same one)."""
        with self._lock:
            future = self._cache.get(constraint.key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(constraint.key)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint.key] = future
            self.compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, constraint: Constraint):
        return self._compiler.compile_grammar(grammar_of(constraint))

    def bitmask(self, rows: int) -> torch.Tensor:
        """An int32 [rows, ceil(V / 32)] bitmask for `Matcher.fill`."""
        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, compiled, stop_ids):
        """`stop_ids`: the request's stop tokens, allowed once the output is complete (none: the model's EOS set;
        the engine ends the request when its matcher is done, so ignore_eos cannot run past the constraint)."""
        self._m = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids) or None)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self._m.accept_token(token)

    @property
    def done(self) -> bool:
        """The output is complete: only a stop token (or nothing) may follow."""
        return self._m.is_terminated()
