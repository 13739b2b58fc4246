"""Continuous batching, vLLM v1 style: two calls per step, `schedule()` then `update()`. No torch here.

There are no prefill and decode modes: each request's computed-token count catches up with its token count
(prompt + generated), a piece at a time, within a per-step token budget. Running requests go first (oldest
first); waiting ones are admitted while the budget, `max_num_seqs` and the KV blocks allow. When blocks run
out, the newest running request is preempted: its blocks are freed and it goes back to the head of the
waiting queue, to be recomputed from its prompt and the tokens it already generated (nothing is lost).
A piece never crosses an attention-chunk boundary, so RoPE layers hold at most one chunk per sequence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from router.engine.block_manager import KVBlockManager


@dataclass
class SchedRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]


@dataclass(frozen=True)
class Piece:
    """Tokens [pos0, pos0 + len(token_ids)) of one request go through the model this step."""

    request_id: str
    token_ids: tuple[int, ...]
    pos0: int
    samples: bool  # the piece ends at the request's last token: its logits give the next token


@dataclass(frozen=True)
class StepPlan:
    pieces: tuple[Piece, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.pieces)


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: str  # "stop" | "length"
    stop_token: int | None = None


class Scheduler:
    def __init__(
        self,
        blocks: KVBlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        chunk_size: int | None,
    ):
        self.blocks = blocks
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.max_model_len, self.chunk_size = max_model_len, chunk_size
        self.waiting: deque[SchedRequest] = deque()
        self.running: list[SchedRequest] = []
        self.requests: dict[str, SchedRequest] = {}
        self.preemptions = 0

    def add(self, req: SchedRequest) -> None:
        assert req.request_id not in self.requests, req.request_id
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.blocks.free(request_id)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget, pieces, preempted = self.budget, [], []
        for req in list(self.running):
            if req not in self.running:  # preempted earlier in this loop
                continue
            n = self._piece_len(req, budget)
            while not self.blocks.allocate(req.request_id, req.num_computed, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req in self.running:
                pieces.append(self._piece(req, n))
                budget -= n
            if budget == 0:
                break
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            n = self._piece_len(req, budget)
            if not self.blocks.allocate(req.request_id, req.num_computed, n):
                break
            self.waiting.popleft()
            self.running.append(req)
            pieces.append(self._piece(req, n))
            budget -= n
        return StepPlan(tuple(pieces), tuple(preempted))

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Finished]:
        """Advance computed counts, append sampled tokens, and finish on stop token / length."""
        finished = []
        for piece in plan.pieces:
            req = self.requests.get(piece.request_id)
            if req is None:  # aborted while the step ran
                continue
            req.num_computed += len(piece.token_ids)
            if piece.samples:
                token = sampled[req.request_id]
                req.output_ids.append(token)
                done = self._check_stop(req, token)
                if done:
                    finished.append(done)
                    self.finish(req.request_id)
                    continue
            self.blocks.release_finished_chunks(req.request_id, req.num_computed)
        return finished

    def finish(self, request_id: str) -> None:
        """Remove a request that ended (stop, length, stop string seen by the output processor)."""
        self.abort(request_id)

    def _check_stop(self, req: SchedRequest, token: int) -> Finished | None:
        if token in req.stop_token_ids and len(req.output_ids) >= req.min_tokens:
            return Finished(req.request_id, "stop", token)
        if len(req.output_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return Finished(req.request_id, "length")
        return None

    def _piece_len(self, req: SchedRequest, budget: int) -> int:
        n = min(req.num_tokens - req.num_computed, budget)
        if self.chunk_size:
            n = min(n, self.chunk_size - req.num_computed % self.chunk_size)
        assert n >= 1, (req.request_id, req.num_tokens, req.num_computed, budget)
        return n

    def _piece(self, req: SchedRequest, n: int) -> Piece:
        ids = tuple(req.token(i) for i in range(req.num_computed, req.num_computed + n))
        return Piece(req.request_id, ids, req.num_computed, req.num_computed + n == req.num_tokens)

    def _preempt(self, req: SchedRequest) -> None:
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.num_computed = 0
        req.num_preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)
