"""TLS on the gateway's port: a plaintext client cannot talk to it, a client that trusts the CA can; with a client
CA (mutual TLS) a client must also present a certificate that CA signed. Throwaway certificates from tests/certs.py
(the `cryptography` package)."""

from __future__ import annotations

import grpc
import pytest

from protos.client import InferenceClient
from tests.router.gateway.gateway_thread import running_gateway
from tests.router.gateway.harness import model_info_error

pytestmark = pytest.mark.slow  # each starts a gRPC server (no Ray)


@pytest.fixture(scope="module")
def tls_target(certs):
    with running_gateway({"tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}}) as gw:
        yield f"localhost:{gw.port}"


@pytest.fixture(scope="module")
def mtls_target(certs):
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "client_ca_file": str(certs.ca)}
    with running_gateway({"tls": tls}) as gw:
        yield f"localhost:{gw.port}"


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_target):
    error = model_info_error(tls_target)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    with InferenceClient(tls_target) as client:
        assert client.health_status("", timeout=5) == "UNREACHABLE"


def test_a_client_that_trusts_the_ca_gets_through(tls_target, certs):
    with InferenceClient(tls_target, tls_ca=certs.ca) as client:
        assert client.health_status("") == "SERVING"
    assert model_info_error(tls_target, tls_ca=certs.ca).message.startswith("the cluster is not ready")


def test_the_ca_may_be_given_as_pem_bytes(tls_target, certs):
    with InferenceClient(tls_target, tls_ca=certs.ca.read_bytes()) as client:
        assert client.health_status("") == "SERVING"


def test_a_client_that_does_not_trust_the_servers_ca_refuses_it(tls_target, certs):
    error = model_info_error(tls_target, tls_ca=certs.stranger_cert)  # a CA that did not sign the server
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_target, certs):
    error = model_info_error(mtls_target, tls_ca=certs.ca)
    assert error.code == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no RPC reaches the server


def test_mutual_tls_refuses_a_certificate_from_another_ca(mtls_target, certs):
    error = model_info_error(mtls_target, tls_ca=certs.ca, tls_cert=certs.stranger_cert, tls_key=certs.stranger_key)
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_lets_a_client_with_a_certificate_from_the_ca_in(mtls_target, certs):
    client_args = dict(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key)
    with InferenceClient(mtls_target, **client_args) as client:
        assert client.health_status("") == "SERVING"
    assert model_info_error(mtls_target, **client_args).message.startswith("the cluster is not ready")


def test_mutual_tls_and_api_keys_together(certs, tmp_path):
    (tmp_path / "keys").write_text("a-key-of-enough-length-1234\n")
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "client_ca_file": str(certs.ca)}
    with running_gateway({"tls": tls, "api_keys_file": str(tmp_path / "keys")}) as gw:
        client_args = dict(tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key)
        target = f"localhost:{gw.port}"
        assert model_info_error(target, **client_args).code == grpc.StatusCode.UNAUTHENTICATED
        assert model_info_error(target, api_key="a-key-of-enough-length-1234", **client_args).code == (
            grpc.StatusCode.UNAVAILABLE
        )


def test_a_client_certificate_without_its_key_is_refused_at_once(certs):
    with pytest.raises(ValueError, match="tls_cert is set but tls_key is not"):
        InferenceClient("localhost:1", tls_ca=certs.ca, tls_cert=certs.client_cert)


def test_an_unreadable_ca_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="tls_ca: cannot read"):
        InferenceClient("localhost:1", tls_ca=tmp_path / "missing.pem")
