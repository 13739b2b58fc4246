"""API keys in front of the gateway: every call but health needs `authorization: Bearer <key>` with a known key;
a missing, malformed or wrong key is UNAUTHENTICATED with a message that names no key; the right key reaches the
service (which, with no cluster attached, answers UNAVAILABLE). Keys come from a file or $MOECLUSTER_API_KEYS."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.async_client import AsyncInferenceClient
from protos.client import InferenceClient
from protos.client_types import GenerationError
from protos.moecluster.v1 import inference_pb2 as pb
from router.gateway.api_keys import ENV
from tests.router.gateway.gateway_thread import running_gateway
from tests.router.gateway.harness import model_info_error

pytestmark = pytest.mark.slow  # each starts a gRPC server (no Ray)

KEY = "k3y-for-team-a-0123456789"
OTHER_KEY = "k3y-for-team-b-9876543210"
ENV_KEY = "k3y-from-the-environment-42"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api_keys"
    path.write_text(f"# gateway API keys\n{KEY}  # team A\n\n{OTHER_KEY}\n")
    return path


@pytest.fixture(scope="module")
def target(keys_file):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV, f" {ENV_KEY} ,")
        with running_gateway({"api_keys_file": str(keys_file)}) as gateway:
            yield f"127.0.0.1:{gateway.port}"


def test_a_client_without_a_key_is_unauthenticated_and_told_how_to_send_one(target):
    error = model_info_error(target)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <key>" in error.message


def test_a_wrong_key_is_unauthenticated_and_the_message_names_no_key(target):
    error = model_info_error(target, api_key="not-one-of-the-keys-at-all")
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.message == "the API key is not valid for this server"
    assert KEY not in str(error) and OTHER_KEY not in str(error)


def test_a_key_without_the_bearer_scheme_is_unauthenticated(target):
    with InferenceClient(target) as client, pytest.raises(grpc.RpcError) as info:
        client.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", KEY),), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in info.value.details()


@pytest.mark.parametrize("key", [KEY, OTHER_KEY, ENV_KEY], ids=["file, with a comment", "file", "environment"])
def test_every_configured_key_gets_through_to_the_service(target, key):
    error = model_info_error(target, api_key=key)  # the service itself answers: no cluster is attached
    assert error.code == grpc.StatusCode.UNAVAILABLE and "not ready" in error.message


def test_a_streaming_generate_is_refused_too(target):
    with InferenceClient(target, api_key="wrong-key-wrong-key-wrong") as client, pytest.raises(GenerationError) as e:
        list(client.generate("12 13", max_tokens=2, timeout=10))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_key_so_probes_work(target):
    with InferenceClient(target) as client:
        assert client.health_status("") == "SERVING"  # liveness
        assert client.health_status() == "NOT_SERVING"  # readiness: no cluster attached


def test_reflection_needs_the_key(target):
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    def list_services(metadata=()):
        with grpc.insecure_channel(target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            [response] = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
            return {s.name for s in response.list_services_response.service}

    with pytest.raises(grpc.RpcError) as info:
        list_services()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "moecluster.v1.Inference" in list_services((("authorization", f"Bearer {KEY}"),))


def test_the_asyncio_client_sends_the_key_too(target):
    async def info(api_key):
        async with AsyncInferenceClient(target, api_key=api_key) as client:
            with pytest.raises(GenerationError) as e:
                await client.model_info(timeout=10)
            return e.value.code

    assert asyncio.run(info(None)) == grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(info(KEY)) == grpc.StatusCode.UNAVAILABLE


def test_without_keys_every_call_reaches_the_service(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with running_gateway({}) as gateway:
        assert model_info_error(f"127.0.0.1:{gateway.port}").code == grpc.StatusCode.UNAVAILABLE
