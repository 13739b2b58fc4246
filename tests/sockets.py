"""Listening TCP sockets of a process tree, read from /proc (what `ss -ltnp` shows, without needing ss or root):
which address each process listens on, so a test can say "nothing here listens beyond loopback"."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from tests.procs import _cmdline, descendants


@dataclass(frozen=True)
class Listening:
    pid: int
    process: str  # its command line, the program without its directory
    address: str
    port: int

    @property
    def loopback_only(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket is still loopback
        return (mapped or ip).is_loopback

    def __str__(self) -> str:
        return f"{self.process} (pid {self.pid}) on {self.address}:{self.port}"


def listening_sockets(root: int) -> list[Listening]:
    """Every listening TCP socket (IPv4 and IPv6) held by `root` or any of its descendants."""
    by_inode = _listening_by_inode()
    found = set()
    for pid in [root, *descendants(root)]:
        for inode in _socket_inodes(pid):
            if inode in by_inode:
                found.add(Listening(pid, _program(pid), *by_inode[inode]))
    return sorted(found, key=lambda s: (s.pid, s.port))


def _program(pid: int) -> str:
    program, _, rest = _cmdline(pid).strip().partition(" ")
    return f"{os.path.basename(program)} {rest}"[:80].strip()


def _listening_by_inode() -> dict[str, tuple[str, int]]:
    table = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints host-order words
            table[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return table


def _socket_inodes(pid: int) -> list[str]:
    inodes = []
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return []
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.append(target[len("socket:[") : -1])
    return inodes
