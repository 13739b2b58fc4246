"""The router actor: the attention side of the cluster. Holds the model (minus routed experts), the KV cache, the
scheduler and the sampler; reaches the experts through its channel to the expert workers (with failover), or
in-process when the deployment has no workers.

Life: created by the launcher -> `load` (weights, with progress; the engine starts) -> `connect(workers)` (opens
its rendezvous and forms the first group with every worker) -> requests -> `shutdown` (STOP, group closed).
From the supervisor, while serving: `admit_worker` (a replacement loaded its experts), `use_map` (a rebalanced
map every worker now holds), `fail_cluster` (the supervisor gave up: requests end with its reason),
`use_vision_encoders` (the vision encoder actors, at start and for each replacement), `give_up_vision`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import ray
import torch

from cluster.actor_reports import RouterHealth, RouterStats
from cluster.actor_state import ChannelState
from cluster.all_to_all import AllToAllTransport
from cluster.batch import ForwardBatch, SeqSlice
from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.expert_map import ExpertMap
from cluster.load_progress import LoadProgress
from cluster.log_format import setup_logging
from cluster.process_group import ChannelGroups, Rendezvous, backend_for
from cluster.vision.weights import vision_config_of, vision_tower_bytes
from cluster.weights import experts_bytes, resolve_dtype, router_bytes
from router.engine.async_engine import AsyncEngine, collect
from router.engine.config import EngineConfig
from router.engine.engine import Engine
from router.experts.channel import ExpertChannel
from router.experts.settings import ChannelSettings
from router.experts.worker_link import RayWorkerLink
from router.images.encoder_pool import EncoderPool, RayEncoderLink
from router.images.features import VisionSettings, image_features_for
from router.reference.contiguous_cache import ContiguousKVCache
from router.request.messages import EngineRequest
from router.request.model_info import ModelInfo

log = logging.getLogger(__name__)


class RouterActor:
    def __init__(
        self,
        model_dir: str,
        expert_map: ExpertMap | None,
        device: str = "cpu",
        dtype: str = "auto",
        engine_config: EngineConfig = EngineConfig(),
        model_name: str | None = None,
        channel: ChannelSettings = ChannelSettings(),
        collective_timeout_s: float = 60.0,
        bind_host: str | None = "127.0.0.1",
        router_id: int = 0,
        log: tuple[str, str] = ("INFO", "text"),
        vision: VisionSettings = VisionSettings(),
        expert_dtype: str = "auto",
    ):
        """`expert_map` None: every expert in this process. `bind_host` None: this node's IP (a cluster that
        spans nodes); "127.0.0.1" in a private local cluster. `log`: (level, format) as the serve config's.
        `vision`: how images are encoded (by this process when `vision.encoders` is 0). `expert_dtype`: how the
        experts are held when this router holds them (cluster/weights.py)."""
        setup_logging(*log)
        self.expert_map, self.router_id = expert_map, router_id
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.config = cfg = load_model_config(model_dir)
        self.model_name = model_name or Path(model_dir).resolve().name
        self.dtype, self.dtype_name = resolve_dtype(dtype, cfg, self.device), dtype
        self.model_dir, self.engine_config, self.expert_dtype = model_dir, engine_config, expert_dtype
        self.channel_settings, self.collective_timeout_s = channel, collective_timeout_s
        self.bind_host = bind_host or ray.util.get_node_ip_address()
        self.reader = CheckpointReader(model_dir)
        self.local_experts = expert_map is None
        everyone = {layer: range(cfg.num_local_experts) for layer in cfg.moe_layers}
        self.vision_settings = vision
        vision_cfg = vision_config_of(model_dir, self.reader)
        self.bytes_total = router_bytes(cfg, self.reader) + (
            experts_bytes(cfg, self.reader, everyone) if self.local_experts else 0
        )
        if vision_cfg is not None and vision.encoders == 0:
            self.bytes_total += vision_tower_bytes(vision_cfg, self.reader)
        self.model = self.runner = self.engine = self.channel = self.images = None
        self._loaded = False
        self._stopped = asyncio.Event()

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
            expert_dtype=self.expert_dtype,
        )
        self.runner, self.model, self.tokenizer = engine.runner, engine.runner.model, engine.tokenizer
        device = self.device.type if self.device.index is None else str(self.device)
        self.images = image_features_for(self.model_dir, self.vision_settings, device, self.dtype_name, self.reader)
        self.engine = AsyncEngine(engine, self.images)
        self._loaded = True

    def load_progress(self) -> LoadProgress:
        return LoadProgress("router", self.reader.bytes_read, self.bytes_total, self.reader.tensors_read, self._loaded)

    @property
    def bytes_read(self) -> int:
        return self.reader.bytes_read

    async def connect(self, workers: dict[int, object]) -> int:
        """Open this router's rendezvous and form its first group with the workers (slot -> handle); returns the
        epoch. Off the event loop: while it waits (every worker must join; if an expert has no live copy it holds
        until one is admitted) the actor still answers health checks and admissions."""
        rendezvous = Rendezvous(self.bind_host, self.collective_timeout_s)
        backend = backend_for(self.device)
        self.channel = ExpertChannel(
            self.router_id,
            self.expert_map,
            {slot: RayWorkerLink(slot, handle) for slot, handle in workers.items()},
            address_for=lambda world, prefix: rendezvous.address(world, backend, prefix),
            join=lambda address: ChannelGroups.join(address, 0, self.bind_host),
            make_transport=lambda groups: AllToAllTransport(groups, self.config.hidden_size, self.device, self.dtype),
            backend=backend,
            settings=self.channel_settings,
        )
        await asyncio.to_thread(self.channel.open)
        with self.runner.lock:
            self.runner.experts = self.channel
        return self.channel.stats.epoch

    async def load_and_connect(self, workers: dict[int, object], encoders: dict[int, object] | None = None) -> int:
        """A replacement router: load the weights, take the live vision encoders, then connect (without workers:
        load only)."""
        await self.load()
        await self.use_vision_encoders(encoders or {})
        return await self.connect(workers) if self.expert_map is not None else 0

    async def use_vision_encoders(self, encoders: dict[int, object]) -> None:
        """Encode images with these actors (index -> handle); a replacement takes its index's place."""
        pool = self.images.encoder if self.images is not None else None
        if encoders and not isinstance(pool, EncoderPool):
            raise ValueError("this router encodes images itself (cluster.vision_encoders: 0) or takes none")
        for index, handle in encoders.items():
            pool.use(RayEncoderLink(index, handle))

    async def give_up_vision(self, reason: str) -> None:
        """The supervisor gave up on every vision encoder: requests with images end with UNAVAILABLE naming why."""
        if self.images is not None and isinstance(self.images.encoder, EncoderPool):
            self.images.encoder.give_up(reason)

    # ---- from the supervisor -----------------------------------------------------------------------------
    def admit_worker(self, slot: int, handle) -> None:
        self.channel.admit(RayWorkerLink(slot, handle))

    def use_map(self, expert_map: ExpertMap) -> None:
        self.channel.use_map(expert_map)

    def fail_cluster(self, reason: str) -> None:
        if self.channel is not None:
            self.channel.fail(reason)

    async def wait_stopped(self) -> None:
        """Returns when the router shuts down; the supervisor holds its ObjectRef to learn of the actor's death."""
        await self._stopped.wait()

    def channel_members(self) -> tuple[int, ...]:
        """The worker slots in this router's current group."""
        return self.channel.stats.members if self.channel else ()

    def map_generation(self) -> int:
        return self.channel.stats.map_generation if self.channel else 0

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
    def model_info(self) -> ModelInfo:
        """What the gateway needs to validate requests and answer GetModelInfo."""
        cfg, engine = self.config, self.engine.engine
        return ModelInfo(
            name=self.model_name,
            architecture=cfg.architecture,
            context_length=engine.limits.max_model_len,
            vocab_size=cfg.vocab_size,
            num_experts=cfg.num_local_experts,
            experts_per_token=cfg.num_experts_per_tok,
            num_layers=cfg.num_hidden_layers,
            moe_layers=tuple(cfg.moe_layers),
            hidden_size=cfg.hidden_size,
            limits=engine.limits,
            generation_defaults=engine.defaults,
            eos_token_ids=tuple(sorted(engine.eos_ids)),
            kv_token_capacity=engine.kv.token_capacity,
            block_size=engine.kv.block_size,
            prefix_caching=engine.blocks.caching,
            kv_bytes_per_token=engine.kv.full_bytes_per_token + engine.kv.chunk_bytes_per_token,
            dtype=str(self.dtype).replace("torch.", ""),
            device=str(self.device),
            workers=self.expert_map.num_workers if self.expert_map else 0,
            vision=engine.vision,
        )

    def engine_stats(self):
        return self.engine.stats()

    def health(self) -> RouterHealth:
        """Ready while it can take requests: loaded, and its channel serving or recovering (a failover holds
        requests, it does not refuse them)."""
        failure = self.engine.engine.failure if self.engine else None
        if self.expert_map is not None:
            state = self.channel.stats.state if self.channel else ChannelState.STARTING
        else:
            state = ChannelState.SERVING if self._loaded else ChannelState.STARTING
        return RouterHealth(
            ready=self._loaded and failure is None and state.takes_requests,
            failure=failure,
            state=state,
            steps=self.runner.steps if self.runner else 0,
            pid=os.getpid(),
        )

    def stats(self) -> RouterStats:
        moe = (
            [(layer, m.feed_forward) for layer, m in enumerate(self.model.model.layers) if m.is_moe]
            if self.model
            else []
        )
        return RouterStats(
            router=self.router_id,
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
            bytes_read=self.bytes_read,
            steps=self.runner.steps if self.runner else 0,
            # routed tokens per expert since start (every expert's, wherever it lives)
            tokens_per_expert={layer: ff.tokens_per_expert.tolist() for layer, ff in moe},
            expert_map=self.channel.map if self.channel else self.expert_map,
            channel=self.channel.stats if self.channel else None,
            vision=self.images.stats() if self.images else None,
        )

    def shutdown(self) -> None:
        self._stopped.set()
        if self.channel is not None:
            self.channel.fail("the server is shutting down")  # ends a failover hold at once
        if self.engine:
            self.engine.shutdown()
        if self.channel is not None:
            with self.runner.lock:
                self.channel.close()
