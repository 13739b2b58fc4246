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
from dataclasses import dataclass
from enum import Enum

from router.engine.block_manager import KVBlockManager
from router.engine.sequence import SeqStatus, Sequence


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


class StopReason(Enum):
    STOP = "stop"  # a stop token (after min_tokens)
    LENGTH = "length"  # max_tokens, or the context length


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: StopReason
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
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.request_id not in self.requests, seq.request_id
        self.requests[seq.request_id] = seq
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(request_id)
        seq.status = SeqStatus.FINISHED
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        budget, pieces, preempted = self.budget, [], []
        for seq in list(self.running):
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = self._piece_len(seq, budget)
            while not self.blocks.allocate(seq.request_id, seq.num_computed, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq in self.running:
                pieces.append(self._piece(seq, n))
                budget -= n
            if budget == 0:
                break
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            n = self._piece_len(seq, budget)
            if not self.blocks.allocate(seq.request_id, seq.num_computed, n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.status = SeqStatus.RUNNING
            pieces.append(self._piece(seq, n))
            budget -= n
        return StepPlan(tuple(pieces), tuple(preempted))

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Finished]:
        """Advance computed counts, append sampled tokens, and finish on stop token / length."""
        finished = []
        for piece in plan.pieces:
            seq = self.requests.get(piece.request_id)
            if seq is None:  # aborted while the step ran
                continue
            seq.num_computed += len(piece.token_ids)
            if piece.samples:
                token = sampled[seq.request_id]
                seq.append(token)
                done = self._check_stop(seq, token)
                if done:
                    finished.append(done)
                    self.finish(seq.request_id)
                    continue
            self.blocks.release_finished_chunks(seq.request_id, seq.num_computed)
        return finished

    def finish(self, request_id: str) -> None:
        """Remove a request that ended (stop, length, stop string seen by the output processor)."""
        self.abort(request_id)

    def _check_stop(self, seq: Sequence, token: int) -> Finished | None:
        n, params = seq.num_output_tokens, seq.params
        if token in seq.stop_ids and n >= params.min_tokens:
            return Finished(seq.request_id, StopReason.STOP, token)
        if n >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return Finished(seq.request_id, StopReason.LENGTH)
        return None

    def _piece_len(self, seq: Sequence, budget: int) -> int:
        n = min(seq.num_tokens - seq.num_computed, budget)
        if self.chunk_size:
            n = min(n, self.chunk_size - seq.num_computed % self.chunk_size)
        assert n >= 1, (seq.request_id, seq.num_tokens, seq.num_computed, budget)
        return n

    def _piece(self, seq: Sequence, n: int) -> Piece:
        ids = tuple(seq.token(i) for i in range(seq.num_computed, seq.num_computed + n))
        return Piece(seq.request_id, ids, seq.num_computed, seq.num_computed + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
