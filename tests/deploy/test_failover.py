"""Self-healing on a real local Ray: an expert worker killed (SIGKILL), stopped (SIGSTOP) or lost while its
replacement loads costs no request and changes no token; replacements restore full strength; rebalancing a
skewed load evens the workers out while requests run. Every test ends with no Ray process left."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
import ray

from cluster.actor_state import ActorKind, MemberState
from deploy.bench.models import skew_gates
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from deploy.tiny.model import write_tiny_model
from router.request.messages import EngineRequest
from router.request.sampling_params import SamplingParams

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


def pid_of(worker) -> int:
    return ray.get(worker.ping.remote(), timeout=30).pid


def run_while(deployment, action) -> list[dict]:
    """Run the 8 requests as one batch while `action()` runs on a thread of its own."""
    actor = threading.Thread(target=action)
    actor.start()
    try:
        return deployment.generate_batch(requests(), timeout_s=300)
    finally:
        actor.join(timeout=120)


def wait_for(predicate, timeout_s: float = 60.0, what: str = "the cluster to recover"):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def all_serving(deployment) -> bool:
    return all(s.state is MemberState.SERVING for s in deployment.supervision().slots)


def assert_complete_and_identical(results, reference):
    assert [r["finish_reason"] for r in results] == ["length"] * 8, [r.get("error") for r in results]
    assert [r["token_ids"] for r in results] == reference


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_killed_worker_costs_no_request_and_no_token(tiny_model_dir, reference, replicas):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2, expert_replicas=replicas), show_progress=False)
    with Deployment.start(spec) as d:
        victim = pid_of(d.workers[1])
        results = run_while(d, lambda: (time.sleep(1.0), os.kill(victim, signal.SIGKILL)))
        assert_complete_and_identical(results, reference)
        wait_for(lambda: all_serving(d))
        channel = d.stats().router.channel
        assert channel.failovers >= 1 and channel.members == (0, 1)
        assert d.supervision().counters.replacements_succeeded == 1
        if replicas == 2:
            assert min(channel.stalls_s) < 1.0  # the surviving copies cover at once
        assert [r["token_ids"] for r in d.generate_batch(requests())] == reference  # full strength again


def test_two_workers_killed_one_after_the_other(tiny_model_dir, reference):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=3, expert_replicas=2), show_progress=False)
    with Deployment.start(spec) as d:
        first, second = pid_of(d.workers[0]), pid_of(d.workers[2])

        def kill_twice():
            time.sleep(0.8)
            os.kill(first, signal.SIGKILL)
            time.sleep(0.8)
            os.kill(second, signal.SIGKILL)

        assert_complete_and_identical(run_while(d, kill_twice), reference)
        wait_for(lambda: all_serving(d))
        assert d.supervision().counters.replacements_succeeded == 2


def test_a_kill_while_a_replacement_loads_and_a_kill_of_the_replacement(tiny_model_dir, reference):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2), show_progress=False, replacement_load_delay_s=3.0)
    with Deployment.start(spec) as d:
        first = pid_of(d.workers[1])

        def faults():
            time.sleep(0.8)
            os.kill(first, signal.SIGKILL)  # slot 1 dies; its replacement takes 3 s to load
            wait_for(lambda: d.supervision().slots[1].state is MemberState.LOADING, what="the replacement to start")
            os.kill(pid_of(d.workers[1]), signal.SIGKILL)  # the replacement dies while loading
            time.sleep(0.5)
            os.kill(pid_of(d.workers[0]), signal.SIGKILL)  # and slot 0 dies while the next one loads

        assert_complete_and_identical(run_while(d, faults), reference)
        wait_for(lambda: all_serving(d))
        counters = d.supervision().counters
        assert counters.replacements_failed == 1 and counters.replacements_succeeded == 2


def test_a_worker_that_stops_answering_is_detected_killed_and_replaced(tiny_model_dir, reference):
    spec = DeploymentSpec(tiny_model_dir, ClusterConfig(workers=2, hang_timeout_s=1.0), show_progress=False)
    with Deployment.start(spec) as d:
        victim = pid_of(d.workers[0])
        stopped_at = []

        def stop():
            time.sleep(0.8)
            os.kill(victim, signal.SIGSTOP)
            stopped_at.append(time.monotonic())

        try:
            results = run_while(d, stop)
        finally:
            try:
                os.kill(victim, signal.SIGCONT)  # if it still exists (it should have been killed)
            except ProcessLookupError:
                pass
        assert_complete_and_identical(results, reference)
        wait_for(lambda: all_serving(d))
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
        plans = []
        results = run_while(d, lambda: (time.sleep(0.5), plans.append(d.rebalance())))
        assert_complete_and_identical(results, reference)  # nothing failed during the switch
        plan = plans[0]
        assert plan is not None and plan.after < plan.before
        assert d.stats().router.channel.map_generation == plan.expert_map.generation == 1
        mark = worker_loads(d)
        assert [r["token_ids"] for r in d.generate_batch(requests())] == reference
        after = [b - a for a, b in zip(mark, worker_loads(d))]
        assert max(after) / (sum(after) / 4) < 1.5  # the hot experts' copies share the load
