"""When an expert worker dies under a live stream, the gateway says so: the stream ends with an Error message
and UNAVAILABLE, readiness turns NOT_SERVING, and new generations are refused with UNAVAILABLE (never a hang).
A server of its own: this test breaks its cluster."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
import ray

from deploy.config import parse_serve_config
from deploy.server import Server
from protos.client import InferenceClient
from protos.client_types import GenerationError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    os.environ["RAY_AUTH_MODE"] = "disabled"
    model_dir = write_tiny_model(tmp_path_factory.mktemp("tiny-scout"), "scout", train_steps=0)
    srv = Server(
        parse_serve_config(
            {
                "model": {"path": str(model_dir)},
                "cluster": {"workers": 1},
                "gateway": {"port": 0, "poll_interval_s": 0.2},
            }
        )
    )
    try:
        yield srv.start()
    finally:
        srv.stop(grace_s=2.0)


def test_a_worker_dying_mid_stream_ends_it_with_unavailable_and_readiness_drops(server):
    with InferenceClient(server.target) as client:
        client.wait_until_serving(timeout=30)
        gen = client.generate(input_ids=[1, 2, 3], max_tokens=1500, temperature=0.0, ignore_eos=True)
        got, errors = [], []

        def read():
            try:
                for chunk in gen:
                    got.extend(chunk.token_ids)
            except GenerationError as e:
                errors.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(server.cluster.workers[0], no_restart=True)
        killed = time.monotonic()
        reader.join(timeout=60)
        assert not reader.is_alive(), "the stream hung after the worker died"
        assert time.monotonic() - killed < 30
        (error,) = errors
        assert error.code == grpc.StatusCode.UNAVAILABLE, error
        assert "worker" in error.message
        deadline = time.monotonic() + 10
        while client.health_status() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.health_status() == "NOT_SERVING"
        assert client.health_status("") == "SERVING"  # the process is alive; it just cannot generate
        with pytest.raises(GenerationError) as refused:
            client.generate_text(input_ids=[1, 2], max_tokens=2, timeout=30)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
