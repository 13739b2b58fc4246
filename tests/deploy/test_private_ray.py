"""The Ray that `moecluster serve` starts for itself (no cluster.ray_address) is private: every socket that the serve
process and its descendants listen on is on loopback, and the Ray accepts only clients holding its token, a fresh
random one per server, in a 0600 file, on no command line, deleted when the server stops.

The sockets are read from /proc for the whole process tree (tests/sockets.py), so whatever listens (gateway, GCS,
raylet, object manager, agents, actors, and the torch.distributed rendezvous once it binds to loopback) is covered.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import _cmdline, descendants
from tests.sockets import listening_sockets

pytestmark = pytest.mark.slow

# A client of the private Ray: exits 0 once connected. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from rewriting
# 127.0.0.1 into this machine's outward address (where nothing listens: that is the point); the retry settings make a
# refused client give up in seconds instead of a minute.
JOIN = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('JOINED')"
CLIENT_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_gcs_server_port_wait_time_s": "1",
    "RAY_gcs_rpc_server_connect_timeout_s": "5",
    "RAY_gcs_server_request_timeout_seconds": "5",
}
REFUSED = ("Unauthenticated", "InvalidAuthToken", "Authentication token is missing or incorrect")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-scout"), "scout", train_steps=0)


def start_serve(model_dir: Path, workers: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "deploy.cli", "serve", "--model", str(model_dir), "--workers", str(workers)]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("moecluster serving"):
        proc.kill()
        pytest.fail(f"serve did not start: {line!r}\n{proc.stderr.read()[-3000:]}")
    return proc


def stop_serve(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


@pytest.fixture(scope="module")
def serve(model_dir):
    """A serve process without expert workers (so no torch.distributed rendezvous: see the last test)."""
    proc = start_serve(model_dir, workers=0)
    yield proc
    stop_serve(proc)


def gcs(proc: subprocess.Popen) -> int:
    [pid] = [p for p in descendants(proc.pid) if _cmdline(p).split(" ")[0].endswith("/gcs_server")]
    return pid


def gcs_address(proc: subprocess.Popen) -> str:
    [socket] = [s for s in listening_sockets(proc.pid) if s.pid == gcs(proc)]
    return f"127.0.0.1:{socket.port}"


def token_path(proc: subprocess.Popen) -> Path:
    environ = dict(
        entry.split("=", 1) for entry in Path(f"/proc/{gcs(proc)}/environ").read_text().split("\0") if "=" in entry
    )
    assert environ["RAY_AUTH_MODE"] == "token"
    return Path(environ["RAY_AUTH_TOKEN_PATH"])


def join(address: str, **auth: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(CLIENT_ENV, **auth)
    return subprocess.run([sys.executable, "-c", JOIN, address], capture_output=True, text=True, env=env, timeout=50)


def test_every_listening_socket_of_serve_and_its_ray_is_on_loopback(serve):
    sockets = listening_sockets(serve.pid)
    processes = " ".join(s.process for s in sockets)
    for expected in ("gcs_server", "raylet", "ray::RouterActor", "deploy.cli serve"):
        assert expected in processes, [str(s) for s in sockets]  # the check covers them, so it is not vacuous
    assert [str(s) for s in sockets if not s.loopback_only] == []


@pytest.mark.parametrize(
    "auth",
    [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}],
    ids=["no token", "a wrong token"],
)
def test_a_ray_client_without_the_servers_token_is_refused(serve, auth):
    result = join(gcs_address(serve), **auth)
    assert result.returncode != 0 and "JOINED" not in result.stdout
    assert any(reason in result.stderr for reason in REFUSED), result.stderr[-3000:]


def test_a_ray_client_with_the_token_joins(serve):
    result = join(gcs_address(serve), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path(serve)))
    assert result.returncode == 0 and "JOINED" in result.stdout, result.stderr[-3000:]


def test_the_token_is_fresh_private_and_on_no_command_line(serve):
    path = token_path(serve)
    token = path.read_text()
    assert len(token) == 64 and path.parent.name.startswith("moecluster-ray-")
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    default = Path.home() / ".ray" / "auth_token"
    assert not default.exists() or default.read_text().strip() != token  # not Ray's shared default token
    assert all(token not in _cmdline(pid) for pid in [serve.pid, *descendants(serve.pid)])


def test_stopping_the_server_deletes_the_token(serve):
    path = token_path(serve)
    assert stop_serve(serve) == 0
    assert not path.exists() and not path.parent.exists()


def test_with_expert_workers_the_rendezvous_and_gloo_listen_on_loopback_too(model_dir):
    proc = start_serve(model_dir, workers=2)
    try:
        sockets = listening_sockets(proc.pid)
        assert [str(s) for s in sockets if not s.loopback_only] == []
    finally:
        stop_serve(proc)
