"""The private local Ray that a server starts when it is given no cluster to join: reachable from this machine
only, and only by processes that hold its token. Anyone who can reach a Ray cluster can run code in it, so the
embedded default must not listen on the network ("ShadowRay").

  start(num_cpus)   a new local Ray (never an existing one), every server on 127.0.0.1, RAY_AUTH_MODE=token with
                    a fresh random token in a 0600 file (never on a command line), and a reaper that stops this
                    Ray once this process is gone, however it died (deploy/ray_reaper.py)
  shutdown()        ray.shutdown(); if start() made the Ray: restore the environment, let the reaper stop what
                    is left of the Ray, delete the token

How, in Ray 2.60 (measured with the sockets in /proc; tests/deploy/test_private_ray.py checks it):
  * Loopback. Ray has no bind-address option. Its servers (GCS, raylet, object manager, core workers, the agents)
    listen on every interface unless the node IP is exactly 127.0.0.1; then on loopback only. The node IP of a new
    local Ray is 127.0.0.1 only while `ray._private.ray_constants.ENABLE_RAY_CLUSTER` is false
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when `ray` is imported; the default on macOS and Windows).
    `ray.init(_node_ip_address="127.0.0.1")` does not help: Ray "resolves" a loopback address to the outward one.
    So the flag is cleared for the duration of ray.init, and the node IP is checked afterwards: a Ray that came up
    on another address is shut down, not served.
  * Token. RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH are read from the environment, by this process (RayConfig is
    cached, so it is re-read) and by every process Ray starts (they inherit it). A client without the token is
    refused by the GCS (UNAUTHENTICATED).
  * address="local": ray.init() with no address would join a Ray that `ray start` left running on this machine.
  * Lifetime. This Ray must not outlive this process, however it dies: a reaper process (deploy/ray_reaper.py),
    started before ray.init, stops every process of this Ray (they carry a mark in their environment) once this
    process has exited or shutdown() has run, and deletes the token. Ray's own fate sharing (PR_SET_PDEATHSIG on
    the GCS and raylet) leaves the raylet's agents running after a SIGKILL of the driver.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import ray_constants
from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode

from deploy.errors import ClusterStartError
from deploy.ray_reaper import MARK_ENV, Reaper, ReaperError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # what start() changes, restored by shutdown()


@dataclass(frozen=True)
class _Started:
    token_dir: Path
    saved_env: dict[str, str | None]
    reaper: Reaper


_started: _Started | None = None
_lock = threading.Lock()


def start(num_cpus: int) -> None:
    """A new local Ray on loopback with token authentication; ClusterStartError if it binds anywhere else."""
    global _started
    with _lock:
        assert _started is None, "a private Ray is already running in this process"
        saved = {name: os.environ.get(name) for name in AUTH_ENV}
        token_dir = Path(tempfile.mkdtemp(prefix="moecluster-ray-"))  # mode 0700
        mark = secrets.token_hex(16)
        try:
            reaper = Reaper.start(mark, token_dir)
        except ReaperError as e:
            shutil.rmtree(token_dir, ignore_errors=True)
            raise ClusterStartError(str(e)) from None
        _started = _Started(token_dir, saved, reaper)
        _use_token(_write_token(token_dir))
    try:
        with _node_ip_on_loopback(), _marked(mark):
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        _check_private()
    except BaseException:
        shutdown()
        raise
    log.info("private Ray on %s with token authentication", LOOPBACK)


def shutdown() -> None:
    """ray.shutdown(); then, if start() made this Ray, forget its token (safe to call twice, or for a Ray this
    process only joined)."""
    global _started
    ray.shutdown()
    with _lock:
        started, _started = _started, None
    if started is None:
        return
    for name, value in started.saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _reload_auth_config()
    if not started.reaper.alive:
        log.warning("the private Ray's reaper had exited early (code %s)", started.reaper.proc.returncode)
    elif not started.reaper.stop():
        log.warning("the private Ray's reaper did not finish its sweep; some of its processes may be left")
    shutil.rmtree(started.token_dir, ignore_errors=True)


def _write_token(token_dir: Path) -> Path:
    path = token_dir / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _use_token(path: Path) -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    _reload_auth_config()


def _reload_auth_config() -> None:
    """Ray caches the mode (RayConfig) and the token when first used; read both from the environment again. The
    config first: a token dropped while the config still says `token` is fatal to Ray's gRPC threads."""
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def _marked(mark: str):
    """The reaper's mark in the environment while ray.init starts the GCS and raylet (everything else of this Ray
    inherits it from them); gone afterwards, so that nothing else this process starts carries it."""
    os.environ[MARK_ENV] = mark
    try:
        yield
    finally:
        os.environ.pop(MARK_ENV, None)


@contextmanager
def _node_ip_on_loopback():
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _check_private() -> None:
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        raise ClusterStartError(
            f"the private Ray came up on {node_ip}, not {LOOPBACK}, so it would listen on the network; this Ray "
            f"version ({ray.__version__}) binds differently from 2.60: refusing to serve (set cluster.ray_address "
            "to join a cluster that you have secured instead)"
        )
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        raise ClusterStartError(f"the private Ray did not enable token authentication (Ray {ray.__version__})")
