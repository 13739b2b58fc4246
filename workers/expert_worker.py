"""The expert worker: holds its experts of every MoE layer and serves them in a persistent loop.

Life: created by the launcher (one GPU each on a GPU cluster) -> `load` (its experts only, with progress) ->
`join` the process group (Ray call) ->
`run_loop` (one Ray call that lasts until stop) -> per step, receive the header, then for each MoE layer
receive rows, run its experts, reply. Ray calls besides the loop: `health`, `stats`, `shutdown`; never per
token. Workers hold no request state, so one can be replaced without losing a request.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from cluster.all_to_all import RUN, STOP, AllToAllTransport
from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.experts import ExpertShard
from cluster.load_progress import LoadProgress
from cluster.placement import ExpertPlacement
from cluster.process_group import GroupAddress, RankLayout, join_groups, leave_groups
from cluster.weights import experts_bytes, load_expert_shard, resolve_dtype

log = logging.getLogger(__name__)


class ExpertWorker:
    def __init__(
        self,
        model_dir: str,
        worker: int,
        layout: RankLayout,
        placement: ExpertPlacement,
        device: str = "cpu",
        dtype: str = "auto",
    ):
        """Cheap: reads config.json and the checkpoint's headers. `load()` reads the weights."""
        self.worker, self.layout, self.placement = worker, layout, placement
        self.rank = layout.worker_rank(worker)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)  # Ray exposes exactly this actor's GPU
        self.config = cfg = load_model_config(model_dir)
        self.dtype = resolve_dtype(dtype, cfg, self.device)
        self.reader = CheckpointReader(model_dir)
        self.mine = {layer: placement.experts_of(worker, layer) for layer in cfg.moe_layers}
        self.bytes_total = experts_bytes(cfg, self.reader, self.mine)
        self.shards: dict[int, ExpertShard] = {}
        self.tokens_per_expert: dict[int, torch.Tensor] = {}
        self.steps = 0
        self.transport: AllToAllTransport | None = None
        self._lock = threading.Lock()
        self._loaded = False

    def load(self) -> int:
        """Read this worker's experts (and nothing else) from the checkpoint; returns bytes read."""
        started = time.perf_counter()
        for layer, experts in self.mine.items():
            self.shards[layer] = load_expert_shard(self.config, self.reader, layer, experts, self.device, self.dtype)
            self.tokens_per_expert[layer] = torch.zeros(len(experts), dtype=torch.int64, device=self.device)
        self._loaded = True
        log.info(
            "worker %d loaded %d experts (%.1f MB) in %.2fs",
            self.worker,
            self.num_experts,
            self.bytes_resident / 1e6,
            time.perf_counter() - started,
        )
        return self.reader.bytes_read

    def load_progress(self) -> LoadProgress:
        return LoadProgress(
            f"worker {self.worker}", self.reader.bytes_read, self.bytes_total, self.reader.tensors_read, self._loaded
        )

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    @property
    def num_experts(self) -> int:
        return sum(len(s.experts) for s in self.shards.values())

    @property
    def bytes_resident(self) -> int:
        return sum(s.nbytes for s in self.shards.values())

    def join(self, address: GroupAddress) -> int:
        groups = join_groups(address, self.rank)
        self.transport = AllToAllTransport(
            self.layout, groups, self.placement, self.config.hidden_size, self.device, self.dtype
        )
        return self.rank

    def run_loop(self) -> int:
        """Serve steps until the router sends STOP; returns the number of steps served."""
        assert self.transport is not None, "join() first"
        try:
            while True:
                command = self.transport.receive_header()
                if command == STOP:
                    return self.steps
                assert command == RUN, f"unknown step command {command}"
                self.transport.serve_step(self.shards, self._count)
                self.steps += 1
        except BaseException:
            log.exception("worker %d: loop failed at step %d", self.worker, self.steps)
            leave_groups()  # closes our sockets so peers blocked on us fail now rather than at the timeout
            raise

    def _count(self, layer: int, per_expert: torch.Tensor) -> None:
        n = len(self.shards[layer].experts)
        with self._lock:
            self.tokens_per_expert[layer] += per_expert[:n]  # stays on the device: no sync per layer

    def health(self) -> dict:
        return {"worker": self.worker, "rank": self.rank, "steps": self.steps, "device": str(self.device)}

    def stats(self) -> dict:
        with self._lock:
            tokens = {layer: t.tolist() for layer, t in self.tokens_per_expert.items()}
        return {
            "worker": self.worker,
            "rank": self.rank,
            "device": str(self.device),
            "experts": {layer: list(s.experts) for layer, s in self.shards.items()},
            "bytes_resident": self.bytes_resident,
            "bytes_read": self.bytes_read,
            "tokens_per_expert": tokens,
            "steps": self.steps,
        }

    def shutdown(self) -> None:
        leave_groups()
