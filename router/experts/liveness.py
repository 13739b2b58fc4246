"""Ping-and-kill: which expert workers still answer, asked of all of them at once (so the wait is one ping
timeout, not one per worker), and a kill for each that does not, which closes its sockets so that a collective
blocked on it fails. The channel uses it while settling and holding, its monitor when a step stalls."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterable

from router.experts.worker_link import WorkerLink

log = logging.getLogger(__name__)


def kill_silent(links: Iterable[WorkerLink], timeout_s: float, router: int, why: str) -> list[WorkerLink]:
    """Ping every link in parallel (each waits at most `timeout_s`); kill the ones that do not answer, logging
    "router R: expert worker W <why>: killing it". Returns the killed ones."""
    links = list(links)
    if not links:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(links)) as pool:
        answers = list(pool.map(lambda link: link.ping(timeout_s), links))
    silent = [link for link, answered in zip(links, answers) if not answered]
    for link in silent:
        log.error("router %d: expert worker %d %s: killing it", router, link.slot, why)
        link.kill()
    return silent
