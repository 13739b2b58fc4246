"""The expert worker: holds one slot's experts of every MoE layer and serves them to every router.

Life: created by the launcher (one GPU each on a GPU cluster) into its slot's placement-group bundle -> `load`
(its experts only, with progress) -> per router, `serve(router, address, rank)`: one Ray call per epoch of that
router's group, which joins the group and follows the router's steps (per step: a header, then for each MoE
layer receive rows, run the experts, reply) until the router says STOP or REGROUP, or the group breaks (FENCED: a
peer died or the router closed the group); it returns a LoopEnd saying which (cluster/actor_state.py). The router
then calls `serve` again with the next epoch's group. Ray calls besides: `fence`, `prepare_map`/`retire_maps`
(rebalancing), `ping`, `stats`, `wait_stopped` (returns at shutdown; its ObjectRef tells the supervisor when this
actor dies), never one per token.

A worker holds no request state: it can die at any point and a replacement in the same slot serves the same
experts, while the routers replay the step that was in flight.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time

import ray
import torch

from cluster.actor_reports import Pong, WorkerStats
from cluster.actor_state import FENCED, REGROUPED, STOPPED, ActorKind, LoopEnd, LoopEndKind, MemberState
from cluster.all_to_all import REGROUP, RUN, STOP, AllToAllTransport
from cluster.checkpoint import CheckpointReader
from cluster.config import load_model_config
from cluster.errors import CollectiveError
from cluster.expert_map import ExpertMap, PlacementError
from cluster.load_progress import LoadProgress
from cluster.log_format import setup_logging
from cluster.process_group import ChannelGroups, GroupAddress
from cluster.weight_bytes import expert_bytes
from cluster.weights import experts_bytes, experts_fp8, resolve_dtype
from workers.expert_store import ExpertStore

log = logging.getLogger(__name__)


class ExpertWorker:
    def __init__(
        self,
        model_dir: str,
        slot: int,
        expert_map: ExpertMap,
        device: str = "cpu",
        dtype: str = "auto",
        expert_dtype: str = "auto",
        bind_host: str | None = "127.0.0.1",
        load_delay_s: float = 0.0,
        log: tuple[str, str] = ("INFO", "text"),
    ):
        """Cheap: reads config.json and the checkpoint's headers, and checks the experts fit the device.
        `load()` reads the weights. `bind_host`: where its sockets listen (None: this node's IP). `log`: (level,
        format) as the serve config's. `load_delay_s` slows loading down (fault-injection tests only).
        `expert_dtype`: how the experts are held (auto: as stored; fp8: quantized on load; model: `dtype`)."""
        setup_logging(*log)
        self.slot, self.expert_map = slot, expert_map
        self.bind_host = bind_host or ray.util.get_node_ip_address()
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)  # Ray exposes exactly this actor's GPU
        self.config = cfg = load_model_config(model_dir)
        self.dtype = resolve_dtype(dtype, cfg, self.device)
        self.reader = CheckpointReader(model_dir)
        self.fp8 = experts_fp8(self.reader, cfg, expert_dtype)
        self.bytes_total = experts_bytes(cfg, self.reader, expert_map.slot_experts(slot))
        held = expert_bytes(cfg, self.fp8, torch.finfo(self.dtype).bits // 8)
        _check_fits(self.device, held * sum(len(e) for e in expert_map.slot_experts(slot).values()), slot)
        self.store = ExpertStore(cfg, self.reader, slot, self.device, self.dtype, expert_dtype)
        self.load_delay_s = load_delay_s
        self.state = MemberState.LOADING
        self.steps = 0
        self.channels: dict[int, AllToAllTransport] = {}
        self._channels_lock = threading.Lock()
        self._stopped = threading.Event()

    # ---- setup -------------------------------------------------------------------------------------------
    def load(self) -> int:
        """Read this slot's experts (and nothing else) from the checkpoint; returns bytes read."""
        started = time.perf_counter()
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        self.store.load(self.expert_map)
        self.state = MemberState.JOINING
        log.info(
            "worker slot %d loaded %d experts (%.1f MB) in %.2fs",
            self.slot,
            sum(len(e) for e in self.expert_map.slot_experts(self.slot).values()),
            self.store.bytes_resident / 1e6,
            time.perf_counter() - started,
        )
        return self.reader.bytes_read

    def load_progress(self) -> LoadProgress:
        return LoadProgress(
            f"worker {self.slot}",
            self.reader.bytes_read,
            self.bytes_total,
            self.reader.tensors_read,
            self.state is not MemberState.LOADING,
        )

    # ---- serving -----------------------------------------------------------------------------------------
    def serve(self, router: int, address: GroupAddress, rank: int) -> LoopEnd:
        """Join router `router`'s group for one epoch and follow its steps; returns how it ended (STOPPED, REGROUP
        or FENCED). Raises only on a bug (the router then treats this worker as failed)."""
        try:
            groups = ChannelGroups.join(address, rank, self.bind_host)
        except (RuntimeError, CollectiveError) as e:  # torch's rendezvous failed (a peer died before the group
            # formed): the router forms the next one
            log.warning("worker slot %d: router %d's group %s did not form: %s", self.slot, router, address.prefix, e)
            return LoopEnd(LoopEndKind.FENCED, f"router {router}'s group {address.prefix} did not form: {e}")
        transport = AllToAllTransport(groups, self.config.hidden_size, self.device, self.dtype)
        with self._channels_lock:
            old = self.channels.pop(router, None)
            self.channels[router] = transport
        if old is not None:
            old.groups.close()
        self.state = MemberState.SERVING
        try:
            return self._follow(router, transport)
        finally:
            transport.groups.close()
            with self._channels_lock:
                if self.channels.get(router) is transport:
                    del self.channels[router]

    def _follow(self, router: int, transport: AllToAllTransport) -> LoopEnd:
        while True:
            try:
                command, _, generation = transport.receive_header()
                if command == STOP:
                    return STOPPED
                if command == REGROUP:
                    return REGROUPED
                assert command == RUN, f"unknown step command {command}"
                expert_map, shards = self.store.generation(generation)
                transport.serve_step(expert_map, shards, functools.partial(self.store.count, generation))
                self.steps += 1
            except CollectiveError as e:
                log.info(
                    "worker slot %d: router %d's group ended at its step %d: %s", self.slot, router, transport.steps, e
                )
                return FENCED

    def fence(self, router: int) -> None:
        """Close this worker's side of router `router`'s current group (a member died); unblocks NCCL."""
        with self._channels_lock:
            transport = self.channels.get(router)
        if transport is not None:
            transport.groups.close()

    # ---- rebalancing -------------------------------------------------------------------------------------
    def prepare_map(self, expert_map: ExpertMap) -> int:
        """Hold the new generation's experts too (reading only the ones not held); serving goes on meanwhile.
        Returns the bytes read so far in all."""
        self.store.load(expert_map)
        return self.reader.bytes_read

    def retire_maps(self, keep: int) -> None:
        self.store.retire(keep)

    # ---- operations --------------------------------------------------------------------------------------
    def ping(self) -> Pong:
        return Pong(ActorKind.WORKER, self.slot, os.getpid(), self.state, self.steps)

    def wait_stopped(self) -> None:
        """Returns when the worker shuts down; the supervisor holds its ObjectRef to learn of the actor's death."""
        self._stopped.wait()

    def stats(self) -> WorkerStats:
        return WorkerStats(
            slot=self.slot,
            pid=os.getpid(),
            state=self.state,
            device=str(self.device),
            generation=self.store.latest if self.store.shards else -1,
            experts=self.store.holdings() if self.store.shards else {},
            bytes_resident=self.store.bytes_resident,
            expert_dtype=self.store.weight_dtype,
            bytes_read=self.reader.bytes_read,
            tokens_per_expert=self.store.token_counts() if self.store.shards else {},
            steps=self.steps,
            routers=tuple(sorted(self.channels)),
        )

    def shutdown(self) -> None:
        with self._channels_lock:
            channels = list(self.channels.values())
        for transport in channels:
            transport.groups.close()
        self._stopped.set()


def _check_fits(device: torch.device, resident_bytes: int, slot: int) -> None:
    """Before any weight is read: the slot's experts must fit the device's free memory."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if resident_bytes > free:
        raise PlacementError(
            f"cluster.expert_replicas / cluster.placement: worker slot {slot} would hold "
            f"{resident_bytes / 2**30:.1f} GiB of experts but its GPU has {free / 2**30:.1f} GiB free; use fewer "
            "replicas, more workers, or a smaller dtype"
        )
