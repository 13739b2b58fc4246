"""Clusters that span Ray nodes, simulated on one machine with `ray start`: the router on the head, the expert
workers on a second node (pinned there by custom resources) serve the one-node run's tokens, and SIGTERM leaves
no actor on either node; a head too small for the actors is refused at once, naming what to change, or, with an
autoscaler watching, the placement waits, says so in the readiness reason, and serves once a node joins."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import yaml
from ray.experimental import internal_kv

from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from deploy.errors import ClusterStartError
from protos.client import InferenceClient
from router.reference.decode import Generator
from router.request.sampling_params import SamplingParams
from tests.conftest import free_port
from tests.procs import descendants_running
from tests.ray_nodes import RayNode

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_ray_left")]
PROMPT = [1, 5, 9, 13, 40]


def pose_as_an_autoscaler() -> None:
    """Set the flag Ray's v2 autoscaler sets in the GCS (as KubeRay's in-tree autoscaling does). The head's own
    read-only monitor, which can add no node, reports under another key."""
    internal_kv._internal_kv_put(
        ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY, b"1", namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    )


def actors_on(node: RayNode) -> list[int]:
    return descendants_running(node.pid, "ray::RouterActor") + descendants_running(node.pid, "ray::ExpertWorker")


def read_line(stream, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        if line:
            return line
        time.sleep(0.05)
    raise TimeoutError("no line from serve")


def test_router_on_the_head_and_workers_on_a_second_node_serve_the_one_node_tokens(tiny_model_dir, tmp_path):
    expected = (
        Generator.from_checkpoint(tiny_model_dir)
        .generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True).with_defaults({}).validate())
        .token_ids
    )
    gcs, port = free_port(), free_port()
    head = RayNode(
        "--head", f"--port={gcs}", "--num-cpus=2", '--resources={"router_node": 1}', "--include-dashboard=false"
    )
    node = None
    try:
        node = RayNode(f"--address=127.0.0.1:{gcs}", "--num-cpus=2", '--resources={"expert_node": 2}')
        config = tmp_path / "two-nodes.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {"path": str(tiny_model_dir)},
                    "cluster": {
                        "workers": 2,
                        "ray_address": f"127.0.0.1:{gcs}",
                        "router_resources": {"resources": {"router_node": 1}},
                        "worker_resources": {"resources": {"expert_node": 1}},
                    },
                    "gateway": {"port": port, "http_port": 0},
                }
            )
        )
        serve = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        )
        try:
            assert read_line(serve.stdout, 180).startswith("moecluster serving"), serve.stderr.read()
            assert len(descendants_running(head.pid, "ray::RouterActor")) == 1
            assert len(descendants_running(node.pid, "ray::ExpertWorker")) == 2
            assert not descendants_running(node.pid, "ray::RouterActor")
            with InferenceClient(f"127.0.0.1:{port}") as client:
                got = client.generate_text(input_ids=PROMPT, max_tokens=16, temperature=0.0, ignore_eos=True)
            assert got.token_ids == expected
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(timeout=120) == 0
        finally:
            if serve.poll() is None:
                serve.kill()
        deadline = time.monotonic() + 30
        while actors_on(head) or actors_on(node):
            assert time.monotonic() < deadline, f"actors left after SIGTERM: {actors_on(head) + actors_on(node)}"
            time.sleep(0.5)
    finally:
        for n in (node, head):
            if n is not None:
                n.stop()


def test_a_head_too_small_for_the_actors_is_refused_at_once_naming_what_to_change(tiny_model_dir):
    gcs = free_port()
    head = RayNode("--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false")
    try:
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        spec = DeploymentSpec(
            str(tiny_model_dir), ClusterConfig(workers=2, ray_address=f"127.0.0.1:{gcs}"), show_progress=False
        )
        started = time.monotonic()
        with pytest.raises(ClusterStartError, match=r"need 1\.5 CPU in all, but the Ray cluster has 1.*num_cpus"):
            Deployment.start(spec)
        assert time.monotonic() - started < 10
    finally:
        ray.shutdown()
        head.stop()


def test_with_an_autoscaler_a_pending_placement_is_reported_and_served_once_a_node_joins(tiny_model_dir):
    gcs = free_port()
    head = RayNode("--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=false")
    node = None
    try:
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        pose_as_an_autoscaler()
        heard: list[str] = []
        spec = DeploymentSpec(
            str(tiny_model_dir), ClusterConfig(workers=2, ray_address=f"127.0.0.1:{gcs}"), show_progress=False
        )
        result = {}

        def start():
            result["deployment"] = Deployment.start(spec, on_status=heard.append)

        starter = threading.Thread(target=start)
        starter.start()
        deadline = time.monotonic() + 30
        while not any("the placement group is pending" in m for m in heard):
            assert time.monotonic() < deadline, heard
            time.sleep(0.2)
        assert any("waiting for the autoscaler" in m and "1.5 CPU" in m for m in heard), heard
        node = RayNode(f"--address=127.0.0.1:{gcs}", "--num-cpus=2")  # the autoscaler's new node
        starter.join(timeout=120)
        deployment = result["deployment"]
        try:
            assert (
                deployment.generate(
                    PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True).with_defaults({}).validate()
                )["finish_reason"]
                == "length"
            )
        finally:
            deployment.stop()
    finally:
        ray.shutdown()
        for n in (node, head):
            if n is not None:
                n.stop()
