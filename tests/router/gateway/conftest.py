"""Fixtures the gateway's end-to-end tests share (helpers that are not fixtures are in harness.py)."""

from __future__ import annotations

import pytest

from protos.client import InferenceClient
from tests.certs import make_certs


@pytest.fixture(scope="module")
def client(server):
    """A client of the module's `server` fixture (a started deploy.server.Server), once it is ready to serve."""
    with InferenceClient(server.target) as c:
        c.wait_until_serving(timeout=60)
        yield c


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Throwaway CA, server and client certificates (tests/certs.py)."""
    return make_certs(tmp_path_factory.mktemp("certs"))
