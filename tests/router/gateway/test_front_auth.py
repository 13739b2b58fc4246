"""API keys and TLS on the KServe v2 and OpenAI fronts, as on moecluster.v1: no key and a wrong key are refused
(UNAUTHENTICATED; HTTP 401 in OpenAI's error shape), the right key gets through to the service (which, with no cluster
attached, answers UNAVAILABLE / 503), health stays open (KServe ServerLive and ServerReady, HTTP /health and /ready),
and with TLS a client that trusts the CA gets through on both ports (openai SDK and tritonclient), a plaintext one
does not. A gateway without a cluster (tests/router/gateway/gateway_thread.py)."""

from __future__ import annotations

import ssl

import httpx2 as httpx
import openai
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.router.gateway.gateway_thread import running_gateway

pytestmark = pytest.mark.slow  # each starts a gRPC and an HTTP server (no Ray)
KEY = "k3y-for-the-fronts-0123456789"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api_keys"
    path.write_text(KEY + "\n")
    with running_gateway({"api_keys_file": str(path)}) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def tls_gateway(certs):
    with running_gateway({"tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}}) as gw:
        yield gw


def http(gateway, path: str, key: str | None = None, method: str = "GET", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"http://127.0.0.1:{gateway.http_port}{path}", headers=headers, timeout=10, **kw)


@pytest.mark.parametrize("key, words", [(None, "Authorization: Bearer <key>"), ("wrong-key", "not valid")])
def test_http_without_the_key_is_401_in_openai_shape(keyed, key, words):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        r = http(keyed, path, key, method, json={"prompt": "x"})
        error = r.json()["error"]
        assert r.status_code == 401 and error["type"] == "authentication_error" and words in error["message"], r.text
        assert KEY not in r.text


def test_http_with_the_key_reaches_the_service_and_health_stays_open(keyed):
    r = http(keyed, "/v1/completions", KEY, "POST", json={"prompt": "x"})
    assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]  # no cluster attached
    assert http(keyed, "/v1/models", KEY).json() == {"object": "list", "data": []}
    assert http(keyed, "/health").status_code == 200
    ready = http(keyed, "/ready")
    assert ready.status_code == 503 and "not ready" in ready.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{keyed.http_port}/v1", api_key="wrong", max_retries=0).models.list()


def test_kserve_without_the_key_is_unauthenticated_and_health_stays_open(keyed):
    client = triton.InferenceServerClient(f"127.0.0.1:{keyed.port}")
    try:
        assert client.is_server_live() and not client.is_server_ready()  # open; not ready without a cluster
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("m")
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("m", headers={"authorization": "Bearer wrong"})
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("m", headers={"authorization": f"Bearer {KEY}"})
        assert e.value.status() == "StatusCode.UNAVAILABLE"  # through: the service answers, no cluster yet
    finally:
        client.close()


def test_tls_on_both_fronts_with_the_ca(tls_gateway, certs):
    sdk = openai.OpenAI(
        base_url=f"https://localhost:{tls_gateway.http_port}/v1",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(certs.ca))),
    )
    assert sdk.models.list().data == []  # the handshake and the call went through
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(
            base_url=f"https://localhost:{tls_gateway.http_port}/v1", api_key="x", max_retries=0
        ).models.list()
    trust = ssl.create_default_context(cafile=str(certs.ca))
    assert httpx.get(f"https://localhost:{tls_gateway.http_port}/health", verify=trust).status_code == 200
    client = triton.InferenceServerClient(f"localhost:{tls_gateway.port}", ssl=True, root_certificates=str(certs.ca))
    try:
        assert client.is_server_live()
    finally:
        client.close()
    fronts = {f.protocol: f.transport for f in tls_gateway.inference.fronts}
    assert fronts == {"moecluster.v1.Inference": "grpcs", "inference.GRPCInferenceService": "grpcs", "openai": "https"}
