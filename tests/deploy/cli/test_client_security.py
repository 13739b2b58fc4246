"""`moecluster client` against a gateway with mutual TLS and API keys: the key comes from --api-key-file or
$MOECLUSTER_API_KEY, never from a flag's value; certificates from --tls-ca / --tls-cert / --tls-key; a failed
handshake says what is likely missing. The gateway has no cluster attached, so a call that gets through ends
UNAVAILABLE "the cluster is not ready"."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from deploy.cli.main import main
from tests.certs import make_certs
from tests.router.gateway.gateway_thread import running_gateway

pytestmark = pytest.mark.slow  # starts a gRPC server (no Ray)

KEY = "cli-test-key-0123456789abcdef"


class Setup(NamedTuple):
    dir: Path  # key files
    certs: object  # tests.certs.Certs
    target: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("client-security")
    certs = make_certs(out)
    (out / "keys").write_text(f"{KEY}\n")
    (out / "my-key").write_text(f"# the key for the test gateway\n{KEY}\n")
    (out / "wrong-key").write_text("a-wrong-key-0123456789abcdef\n")
    tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "client_ca_file": str(certs.ca)}
    with running_gateway({"tls": tls, "api_keys_file": str(out / "keys")}) as gateway:
        yield Setup(out, certs, f"localhost:{gateway.port}")


def client(setup: Setup, *extra: str, mtls: bool = True) -> list[str]:
    tls = ["--tls-ca", str(setup.certs.ca)]
    if mtls:
        tls += ["--tls-cert", str(setup.certs.client_cert), "--tls-key", str(setup.certs.client_key)]
    return ["client", "info", "--target", setup.target, *tls, *extra]


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_the_key_from_a_file_and_a_client_certificate_get_through(setup, capsys):
    code, err = run(client(setup, "--api-key-file", str(setup.dir / "my-key")), capsys)
    assert (code, err.strip()) == (1, "error: UNAVAILABLE: the cluster is not ready: the cluster is starting")


def test_the_key_from_the_environment_gets_through(setup, capsys, monkeypatch):
    monkeypatch.setenv("MOECLUSTER_API_KEY", KEY)
    assert "the cluster is not ready" in run(client(setup), capsys)[1]


def test_a_missing_or_wrong_key_is_unauthenticated(setup, capsys, monkeypatch):
    monkeypatch.delenv("MOECLUSTER_API_KEY", raising=False)
    assert "error: UNAUTHENTICATED: this server needs an API key" in run(client(setup), capsys)[1]
    code, err = run(client(setup, "--api-key-file", str(setup.dir / "wrong-key")), capsys)
    assert code == 1 and "error: UNAUTHENTICATED: the API key is not valid" in err


def test_there_is_no_flag_that_takes_the_key_itself(setup, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(client(setup, "--api-key", KEY))  # not taken as an abbreviation of --api-key-file either
    assert exit_.value.code == 2 and "unrecognized arguments: --api-key" in capsys.readouterr().err


def test_a_key_file_must_hold_exactly_one_key(setup, capsys, tmp_path):
    (tmp_path / "two").write_text("first-key-0123456789abc\nsecond-key-0123456789ab\n")
    code, err = run(client(setup, "--api-key-file", str(tmp_path / "two")), capsys)
    assert code == 2 and "--api-key-file: expected one key" in err and "first-key" not in err


def test_without_a_client_certificate_the_handshake_fails_with_a_hint(setup, capsys):
    code, err = run(client(setup, "--api-key-file", str(setup.dir / "my-key"), mtls=False), capsys)
    assert code == 1 and "UNAVAILABLE" in err and "hint: if the server asks for client certificates" in err


def test_a_plaintext_client_against_tls_fails_with_a_hint(setup, capsys):
    code, err = run(["client", "info", "--target", setup.target], capsys)
    assert code == 1 and "hint: if the server uses TLS, give --tls-ca FILE" in err


def test_a_missing_certificate_file_is_named(setup, capsys, tmp_path):
    code, err = run(["client", "info", "--target", setup.target, "--tls-ca", str(tmp_path / "nope.pem")], capsys)
    assert code == 2 and "--tls-ca:" in err and "is not a file" in err
