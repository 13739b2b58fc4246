"""Self-healing on a real local Ray: an expert worker killed (SIGKILL), stopped (SIGSTOP) or lost while its
replacement loads costs no request and changes no token; replacements restore full strength; rebalancing a
skewed load evens the workers out while requests run. Every test ends with no Ray process left.

Each fault comes once every request has a token and tokens left (never after a fixed delay, which a fast machine
outruns), and each test checks from the token arrival times that every request got tokens before and after it."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
import ray

from cluster.actor_state import ActorKind, MemberState
from deploy.bench.interruption import StreamLog, interrupted, kill_when_ready, ready_to_kill, too_late
from deploy.bench.models import skew_gates
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from deploy.tiny.model import write_tiny_model
from router.engine.config import EngineConfig
from router.request.messages import Delta, EngineRequest
from router.request.sampling_params import SamplingParams
from tests.procs import pid_of
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_left")]
TOKENS = 160
GREEDY = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)


def seeded(seed: int) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, seed=seed, max_tokens=TOKENS, ignore_eos=True)


def requests() -> list[EngineRequest]:
    """8 concurrent requests, greedy and seeded, with different prompts."""
    return [
        EngineRequest(uuid.uuid4().hex, GREEDY if i % 2 else seeded(i), prompt_ids=(1, 5 + i, 9, 40 + i))
        for i in range(8)
    ]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tokens of an undisturbed run, from a cluster of the same shape."""
    with Deployment.start(DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2), show_progress=False)) as d:
        return [r["token_ids"] for r in d.generate_batch(requests())]


class Streams:
    """The 8 requests streamed from router 0, each on a thread: its tokens' arrival times (a StreamLog) and its
    result as generate_batch gives it."""

    def __init__(self, deployment, batch: list[EngineRequest] | None = None):
        batch = batch or requests()
        self.logs = [StreamLog(r.params.max_tokens) for r in batch]
        self.results: list[dict] = [{} for _ in batch]
        self.threads = [
            threading.Thread(target=self._run, args=(deployment.router, i, r), daemon=True) for i, r in enumerate(batch)
        ]
        for t in self.threads:
            t.start()

    def _run(self, router, i: int, request: EngineRequest) -> None:
        token_ids = []
        try:
            for ref in router.generate_stream.options(num_returns="streaming").remote(request):
                item = ray.get(ref, timeout=300)
                if isinstance(item, Delta):
                    token_ids += item.token_ids
                    self.logs[i].add(len(item.token_ids))
                else:
                    self.results[i] = {"token_ids": token_ids, "finish_reason": item.finish_reason, "error": item.error}
        except Exception as e:  # noqa: BLE001 - reported by assert_complete_and_identical
            self.results[i] = {"token_ids": token_ids, "finish_reason": "raised", "error": repr(e)}
        finally:
            self.logs[i].done = True

    @property
    def times(self) -> list[list[float]]:
        return [log.times for log in self.logs]

    def when_generating(self, act, after: float | None = None) -> float:
        """act() once every request has a token (after `after`, when given) and tokens left; when it did."""
        fresh = lambda: after is None or all(log.times and log.times[-1] > after for log in self.logs)  # noqa: E731
        return kill_when_ready(lambda: fresh() and ready_to_kill(self.logs), lambda: too_late(self.logs), act)

    def when_first_token(self, act) -> float:
        """act() once the first request has a token while the others still prefill or decode; when it did."""
        first = lambda: any(log.tokens for log in self.logs)  # noqa: E731
        return kill_when_ready(first, lambda: any(log.done for log in self.logs), act)

    def join(self) -> list[dict]:
        for t in self.threads:
            t.join(timeout=300)
        return self.results


def run_while(deployment, action, batch: list[EngineRequest] | None = None) -> tuple[list[dict], list[list[float]]]:
    """Stream the 8 requests (or `batch`) while `action(streams)` runs on a thread of its own: (results, arrival
    times)."""
    streams = Streams(deployment, batch)
    actor = threading.Thread(target=action, args=(streams,))
    actor.start()
    try:
        return streams.join(), streams.times
    finally:
        actor.join(timeout=120)


def sigkill(pid: int):
    return lambda: os.kill(pid, signal.SIGKILL)


def wait_all_serving(deployment) -> None:
    """Wait until every slot serves again (a replacement loaded for each one that died)."""
    wait_for(
        lambda: all(s.state is MemberState.SERVING for s in deployment.supervision().slots),
        what="the cluster to recover",
    )


def assert_complete_and_identical(results, reference):
    assert [r["finish_reason"] for r in results] == ["length"] * 8, [r.get("error") for r in results]
    assert [r["token_ids"] for r in results] == reference


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_killed_worker_costs_no_request_and_no_token(tiny_model_dir, reference, replicas):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2, expert_replicas=replicas), show_progress=False)
    with Deployment.start(spec) as d:
        victim, killed = pid_of(d.workers[1]), []
        results, times = run_while(d, lambda s: killed.append(s.when_generating(sigkill(victim))))
        assert_complete_and_identical(results, reference)
        assert interrupted(times, killed[0])
        wait_all_serving(d)
        channel = d.stats().router.channel
        assert channel.failovers >= 1 and channel.members == (0, 1)
        assert d.supervision().counters.replacements_succeeded == 1
        if replicas == 2:
            assert min(channel.stalls_s) < 1.0  # the surviving copies cover at once
        assert [r["token_ids"] for r in d.generate_batch(requests())] == reference  # full strength again


def prefix_requests() -> list[EngineRequest]:
    """8 requests behind one 480-token prefix, greedy and seeded: with 48 tokens a step their prefill spans dozens of
    steps, and the later ones reuse the blocks the first ones completed."""
    prefix = tuple(3 + (7 * i) % 250 for i in range(480))
    return [
        EngineRequest(uuid.uuid4().hex, GREEDY if i % 2 else seeded(i), prompt_ids=(*prefix, 5 + i, 9, 40 + i))
        for i in range(8)
    ]


def test_a_worker_killed_mid_prefill_with_the_prefix_cache_changes_no_token(tiny_model_dir):
    """A step replayed after a worker's death names no block before it completes: every stream gets the tokens of
    a cache-off run, during the failover and again when the whole prefix comes from the cache."""

    def spec(caching: bool) -> DeploymentSpec:
        engine = EngineConfig(max_num_seqs=8, max_num_batched_tokens=48, prefix_caching=caching)
        return DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2), engine, show_progress=False)

    with Deployment.start(spec(False)) as d:
        reference = [r["token_ids"] for r in d.generate_batch(prefix_requests(), timeout_s=300)]
    with Deployment.start(spec(True)) as d:
        victim = pid_of(d.workers[1])
        results, _ = run_while(d, lambda s: s.when_first_token(sigkill(victim)), prefix_requests())
        assert_complete_and_identical(results, reference)
        assert d.stats().router.channel.failovers >= 1
        assert [r["token_ids"] for r in d.generate_batch(prefix_requests(), timeout_s=300)] == reference
        engine = ray.get(d.router.engine_stats.remote(), timeout=30)
        assert engine.cached_tokens >= 8 * 480 - 64 and engine.kv_blocks_used == 0


def test_two_workers_killed_one_after_the_other(tiny_model_dir, reference):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=3, expert_replicas=2), show_progress=False)
    with Deployment.start(spec) as d:
        first, second, killed = pid_of(d.workers[0]), pid_of(d.workers[2]), []

        def kill_twice(streams):
            killed.append(streams.when_generating(sigkill(first)))
            killed.append(streams.when_generating(sigkill(second), after=killed[0]))  # once tokens flow again

        results, times = run_while(d, kill_twice)
        assert_complete_and_identical(results, reference)
        assert interrupted(times, killed[0], until=killed[1]) and interrupted(times, killed[1])
        wait_all_serving(d)
        assert d.supervision().counters.replacements_succeeded == 2


def test_a_kill_while_a_replacement_loads_and_a_kill_of_the_replacement(tiny_model_dir, reference):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2), show_progress=False, replacement_load_delay_s=3.0)
    with Deployment.start(spec) as d:
        first, killed = pid_of(d.workers[1]), []

        def faults(streams):
            killed.append(streams.when_generating(sigkill(first)))  # slot 1 dies; its replacement takes 3 s to load
            wait_for(lambda: d.supervision().slots[1].state is MemberState.LOADING, what="the replacement to start")
            os.kill(pid_of(d.workers[1]), signal.SIGKILL)  # the replacement dies while loading
            time.sleep(0.5)
            os.kill(pid_of(d.workers[0]), signal.SIGKILL)  # and slot 0 dies while the next one loads

        results, times = run_while(d, faults)
        assert_complete_and_identical(results, reference)
        assert interrupted(times, killed[0])  # the streams were held through all three, then went on
        wait_all_serving(d)
        counters = d.supervision().counters
        assert counters.replacements_failed == 1 and counters.replacements_succeeded == 2


def test_a_worker_that_stops_answering_is_detected_killed_and_replaced(tiny_model_dir, reference):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2, hang_timeout_s=1.0), show_progress=False)
    with Deployment.start(spec) as d:
        victim = pid_of(d.workers[0])
        stopped_at = []

        def stop(streams):
            stopped_at.append(streams.when_generating(lambda: os.kill(victim, signal.SIGSTOP)))

        try:
            results, times = run_while(d, stop)
        finally:
            try:
                os.kill(victim, signal.SIGCONT)  # if it still exists (it should have been killed)
            except ProcessLookupError:
                pass
        assert_complete_and_identical(results, reference)
        assert interrupted(times, stopped_at[0])
        wait_all_serving(d)
        assert d.supervision().counters.died(ActorKind.WORKER) == 1
        with pytest.raises(ProcessLookupError):
            os.kill(victim, 0)  # killed, not just waited out


@pytest.fixture(scope="module")
def skewed_model_dir(tmp_path_factory):
    """A tiny model whose gates send every token to expert 0 or 1 in every MoE layer."""
    path = write_tiny_model(tmp_path_factory.mktemp("skewed"), "scout", train_steps=0)
    skew_gates(str(path), hot=(0, 1))
    return str(path)


def worker_loads(deployment) -> list[int]:
    return [sum(sum(c.values()) for c in s.tokens_per_expert.values()) for s in deployment.stats().workers]


def test_rebalancing_a_skewed_load_evens_the_workers_while_requests_run(skewed_model_dir):
    cluster = ClusterConfig(workers=4, redundant_experts_per_worker=2)
    with Deployment.start(DeploymentSpec(skewed_model_dir, cluster, show_progress=False)) as d:
        reference = [r["token_ids"] for r in d.generate_batch(requests())]
        before = worker_loads(d)
        assert max(before) / (sum(before) / 4) > 3.5  # worker 0 holds experts 0 and 1: it does all the work
        plans, started = [], []
        results, times = run_while(d, lambda s: started.append(s.when_generating(lambda: plans.append(d.rebalance()))))
        assert_complete_and_identical(results, reference)  # nothing failed during the switch
        assert interrupted(times, started[0])
        plan = plans[0]
        assert plan is not None and plan.after < plan.before
        assert d.stats().router.channel.map_generation == plan.expert_map.generation == 1
        mark = worker_loads(d)
        assert [r["token_ids"] for r in d.generate_batch(requests())] == reference
        after = [b - a for a, b in zip(mark, worker_loads(d))]
        assert max(after) / (sum(after) / 4) < 1.5  # the hot experts' copies share the load
