"""The router actor: attention side of the cluster. Holds the model (minus routed experts), the KV cache and
the sampler; reaches the experts over the all-to-all transport, or in-process when it has no workers.

Life: created by the launcher -> `load` (weights, with progress) -> `open_rendezvous` (picks a free port) ->
`join` (rank 0, while the workers join) -> `start_workers` (starts each worker's persistent loop and a monitor of
those calls) -> requests -> `shutdown` (STOP header, loops end, group left).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch

from cluster.all_to_all import STOP, AllToAllTransport
from cluster.batch import ForwardBatch, SeqSlice
from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.load_progress import LoadProgress
from cluster.placement import ExpertPlacement
from cluster.process_group import RankLayout, Rendezvous, abort_groups, backend_for, join_groups, leave_groups
from cluster.weights import experts_bytes, resolve_dtype, router_bytes
from router.async_engine import AsyncEngine, collect
from router.engine import Engine
from router.engine_config import EngineConfig
from router.messages import EngineRequest
from router.reference.contiguous_cache import ContiguousKVCache
from router.worker_monitor import WorkerMonitor

log = logging.getLogger(__name__)


class RouterActor:
    def __init__(
        self,
        model_dir: str,
        layout: RankLayout,
        placement: ExpertPlacement | None,
        device: str = "cpu",
        dtype: str = "auto",
        collective_timeout_s: float = 60.0,
        engine_config: EngineConfig = EngineConfig(),
        model_name: str | None = None,
    ):
        self.layout, self.placement = layout, placement
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.config = cfg = load_model_config(model_dir)
        self.model_name = model_name or Path(model_dir).resolve().name
        self.dtype, self.dtype_name = resolve_dtype(dtype, cfg, self.device), dtype
        self.model_dir, self.engine_config = model_dir, engine_config
        self.reader = CheckpointReader(model_dir)
        self.local_experts = layout.num_workers == 0
        everyone = {layer: range(cfg.num_local_experts) for layer in cfg.moe_layers}
        self.bytes_total = router_bytes(cfg, self.reader) + (
            experts_bytes(cfg, self.reader, everyone) if self.local_experts else 0
        )
        self.collective_timeout_s = collective_timeout_s
        self.monitor = WorkerMonitor(on_failure=self._on_worker_failure)
        self.model = self.runner = self.engine = None
        self._loaded = False
        self._rendezvous: Rendezvous | None = None

    # ---- setup -------------------------------------------------------------------------------------------
    async def load(self) -> int:
        """Read the router's weights (every expert too when it has no workers), off the event loop so that
        `load_progress` answers meanwhile; then build the engine and its KV cache. Returns bytes read."""
        await asyncio.to_thread(self._load)
        return self.reader.bytes_read

    def _load(self) -> None:
        engine = Engine.from_checkpoint(
            self.model_dir,
            self.device.type if self.device.index is None else str(self.device),
            self.dtype_name,
            self.engine_config,
            local_experts=self.local_experts,
            reader=self.reader,
            failure=self.monitor.failure,
        )
        self.runner, self.model, self.tokenizer = engine.runner, engine.runner.model, engine.tokenizer
        self.engine = AsyncEngine(engine)
        self._loaded = True

    def load_progress(self) -> LoadProgress:
        return LoadProgress("router", self.reader.bytes_read, self.bytes_total, self.reader.tensors_read, self._loaded)

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    def open_rendezvous(self):
        backend = backend_for(self.device)
        self._rendezvous = Rendezvous(self.layout.world_size, backend, self.collective_timeout_s)
        return self._rendezvous.address

    def join(self) -> int:
        assert self._rendezvous is not None, "open_rendezvous() first"
        groups = join_groups(self._rendezvous.address, 0, store=self._rendezvous.store)
        self.runner.transport = AllToAllTransport(
            self.layout, groups, self.placement, self.config.hidden_size, self.device, self.dtype
        )
        return 0

    def start_workers(self, workers: list) -> None:
        """Start each worker's persistent loop; the monitor watches those calls for death or errors."""
        self.workers = workers
        self.monitor.watch({w: handle.run_loop.remote() for w, handle in enumerate(workers)})

    def _on_worker_failure(self, reason: str) -> None:
        log.error("%s", reason)
        if backend_for(self.device) == "nccl":
            abort_groups()  # NCCL would wait for the timeout; gloo already failed with the peer's socket

    # ---- requests ----------------------------------------------------------------------------------------
    async def generate_stream(self, request: EngineRequest):
        """Deltas, then one Final (call with `.options(num_returns="streaming")`)."""
        async for item in self.engine.generate(request):
            yield item

    async def generate(self, request: EngineRequest) -> dict:
        return await collect(self.engine.generate(request))

    async def generate_batch(self, requests: list[EngineRequest]) -> list[dict]:
        """All requests at once, as one continuous batch; results in the order given."""
        return list(await asyncio.gather(*(collect(self.engine.generate(r)) for r in requests)))

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def forward_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits of every position of one fresh sequence (for parity checks); CPU float32."""
        batch = ForwardBatch((SeqSlice(0, len(ids), 0, 0),))
        logits = self.runner.forward(torch.tensor(ids, device=self.device), batch, ContiguousKVCache(), all_logits=True)
        return logits.float().cpu()

    # ---- operations --------------------------------------------------------------------------------------
    def model_info(self) -> dict:
        """What the gateway needs to validate requests and answer GetModelInfo."""
        cfg, engine = self.config, self.engine.engine
        return {
            "name": self.model_name,
            "architecture": cfg.architecture,
            "context_length": engine.limits.max_model_len,
            "vocab_size": cfg.vocab_size,
            "num_experts": cfg.num_local_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "num_layers": cfg.num_hidden_layers,
            "moe_layers": list(cfg.moe_layers),
            "hidden_size": cfg.hidden_size,
            "limits": engine.limits,
            "generation_defaults": engine.defaults,
            "eos_token_ids": sorted(engine.eos_ids),
            "kv_token_capacity": engine.kv.token_capacity,
            "kv_bytes_per_token": engine.kv.full_bytes_per_token + engine.kv.chunk_bytes_per_token,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "workers": self.layout.num_workers,
        }

    def engine_stats(self):
        return self.engine.stats()

    def health(self) -> dict:
        failure = self.monitor.failure() or (self.engine.engine.failure if self.engine else None)
        return {
            "ready": self._loaded and failure is None,
            "failure": failure,
            "workers": self.layout.num_workers,
            "steps": self.runner.steps if self.runner else 0,
        }

    def stats(self) -> dict:
        moe = (
            [(layer, m.feed_forward) for layer, m in enumerate(self.model.model.layers) if m.is_moe]
            if self.model
            else []
        )
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "bytes_read": self.bytes_read,
            "steps": self.runner.steps if self.runner else 0,
            # routed tokens per expert since start (every expert's, wherever it lives)
            "tokens_per_expert": {layer: ff.tokens_per_expert.tolist() for layer, ff in moe},
            "placement": self.placement.describe() if self.placement else None,
        }

    def shutdown(self, timeout_s: float = 10.0) -> None:
        transport = self.runner.transport if self.runner else None
        self.monitor.stopping()
        if self.engine:
            self.engine.shutdown()
        if isinstance(transport, AllToAllTransport) and self.monitor.failure() is None:
            with self.runner.lock:
                try:
                    transport.send_header(STOP)
                except Exception as e:  # noqa: BLE001 - shutting down anyway
                    log.warning("could not send STOP to the workers: %s", e)
            self.monitor.wait_all(timeout_s)
        leave_groups()
