"""The process groups of one channel: a router and the expert workers it reaches.

Each router has groups of its own with the workers (per-router communicators; docs/design.md says why): rank 0
is the router, ranks 1..n the live member slots in ascending order. A group lives for one *epoch*: any change of
membership (a death, a replacement joining) forms a new group under a fresh store prefix, and the old one is
closed. The router opens one TCPStore for its life (port 0: the OS picks) and hands its address to the members
through Ray.

Two process groups per epoch, built directly rather than through torch.distributed's global default group, so
that one process can hold a channel per router and replace a broken one without touching the others:
  control: gloo on CPU, the step headers; a long timeout, since idle members wait on it between steps.
  data:    the expert rows; NCCL for CUDA tensors, gloo on CPU; a bounded timeout (the last line of defence: a
           dead peer is normally noticed by the router's monitor first).

Closing a gloo group closes its sockets, so every peer blocked on it fails at once ("Connection closed by peer");
`abort` is what unblocks NCCL, which would otherwise wait for its timeout.
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

CONTROL_TIMEOUT_S = 7 * 24 * 3600.0  # idle members wait this long for the next step header


@dataclass(frozen=True)
class GroupAddress:
    """Created by the router for each epoch, handed to each member through Ray."""

    host: str  # where the router's TCPStore listens
    port: int
    world_size: int  # 1 router + its members
    backend: str  # of the data group: "nccl" or "gloo"
    timeout_s: float  # each data collective
    prefix: str  # "r<router>/e<epoch>": keys of this epoch's groups in the store
    join_timeout_s: float = 30.0  # forming the groups: every rank connects within this


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class Rendezvous:
    """The router's TCPStore, opened once; each epoch's groups use their own key prefix in it. It listens on
    `host` only (a TCPStore given a port listens on every interface, whatever host it is told)."""

    def __init__(self, host: str, timeout_s: float, join_timeout_s: float = 30.0):
        self.host, self.timeout_s, self.join_timeout_s = host, timeout_s, join_timeout_s
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.store = dist.TCPStore(
            host,
            listener.getsockname()[1],
            None,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=join_timeout_s),
            master_listen_fd=listener.detach(),
        )

    def address(self, world_size: int, backend: str, prefix: str) -> GroupAddress:
        return GroupAddress(
            self.host, self.store.port, world_size, backend, self.timeout_s, prefix, self.join_timeout_s
        )


class ChannelGroups:
    """One epoch's control and data process groups, as seen from one rank."""

    def __init__(self, address: GroupAddress, rank: int, control, data):
        self.address, self.rank, self.control, self.data = address, rank, control, data
        self.closed = False

    @classmethod
    def join(cls, address: GroupAddress, rank: int, bind_host: str) -> ChannelGroups:
        """Blocks until every rank of the epoch has joined (bounded by the address's join timeout). `bind_host`:
        the address this rank's own sockets listen on (its node's IP, or 127.0.0.1 in a private local cluster).
        Every join opens a store client of its own: a TCPStore object serves one blocking call at a time, so an
        abandoned join (a peer died while the group formed) must not hold up the next one."""
        join = address.join_timeout_s
        store = dist.TCPStore(
            address.host, address.port, None, is_master=False, timeout=datetime.timedelta(seconds=join)
        )
        prefix = dist.PrefixStore(address.prefix, store)
        # connecting is bounded by the join timeout; each collective then carries its own (see the transport)
        control = _gloo(dist.PrefixStore("control", prefix), rank, address.world_size, bind_host, join)
        if address.backend == "nccl":
            data = _nccl(dist.PrefixStore("data", prefix), rank, address.world_size, address.timeout_s)
        else:
            data = _gloo(dist.PrefixStore("data", prefix), rank, address.world_size, bind_host, join)
        return cls(address, rank, control, data)

    @property
    def world_size(self) -> int:
        return self.address.world_size

    def abort(self) -> None:
        """Unblock collectives stuck on a dead peer: NCCL aborts its communicator (any thread may call this);
        gloo fails on its own when the peer's sockets close. Best effort."""
        if self.address.backend == "nccl":
            try:
                self.data.abort()
            except Exception:  # noqa: BLE001 - nothing more can be done for a broken communicator
                pass

    def close(self) -> None:
        """Close both groups; peers blocked on them fail at once. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.abort()
        for group in (self.data, self.control):
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - already broken: its sockets are gone either way
                pass


def _gloo(store, rank: int, size: int, bind_host: str, timeout_s: float):
    options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    return dist.ProcessGroupGloo(store, rank, size, options)


def _nccl(store, rank: int, size: int, timeout_s: float):
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupNCCL(store, rank, size, options)
