"""The bounds of a router's channel to its expert workers (from cluster.settings' `cluster` section); the channel
and its monitor both read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChannelSettings:
    join_timeout_s: float = 60.0  # forming a group (every member must join within this)
    hang_timeout_s: float = 5.0  # a step without progress this long: probe the members
    ping_timeout_s: float = 3.0  # a member that does not answer a ping within this is declared hung
    poll_s: float = 0.05  # the monitor's period
