"""Every documented key of the serve config, set to a value other than its default, reaches what uses it: the
actors' constructor arguments and resource requests, the supervisor, Ray's start-up, the engine, the gateway and
its metrics endpoint. The keys are enumerated from the config itself, so a key added without a check here fails."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import threading
import urllib.request

import grpc
import pytest
import yaml

from cluster.settings import to_mapping
from deploy import ray_runtime
from deploy.actor_specs import encoder_spec, router_spec, supervisor_settings, worker_spec
from deploy.config import ServeConfig, load_serve_config
from deploy.deployment import DeploymentSpec
from deploy.tiny.cache import TINY_MODEL_NAME, model_dir_for
from protos.client import InferenceClient
from protos.client_types import GenerationError
from router.engine.engine import Engine
from router.gateway.server import Gateway, gateway_vision
from router.images.decode import ImageLimits
from router.images.processor import ImageProcessor
from router.images.request import VisionPrompt
from router.images.tokens import ImageTokens
from tests.certs import make_certs
from tests.conftest import free_port, make_hf_model

KEY = "a-key-for-the-settings-test-0042"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_hf_model(seed=1, num_local_experts=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def config(model_dir, certs, tmp_path_factory) -> ServeConfig:
    """Every key away from its default (values that still describe a valid CPU cluster)."""
    tmp = tmp_path_factory.mktemp("settings")
    keys = tmp / "api_keys"
    keys.write_text(KEY + "\n")
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32", "name": "renamed", "tiny_preset": "maverick"},
        "cluster": {
            "device": "cuda",
            "routers": 2,
            "workers": 4,
            "expert_replicas": 2,
            "router_resources": {"num_cpus": 0.25, "num_gpus": 1.0, "memory": "64MiB", "resources": {"rt": 1}},
            "worker_resources": {"num_cpus": 0.125, "num_gpus": 1.0, "memory": "32MiB", "resources": {"ex": 2}},
            "placement": None,
            "collective_timeout_s": 17,
            "startup_timeout_s": 123,
            "ray_address": "10.1.2.3:6379",
            "hang_timeout_s": 2.5,
            "max_replacement_failures": 7,
            "replacement_window_s": 44,
            "rebalance_interval_s": 99,
            "redundant_experts_per_worker": 3,
            "vision_encoders": 2,
            "vision_encoder_resources": {"num_cpus": 0.375, "num_gpus": 0.5, "memory": "16MiB", "resources": {"vz": 3}},
            "vision_cache_memory": "3MiB",
        },
        "scheduler": {
            "max_num_seqs": 5,
            "max_num_batched_tokens": 40,
            "max_model_len": 300,
            "block_size": 4,
            "kv_cache_memory": "1MiB",
            "micro_batches": 3,
        },
        "gateway": {
            "host": "localhost",
            "port": free_port(),
            "http_port": free_port(),
            "max_concurrent_streams": 9,
            "max_queued_requests": 11,
            "max_message_bytes": 123456,
            "max_image_bytes": 54321,
            "max_image_pixels": 4_000_000,
            "max_images_per_request": 3,
            "drain_grace_s": 3.5,
            "request_timeout_s": 77,
            "poll_interval_s": 0.2,
            "expert_stats_interval_s": 1.5,
            "ray_timeout_s": 4.5,
            "router_failover_timeout_s": 55,
            "api_keys_file": str(keys),
            "tls": {
                "cert_file": str(certs.server_cert),
                "key_file": str(certs.server_key),
                "client_ca_file": str(certs.ca),
            },
        },
        "metrics": {"enabled": True, "port": free_port(), "host": "127.0.0.1"},
        "logging": {"level": "DEBUG", "format": "json"},
    }
    path = tmp / "everything.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_serve_config(path)


def keys(mapping: dict, prefix: str = "") -> list[str]:
    out = []
    for name, value in mapping.items():
        if isinstance(value, dict) and name != "resources":
            out += keys(value, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_key_is_set_away_from_its_default(config):
    defaults, ours = to_mapping(ServeConfig()), to_mapping(config)
    same = [k for k in keys(defaults) if _at(defaults, k) == _at(ours, k) and k != "cluster.placement"]
    assert same == [], f"still at the default: {same}"


def _at(mapping: dict, key: str):
    for part in key.split("."):
        mapping = mapping[part]
    return mapping


def test_model_and_cluster_keys_reach_the_actors_and_the_supervisor(config, model_dir):
    spec = DeploymentSpec.from_serve(config, str(model_dir))
    expert_map = config.cluster.expert_map(_model_cfg(model_dir))
    router = router_spec(spec, 1, expert_map, None)
    worker = worker_spec(spec, 3, expert_map, None)
    encoder = encoder_spec(spec, 1)
    vision = router.kwargs["vision"]
    c = config.cluster
    reached = {
        "model.path": spec.model_dir
        == str(model_dir)
        == router.kwargs["model_dir"]
        == worker.kwargs["model_dir"]
        == encoder.kwargs["model_dir"],
        "model.dtype": router.kwargs["dtype"] == worker.kwargs["dtype"] == encoder.kwargs["dtype"] == "float32",
        "model.name": router.kwargs["model_name"] == "renamed",
        "cluster.device": router.kwargs["device"] == worker.kwargs["device"] == encoder.kwargs["device"] == "cuda",
        "cluster.routers": (router.bundle, worker.bundle, encoder.bundle) == (1, 2 + 3, 2 + 4 + 1)
        and len(ray_runtime.bundles(c)) == 2 + 4 + 2,
        "cluster.workers": len(ray_runtime.bundles(c)) - c.routers - c.encoders == 4 and expert_map.num_workers == 4,
        "cluster.expert_replicas": expert_map.replicas() == 2 and supervisor_settings(c)["min_copies"] == 2,
        "cluster.router_resources": router.resources == {"num_cpus": 0.25, "num_gpus": 1.0, "memory": 64 * 2**20}
        and ray_runtime.bundles(c)[0]["rt"] == 1,
        "cluster.worker_resources": worker.resources == {"num_cpus": 0.125, "num_gpus": 1.0, "memory": 32 * 2**20}
        and ray_runtime.bundles(c)[c.routers + c.workers - 1]["ex"] == 2,
        "cluster.vision_encoders": vision.encoders == 2 and encoder.kwargs["index"] == 1,
        "cluster.vision_encoder_resources": encoder.resources
        == {"num_cpus": 0.375, "num_gpus": 0.5, "memory": 16 * 2**20}
        and ray_runtime.bundles(c)[-1]["vz"] == 3,
        "cluster.vision_cache_memory": vision.cache_bytes == 3 * 2**20,
        "cluster.collective_timeout_s": router.kwargs["collective_timeout_s"] == 17,
        "cluster.hang_timeout_s": router.kwargs["channel"].hang_timeout_s == vision.hang_timeout_s == 2.5,
        "cluster.startup_timeout_s": supervisor_settings(c)["load_timeout_s"] == vision.wait_s == 123,
        "cluster.max_replacement_failures": supervisor_settings(c)["policy"].max_failures == 7,
        "cluster.replacement_window_s": supervisor_settings(c)["policy"].window_s == 44,
        "cluster.rebalance_interval_s": supervisor_settings(c)["rebalance_interval_s"] == 99,
        "cluster.redundant_experts_per_worker": supervisor_settings(c)["extra_copies_per_worker"] == 3,
        "logging": router.kwargs["log"] == worker.kwargs["log"] == encoder.kwargs["log"] == ("DEBUG", "json"),
        "scheduler": router.kwargs["engine_config"] is config.scheduler,
    }
    assert [k for k, ok in reached.items() if not ok] == []


def test_the_ray_address_is_what_ray_is_joined_at(config, monkeypatch):
    joined = {}
    monkeypatch.setattr(ray_runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_runtime.ray, "init", lambda **kw: joined.update(kw))
    assert ray_runtime.init_ray(config.cluster) is False  # joined, not started: not ours to stop
    assert joined["address"] == "10.1.2.3:6379"


def test_the_tiny_preset_names_the_embedded_model(config, tmp_path):
    made = tmp_path / TINY_MODEL_NAME.replace("scout", "maverick")
    made.mkdir()
    (made / "config.json").write_text("{}")  # already made: nothing is trained here
    cfg = dataclasses.replace(config.model, path=None)
    assert model_dir_for(cfg.path, cfg.tiny_preset, {"MOECLUSTER_CACHE": str(tmp_path)}) == str(made)


def test_scheduler_keys_reach_the_engine(config, model_dir):
    engine = Engine.from_checkpoint(str(model_dir), config=config.scheduler)
    assert engine.scheduler.max_num_seqs == 5 and engine.scheduler.budget == 40
    assert engine.limits.max_model_len == 300 and engine.kv.block_size == 4
    assert engine.kv.total_bytes <= 2**20 < 2 * engine.kv.total_bytes + 2**16  # the budget it was given
    assert engine.config.micro_batches == 3  # what each step hands the runner (Engine._forward)


@pytest.mark.slow  # starts a gRPC server (no Ray)
def test_gateway_and_metrics_keys_reach_the_running_gateway(config, certs):
    g, m = config.gateway, config.metrics
    gateway = Gateway(g, m)
    limits = gateway.service.limits
    assert (
        limits.max_concurrent_streams,
        limits.max_queued_requests,
        limits.ray_timeout_s,
        limits.request_timeout_s,
        limits.failover_timeout_s,
    ) == (9, 11, 4.5, 77, 55)
    assert (gateway.config.drain_grace_s, gateway.config.poll_interval_s, gateway.config.expert_stats_interval_s) == (
        3.5,
        0.2,
        1.5,
    )  # read by drain() and by the poller attach() starts
    model_vision = VisionPrompt(ImageTokens(1, 2, 3, 4, 5, 6), 4, ImageProcessor(56, 16, ImageLimits(1, 1)))
    vision = gateway_vision(model_vision, gateway.config)  # what attach() gives the service for the router's model
    assert (vision.processor.limits.max_bytes, vision.processor.limits.max_pixels, vision.max_images) == (
        54321,
        4_000_000,
        3,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(30)  # noqa: E731
    try:
        assert run(gateway.start()) == g.port  # host and port
        metrics = urllib.request.urlopen(f"http://{m.host}:{m.port}/metrics", timeout=10).read()
        assert b"moecluster_requests" in metrics
        with InferenceClient(
            f"localhost:{g.port}",
            tls_ca=str(certs.ca),
            tls_cert=str(certs.client_cert),
            tls_key=str(certs.client_key),
            api_key=KEY,
        ) as client:
            assert client.health_status("") == "SERVING"  # TLS + mutual TLS + the key file's key
            with pytest.raises(GenerationError) as too_big:
                client.generate_text(prompt="x" * 200_000, max_tokens=1)
            assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # max_message_bytes
        with (
            InferenceClient(
                f"localhost:{g.port}",
                tls_ca=str(certs.ca),
                tls_cert=str(certs.client_cert),
                tls_key=str(certs.client_key),
            ) as keyless,
            pytest.raises(GenerationError) as refused,
        ):
            keyless.model_info()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert gateway.http_port == g.http_port  # the HTTP front: its port, the same TLS, client CA and keys
        tls = ssl.create_default_context(cafile=str(certs.ca))
        tls.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        models = urllib.request.Request(
            f"https://localhost:{g.http_port}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert json.loads(urllib.request.urlopen(models, context=tls, timeout=10).read())["object"] == "list"
    finally:
        run(gateway.stop(grace_s=0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _model_cfg(model_dir):
    from cluster.config import load_model_config

    return load_model_config(model_dir)
