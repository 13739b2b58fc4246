"""The failover-stall histogram's buckets: the router's channel counts each failover's stall into them and the
gateway exports them as Prometheus buckets, so both sides read the bounds from here."""

from __future__ import annotations

STALLS_KEPT = 256  # the latest stalls a channel keeps, one figure each
STALL_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # upper bounds, seconds
