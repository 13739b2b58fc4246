"""One request on the router, from admission to its final message: the one object the scheduler, the sampler and
the engine share (vLLM v1's `Request`, nano-vllm's `Sequence`). No torch here.

Who writes what: the engine creates it (`Sequence.admit`) and feeds its text stream; the scheduler moves its
status and computed count and appends each sampled token (`append`, the only writer of the output); the sampler
only reads. Everything fixed at admission (prompt, sampling parameters, seed, stop ids) is read-only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from enum import Enum
from typing import TYPE_CHECKING

from router.request.detokenizer import TextStream
from router.request.sampling_params import SamplingParams, resolve_seed

if TYPE_CHECKING:
    from router.images.positions import PromptImages
    from router.request.prepare import PreparedRequest
    from router.request.tokenizer import Tokenizer


class SeqStatus(Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and takes part in steps
    FINISHED = "finished"  # ended (stop, length, abort, error): no longer scheduled


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_ids: Iterable[int],
        params: SamplingParams,
        *,
        seed: int,
        stop_ids: frozenset[int] = frozenset(),
        output_ids: Iterable[int] = (),
        text: TextStream | None = None,
        images: PromptImages | None = None,
        slot: int = 0,
    ):
        """`params` validated with the model's defaults filled in; `output_ids`: tokens already streamed (a resumed
        stream); `slot` names the sequence to the KV cache."""
        self.request_id = request_id
        self.prompt_ids: tuple[int, ...] = tuple(prompt_ids)
        self.params, self.seed, self.stop_ids = params, seed, stop_ids
        self._output: list[int] = list(output_ids)
        self.text = text if text is not None else TextStream(None, ())
        self.images, self.slot = images, slot
        self.status = SeqStatus.WAITING
        self.num_computed = 0  # positions whose keys and values are in the cache
        self.num_preemptions = 0
        self.arrived = time.monotonic()

    @classmethod
    def admit(
        cls,
        prepared: PreparedRequest,
        slot: int,
        eos_ids: frozenset[int],
        tokenizer: Tokenizer | None,
        images: PromptImages | None = None,
    ) -> Sequence:
        """A validated request as the engine runs it; a resumed stream continues from the tokens it streamed."""
        p, resume = prepared.params, prepared.resume
        text = TextStream(tokenizer, p.stop)
        if resume:
            text.restore(resume.output_ids, resume.text_chars)
        return cls(
            prepared.request_id,
            prepared.prompt_ids,
            p,
            seed=resolve_seed(p),
            stop_ids=frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else eos_ids),
            output_ids=resume.output_ids if resume else (),
            text=text,
            images=images,
            slot=slot,
        )

    @property
    def output_ids(self) -> tuple[int, ...]:
        return tuple(self._output)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self._output)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self._output[i - n]

    def append(self, token: int) -> None:
        self._output.append(token)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed})"
        )
