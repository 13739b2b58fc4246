"""The torch.distributed process group spanning routers and expert workers.

Rank layout for M routers and N workers: ranks 0..M-1 are routers, M..M+N-1 workers (worker w is rank M+w).
Rendezvous needs no fixed port: router 0 opens a TCPStore on port 0 (the OS picks a free one) and hands the
address to everyone else. Two groups are formed:
  - data: all_to_all of tokens. NCCL for CUDA tensors, gloo on CPU. Bounded timeout: a stuck collective fails.
  - control: step headers, always gloo on CPU. Long timeout, since idle workers wait on it between steps.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankLayout:
    num_routers: int
    num_workers: int

    @property
    def world_size(self) -> int:
        return self.num_routers + self.num_workers

    def worker_rank(self, worker: int) -> int:
        return self.num_routers + worker

    def worker_of(self, rank: int) -> int:
        return rank - self.num_routers


@dataclass(frozen=True)
class GroupAddress:
    """Created by router 0's `Rendezvous`, handed to every other rank through Ray."""

    host: str
    port: int
    world_size: int
    backend: str
    timeout_s: float
    control_timeout_s: float = 7 * 24 * 3600.0


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def local_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


class Rendezvous:
    """Router 0 opens the store first, so the port is known before anyone joins."""

    def __init__(self, world_size: int, backend: str, timeout_s: float, host: str | None = None):
        host = host or local_ip()
        self.store = dist.TCPStore(
            host, 0, world_size, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        self.address = GroupAddress(host, self.store.port, world_size, backend, timeout_s)


@dataclass
class Groups:
    rank: int
    data: object  # ProcessGroup
    control: object  # ProcessGroup (gloo)


def join_groups(address: GroupAddress, rank: int, store: dist.TCPStore | None = None) -> Groups:
    """Blocks until every rank has joined (bounded by the address's timeout)."""
    timeout = datetime.timedelta(seconds=address.timeout_s)
    if store is None:
        store = dist.TCPStore(address.host, address.port, address.world_size, is_master=False, timeout=timeout)
    if address.backend == "nccl":
        torch.cuda.set_device(torch.cuda.current_device())
    dist.init_process_group(address.backend, store=store, rank=rank, world_size=address.world_size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=address.control_timeout_s))
    return Groups(rank, dist.group.WORLD, control)


def abort_groups() -> None:
    """Unblock collectives stuck on a dead peer (NCCL waits for its timeout otherwise); best effort."""
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - nothing more can be done for a broken group
        pass


def leave_groups() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
