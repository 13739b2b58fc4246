"""What the gateway needs of the cluster it fronts, whoever started it (deploy/deployment.py's Deployment in
production): the router's handle, the current actor of every worker slot and vision encoder, and the supervisor's
status."""

from __future__ import annotations

from typing import Protocol

from cluster.actor_reports import SupervisorStatus


class ClusterView(Protocol):
    router: object  # the RouterActor handle

    @property
    def workers(self) -> list:
        """The current actor of every worker slot, in slot order (empty: the router holds every expert)."""

    @property
    def encoders(self) -> list:
        """The current actor of every vision encoder (empty: the routers encode images themselves, or none)."""

    def supervision(self) -> SupervisorStatus | None:
        """The supervisor's status (Supervisor.status()), or None without workers."""

    def rebalance(self):
        """Rebalance now (Supervisor.rebalance(): a RebalancePlan, or None when nothing would improve);
        raises RuntimeError when there is nothing to rebalance."""
