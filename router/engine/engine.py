"""The serving engine's synchronous core: one `step()` = schedule, one forward pass over the batch, sample,
update, then turn new tokens into deltas and finals. The life of a request:

  add() -> waiting -> (scheduled pieces: prompt catch-up, then one token per step) -> finished
  every accepted request ends with exactly one `Final`: length, stop (token or string), abort, or error.
A request with images arrives with their features (router/images/features.py encodes them before `add`); each
piece of its prompt takes the features of the `<|patch|>` positions it covers (router/images/positions.py).

Not thread-safe: `AsyncEngine` drives it from one thread. Legend: T tokens in the step, N sampling rows.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any

import torch

from cluster.batch import ForwardBatch, SeqSlice
from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.errors import ClusterFailure
from cluster.vision.merge import scatter_rows
from cluster.weights import load_in_process, load_router_model, resolve_dtype
from router.engine.config import EngineConfig
from router.engine.constrained import ConstrainedRequests
from router.engine.model_runner import ModelRunner
from router.engine.paged_cache import KVLayout, PagedKVCache, block_manager_for, plan_kv_layout
from router.engine.sampler import sample_batch
from router.engine.scheduler import Finished, Scheduler, StopReason
from router.engine.sequence import Sequence
from router.images.positions import PromptImages
from router.images.request import VisionPrompt, checkpoint_vision
from router.request.block_hash import BlockHashes, request_hashes
from router.request.errors import InvalidRequest
from router.request.generation_config import eos_token_ids, load_generation_config
from router.request.messages import Delta, EngineRequest, EngineStats, ErrorKind, Final, FinishReason
from router.request.prepare import Limits, PreparedRequest, prepare_request
from router.request.tokenizer import Tokenizer
from router.request.tool_stream import ToolCallStream

log = logging.getLogger(__name__)
COMPILE_TIMEOUT_S = 30.0  # a constraint's grammar that takes longer to compile ends its request (INVALID_ARGUMENT)


def kv_budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 256 * 2**20


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer | None,
        eos_ids: tuple[int, ...],
        generation_defaults: dict[str, Any],
        config: EngineConfig = EngineConfig(),
        vision: VisionPrompt | None = None,
    ):
        """`vision`: how images enter prompts (None: the model takes no images)."""
        model_cfg = runner.model.config
        self.runner, self.tokenizer, self.eos_ids = runner, tokenizer, frozenset(eos_ids)
        self.defaults, self.config, self.vision = generation_defaults, config, vision
        budget = kv_budget(config, runner.model.device)
        self.kv: KVLayout = plan_kv_layout(
            model_cfg, budget, config.block_size, config.max_num_seqs, runner.model.dtype
        )
        if self.kv.token_capacity < config.block_size or (self.kv.chunk_layers and self.kv.chunk_blocks == 0):
            raise ValueError(f"the KV cache budget of {budget} bytes holds no usable block; raise it")
        self.blocks = block_manager_for(self.kv, model_cfg.attention_chunk_size, config.prefix_caching)
        self.cache = PagedKVCache(model_cfg, self.kv, runner.model.device, runner.model.dtype)
        max_len = min(config.max_model_len or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        self.limits = Limits(model_cfg.vocab_size, max_len, self.blocks.max_tokens_alone())
        self.scheduler = Scheduler(
            self.blocks,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            max_len,
            model_cfg.attention_chunk_size if self.kv.chunk_layers else None,
        )
        self.live: dict[str, Sequence] = {}  # every request from `add` to its Final
        self.constrained = ConstrainedRequests(tokenizer, model_cfg.vocab_size, self.eos_ids, COMPILE_TIMEOUT_S)
        self.tool_streams: dict[str, ToolCallStream] = {}  # requests whose tool choice parses calls
        self._slots = itertools.count()  # a slot names a sequence to the KV cache for one step
        self.failure: str | None = None
        self.finish_counts: dict[str, int] = {}  # finish reason -> requests ended with it
        self._window: deque[tuple[float, int]] = deque()  # (time, tokens) of the steps of the last 10 s
        self._window_tokens = 0

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str,
        device: str = "cpu",
        dtype: str = "auto",
        config: EngineConfig = EngineConfig(),
        *,
        local_experts: bool = True,
        reader: CheckpointReader | None = None,
        expert_dtype: str = "auto",
    ) -> Engine:
        """The one way an engine is built: the router-side model read from `model_dir` (with every routed expert
        when `local_experts`; otherwise the caller attaches its expert channel as `runner.experts` before the
        first step; held as `expert_dtype` says: cluster/weights.py), the tokenizer, and generation_config.json's
        defaults and EOS set. `reader` lets the caller watch
        the bytes read while this loads."""
        cfg = load_model_config(model_dir)
        reader = reader or CheckpointReader(model_dir)
        dev = torch.device(device)
        dt = resolve_dtype(dtype, cfg, dev)
        if local_experts:
            model, transport = load_in_process(cfg, reader, dev, dt, expert_dtype)
        else:
            model, transport = load_router_model(cfg, reader, dev, dt), None
        tokenizer = Tokenizer.from_dir(model_dir)
        return cls(
            ModelRunner(model, transport),
            tokenizer,
            eos_token_ids(model_dir, cfg),
            load_generation_config(model_dir),
            config,
            checkpoint_vision(model_dir, reader, tokenizer),
        )

    # ---- requests ----------------------------------------------------------------------------------------
    def add(self, req: EngineRequest, features: tuple[torch.Tensor, ...] = ()) -> None:
        """Accept a request or raise InvalidRequest (nothing else is disturbed). `features`: one [P, D] tensor per
        image of the request, in prompt order."""
        if self.failure:
            raise ClusterFailure(self.failure)
        if req.request_id in self.live:
            raise InvalidRequest("request_id", f"{req.request_id!r} is already in flight")
        self.add_prepared(self.prepare(req), features)

    def prepare(self, req: EngineRequest) -> PreparedRequest:
        """The request's checks (InvalidRequest naming the field); reads only what never changes, so any thread may
        call it (the router checks a request with images before encoding them)."""
        return prepare_request(req, self.tokenizer, self.defaults, self.limits, self.vision)

    def add_prepared(self, prepared: PreparedRequest, features: tuple[torch.Tensor, ...] = ()) -> None:
        images = self._prompt_images(prepared, features)
        hashes = self._block_hashes(prepared, features)
        seq = Sequence.admit(prepared, next(self._slots), self.eos_ids, self.tokenizer, images, hashes)
        if seq.params.constraint is not None:  # it joins the batch once its grammar compiled (step() looks)
            self.constrained.start(seq.request_id, seq.params.constraint, None)
        if seq.params.tool_calls:
            constraint = seq.params.constraint  # constrained to a call: its parts stream as it is written
            incremental = constraint is not None and constraint.kind == "tool_call"
            skip = prepared.resume.tool_parts if prepared.resume else 0
            self.tool_streams[seq.request_id] = tools = ToolCallStream(seq.request_id, incremental, skip)
            tools.restore(seq.text.text[: seq.text.emitted])  # a resumed stream: the text its client has (the
            # rest, held back by the router that died, comes out of the text stream again)
        self.live[seq.request_id] = seq
        if seq.params.constraint is None:
            self.scheduler.add(seq)

    def _settle_compiles(self) -> list[Final]:
        """Requests whose grammar compiled join the batch (their matcher caught up with what they streamed);
        those whose grammar failed or timed out end with an error naming the field."""
        ready, failed = self.constrained.settled()
        out = []
        for request_id, _, compiled in ready:
            seq = self.live.get(request_id)
            if seq is None:  # aborted while compiling
                continue
            try:
                self.constrained.admit(request_id, compiled, seq.stop_ids, seq.output_ids)
            except InvalidRequest as e:
                out.append(self._refuse(request_id, e))
                continue
            self.scheduler.add(seq)
        return out + [self._refuse(request_id, e) for request_id, e in failed if request_id in self.live]

    def _refuse(self, request_id: str, e: InvalidRequest) -> Final:
        return self._final(request_id, FinishReason.ERROR, error=str(e), error_kind=ErrorKind.REQUEST, field=e.field)

    def _prompt_images(self, prepared: PreparedRequest, features: tuple[torch.Tensor, ...]) -> PromptImages | None:
        if len(features) != len(prepared.images):
            raise InvalidRequest("images", f"{len(prepared.images)} images came with {len(features)} feature tensors")
        if not features:
            return None
        return PromptImages.of(prepared.prompt_ids, self.vision.tokens.patch, features, self.runner.model.device)

    def _block_hashes(self, prepared: PreparedRequest, features: tuple[torch.Tensor, ...]) -> BlockHashes | None:
        """What names the request's blocks in the prefix cache (its salt, each image's content); None: caching off."""
        if not self.blocks.caching:
            return None
        rows = [f.shape[0] for f in features]
        patch = self.vision.tokens.patch if features else None
        data = [im.data for im in prepared.images]
        return request_hashes(self.kv.block_size, prepared.cache_salt, prepared.prompt_ids, patch, rows, data)

    def abort(self, request_id: str) -> Final | None:
        live = self.live.get(request_id)
        if live is None:
            return None
        self.scheduler.abort(request_id)
        return self._final(request_id, FinishReason.ABORT)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.constrained.pending)

    # ---- the step ----------------------------------------------------------------------------------------
    def maintain(self) -> list[Final]:
        """Between steps (and while idle): the expert channel admits replacements, switches maps and recovers
        from a death seen while idle. If the cluster gave up, every request ends with its error."""
        try:
            self.runner.maintain()
        except ClusterFailure as e:
            return self.fail_all(str(e)) if self.failure is None else []
        return []

    def step(self) -> list[Delta | Final]:
        out: list[Delta | Final] = self._settle_compiles()
        plan = self.scheduler.schedule()
        if not plan.pieces:
            if self.constrained.pending and not out:  # only grammars compiling: wait for one, briefly
                self.constrained.wait(0.05)
            return out
        try:
            logits_NV = self._forward(plan)
        except ClusterFailure as e:
            return out + self.fail_all(str(e))
        sampling_pieces = [(i, p) for i, p in enumerate(plan.pieces) if p.samples]
        seqs = [self.live[p.request_id] for _, p in sampling_pieces]
        masks = self.constrained.masks([p.request_id for _, p in sampling_pieces])
        rows = [i for i, _ in sampling_pieces]
        tokens, logprobs = sample_batch(logits_NV[rows], seqs, masks) if seqs else ([], [])
        sampled = {p.request_id: t for (_, p), t in zip(sampling_pieces, tokens)}
        finished = {f.request_id: f for f in self.scheduler.update(plan, sampled)}
        for request_id, token in sampled.items():  # matchers advance by emitted tokens only
            if self.constrained.accept(request_id, token) and request_id not in finished:
                self.scheduler.finish(request_id)  # the constrained output is complete
                finished[request_id] = Finished(request_id, StopReason.STOP, token)
        self._count(len(tokens))
        for (_, piece), token, lp in zip(sampling_pieces, tokens, logprobs):
            out += self._emit(piece.request_id, token, lp, finished.get(piece.request_id))
        return out

    def _forward(self, plan) -> torch.Tensor:
        pieces = plan.pieces
        slots = [self.live[p.request_id].slot for p in pieces]
        starts = itertools.accumulate((len(p.token_ids) for p in pieces), initial=0)
        seqs = tuple(SeqSlice(a, len(p.token_ids), p.pos0, slot) for p, slot, a in zip(pieces, slots, starts))
        self.cache.begin_step({slot: self.blocks.tables(p.request_id) for p, slot in zip(pieces, slots)})
        ids = list(itertools.chain.from_iterable(p.token_ids for p in pieces))
        ids_T = torch.tensor(ids, dtype=torch.int64, device=self.runner.model.device)
        return self.runner.forward(
            ids_T,
            ForwardBatch(seqs),
            self.cache,
            micro_batches=self.config.micro_batches,
            embeds_TD=self._embeds(plan, ids_T),
        )

    @torch.inference_mode()
    def _embeds(self, plan, ids_T: torch.Tensor) -> torch.Tensor | None:
        """The step's input embeddings when some piece covers image positions (None: the model embeds the ids)."""
        rows, features, start = [], [], 0
        for piece in plan.pieces:
            images = self.live[piece.request_id].images
            if images is not None:
                offsets, features_RD = images.rows(piece.pos0, len(piece.token_ids))
                rows += [start + o for o in offsets]
                features.append(features_RD)
            start += len(piece.token_ids)
        if not rows:
            return None
        rows_R = torch.tensor(rows, dtype=torch.int64, device=ids_T.device)
        return scatter_rows(self.runner.embed(ids_T), rows_R, torch.cat(features))

    def _emit(self, request_id: str, token: int, logprob, done) -> list[Delta | Final]:
        seq, tools = self.live[request_id], self.tool_streams.get(request_id)
        text = seq.text.push(token)
        text = tools.push(text) if tools else text
        parts = tools.take_parts() if tools else ()
        if seq.text.matched is not None:  # a stop string wins over whatever else ended this step
            self.scheduler.finish(request_id)
            done_reason, matched = FinishReason.STOP, seq.text.matched
        elif done is not None:
            done_reason, matched = FinishReason(done.reason.value), done.stop_token
        else:
            return [Delta(request_id, (token,), text, (logprob,) if logprob else (), tool_call_parts=parts)]
        tail, calls = seq.text.flush() if seq.text.matched is None else "", ()
        if tools:  # the held output: calls when it parses as calls, else its text
            tail = tools.push(tail)
            rest, calls = tools.finish()
            tail += rest
            parts += tools.take_parts()
        if calls and done_reason == FinishReason.STOP:
            done_reason = FinishReason.TOOL_CALLS
        return [
            Delta(request_id, (token,), text + tail, (logprob,) if logprob else (), calls, parts),
            self._final(request_id, done_reason, matched),
        ]

    def _final(
        self,
        request_id: str,
        reason: FinishReason,
        matched=None,
        error: str | None = None,
        error_kind: ErrorKind | None = None,
        field: str | None = None,
    ) -> Final:
        seq = self.live.pop(request_id)
        self.constrained.drop(request_id)
        self.tool_streams.pop(request_id, None)
        self.finish_counts[reason.value] = self.finish_counts.get(reason.value, 0) + 1
        return Final(
            request_id,
            reason,
            matched,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            error,
            error_kind,
            field,
            cached_tokens=min(seq.num_cached or 0, seq.num_prompt_tokens),
        )

    def fail_all(self, reason: str, kind: ErrorKind = ErrorKind.CLUSTER) -> list[Final]:
        """The expert side is gone (or a step hit a bug): every request in flight ends with an error naming why;
        the engine then refuses new requests."""
        self.failure = reason
        log.error("engine failed: %s", reason)
        finals = []
        for request_id in list(self.live):
            self.scheduler.abort(request_id)
            finals.append(self._final(request_id, FinishReason.ERROR, error=reason, error_kind=kind))
        return finals

    # ---- stats -------------------------------------------------------------------------------------------
    def _count(self, n: int) -> None:
        now = time.monotonic()
        self._window.append((now, n))
        self._window_tokens += n
        while now - self._window[0][0] >= 10.0:
            self._window_tokens -= self._window.popleft()[1]

    def stats(self) -> EngineStats:
        span = time.monotonic() - self._window[0][0] if len(self._window) > 1 else 0.0
        rate = (self._window_tokens - self._window[0][1]) / span if span > 0 else 0.0
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.blocks_used,
            kv_blocks_total=self.blocks.blocks_total,
            kv_bytes_per_token=self.kv.full_bytes_per_token + self.kv.chunk_bytes_per_token,
            kv_token_capacity=self.kv.token_capacity,
            tokens_per_s=rate,
            finished=dict(self.finish_counts),
            prefix_caching=self.blocks.caching,
            prompt_tokens=self.scheduler.prompt_tokens,
            cached_tokens=self.scheduler.cached_tokens,
            cached_blocks=self.blocks.cached_blocks,
            evictions=self.blocks.evictions,
        )
