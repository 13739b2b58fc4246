"""Single-process generation: one sequence at a time through the model with a contiguous KV cache.

The serving engine (continuous batching over a paged cache) replaces this for many users; this stays the
simplest correct path and the reference the engine is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.batch import ForwardBatch, SeqSlice
from cluster.checkpoint import CheckpointReader
from cluster.config import ModelConfig, load_model_config
from cluster.weights import load_in_process, resolve_dtype
from router.engine.model_runner import ModelRunner
from router.engine.sampler import sample_batch
from router.engine.sequence import Sequence
from router.reference.contiguous_cache import ContiguousKVCache
from router.request.generation_config import eos_token_ids
from router.request.prepare import check_prompt
from router.request.sampling_params import SamplingParams, resolve_seed


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "length" | "stop"


class Generator:
    def __init__(self, runner: ModelRunner, eos_ids: tuple[int, ...]):
        self.runner, self.model, self.eos_ids = runner, runner.model, eos_ids
        self.config: ModelConfig = runner.model.config

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, device: str = "cpu", dtype: str = "auto") -> Generator:
        cfg = load_model_config(model_dir)
        dev = torch.device(device)
        model, transport = load_in_process(cfg, CheckpointReader(model_dir), dev, resolve_dtype(dtype, cfg, dev))
        return cls(ModelRunner(model, transport), eos_token_ids(model_dir, cfg))

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        check_prompt(self.config, prompt_ids, max_tokens)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        self.check_prompt(prompt_ids, params.max_tokens)
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        seq = Sequence("reference", prompt_ids, params, seed=resolve_seed(params), stop_ids=frozenset(stop))
        cache, out = ContiguousKVCache(), []
        ids, pos = list(prompt_ids), 0
        while True:
            batch = ForwardBatch((SeqSlice(0, len(ids), pos, 0),))
            logits = self.runner.forward(torch.tensor(ids, device=self.model.device), batch, cache)
            token = sample_batch(logits, [seq])[0][0]
            seq.append(token)
            out.append(token)
            if token in stop and len(out) >= params.min_tokens:
                return GenerationResult(out, "stop")
            if len(out) >= params.max_tokens:
                return GenerationResult(out, "length")
            pos, ids = pos + len(ids), [token]
