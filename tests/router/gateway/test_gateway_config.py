"""The gateway's security settings are checked when the config loads, naming the key: TLS files that are missing,
swapped, unpaired or mismatched, and API-key files with a bad key (without repeating the key)."""

from __future__ import annotations

import pytest

from cluster.settings import SettingError
from deploy.config import parse_serve_config
from router.gateway.api_keys import ApiKeyError, ApiKeys, parse_key_list, read_key_file
from tests.certs import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def error_of(tls: dict) -> SettingError:
    with pytest.raises(SettingError) as info:
        parse_serve_config({"gateway": {"tls": {k: str(v) for k, v in tls.items()}}}, "config.yaml")
    return info.value


def test_a_certificate_and_its_key_turn_tls_on(certs):
    tls = parse_serve_config(
        {"gateway": {"tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}}}
    ).gateway.tls
    assert tls.enabled and tls.client_ca_file is None


def test_a_key_without_its_certificate_names_cert_file(certs):
    error = error_of({"key_file": certs.server_key})
    assert error.key == "gateway.tls.cert_file" and "key_file is set" in error.problem


def test_a_certificate_without_its_key_names_key_file(certs):
    error = error_of({"cert_file": certs.server_cert})
    assert error.key == "gateway.tls.key_file" and "cert_file is set" in error.problem


def test_a_client_ca_without_tls_names_client_ca_file(certs):
    error = error_of({"client_ca_file": certs.ca})
    assert error.key == "gateway.tls.client_ca_file" and "mutual TLS needs TLS first" in error.problem


def test_swapped_files_say_what_was_found(certs):
    error = error_of({"cert_file": certs.server_key, "key_file": certs.server_cert})
    assert error.key == "gateway.tls.cert_file"
    assert "expected a PEM file with a CERTIFICATE" in error.problem and "found PRIVATE KEY" in error.problem


def test_a_key_that_does_not_match_the_certificate_is_refused(certs):
    error = error_of({"cert_file": certs.server_cert, "key_file": certs.client_key})
    assert error.key == "gateway.tls.key_file" and "does not match cert_file" in error.problem


def test_an_encrypted_key_is_refused_with_the_reason(certs, tmp_path):
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    error = error_of({"cert_file": certs.server_cert, "key_file": encrypted})
    assert error.key == "gateway.tls.key_file" and "gRPC needs it unencrypted" in error.problem


def test_a_short_api_key_is_named_by_file_and_line_but_not_repeated(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# keys\nan-ok-key-0123456789\nshort-secret\n")
    with pytest.raises(SettingError) as info:
        parse_serve_config({"gateway": {"api_keys_file": str(path)}}, "config.yaml")
    assert info.value.key == "gateway.api_keys_file"
    assert f"{path}: line 3: a key of 12 characters; expected at least 16" in info.value.problem
    assert "short-secret" not in str(info.value)


def test_key_files_allow_comments_and_blank_lines_but_one_key_per_line(tmp_path):
    path = tmp_path / "keys"
    path.write_text("\n# a comment\nkey-number-one-0123456  # for team A\n   key-number-two-0123456\n")
    assert read_key_file(path) == ["key-number-one-0123456", "key-number-two-0123456"]
    path.write_text("key-number-one-0123456 key-number-two-0123456\n")
    with pytest.raises(ApiKeyError, match="line 1: expected one key per line"):
        read_key_file(path)


def test_an_empty_key_file_is_an_error(tmp_path):
    (tmp_path / "keys").write_text("# nothing yet\n")
    with pytest.raises(ApiKeyError, match="no key in the file"):
        read_key_file(tmp_path / "keys")


def test_keys_from_the_environment_are_comma_separated_and_checked():
    assert parse_key_list(" key-number-one-0123456 ,key-number-two-0123456,") == [
        "key-number-one-0123456",
        "key-number-two-0123456",
    ]
    with pytest.raises(ApiKeyError, match="MOECLUSTER_API_KEYS: key 2: expected a key of visible ASCII"):
        parse_key_list("key-number-one-0123456,key with spaces 0123456")


def test_api_keys_accept_exactly_the_configured_keys(tmp_path):
    (tmp_path / "keys").write_text("key-number-one-0123456\n")
    keys = ApiKeys.load(str(tmp_path / "keys"), {"MOECLUSTER_API_KEYS": "key-number-two-0123456"})
    assert len(keys) == 2
    assert keys.accepts("key-number-one-0123456") and keys.accepts("key-number-two-0123456")
    assert not keys.accepts("key-number-one-012345") and not keys.accepts("") and not keys.accepts("x" * 1000)


def test_no_file_and_no_variable_means_no_api_keys():
    assert ApiKeys.load(None, {}) is None
