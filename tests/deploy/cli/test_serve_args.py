"""`moecluster serve` / `client` refuse bad flags before starting anything, and the default model is made
once in the cache directory the environment names."""

from __future__ import annotations

import pytest

from deploy.cli.main import main
from deploy.tiny.cache import TINY_MODEL_NAME, cache_dir, tiny_model


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--workers", "-1"], "--workers"),
        (["--port", "70000"], "--port"),
        (["--metrics-port", "-2"], "--metrics-port"),
        (["--max-concurrent-streams", "0"], "--max-concurrent-streams"),
        (["--max-queued-requests", "-1"], "--max-queued-requests"),
        (["--drain-grace-s", "-1"], "--drain-grace-s"),
        (["--device", "tpu"], "--device"),
        (["--model", "/nonexistent/dir"], "--model"),
    ],
)
def test_serve_refuses_a_bad_flag_naming_it(capsys, args, flag):
    assert main(["serve", *args]) == 2
    assert capsys.readouterr().err.startswith(f"error: {flag}")


def test_client_generate_needs_exactly_one_input(capsys):
    assert main(["client", "generate", "--target", "127.0.0.1:1"]) == 2
    assert "give a prompt or --input-ids" in capsys.readouterr().err


def test_cache_dir_prefers_moecluster_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir({"MOECLUSTER_CACHE": "/a", "XDG_CACHE_HOME": "/b"}).as_posix() == "/a"
    assert cache_dir({"XDG_CACHE_HOME": "/b"}).as_posix() == "/b/moecluster"
    assert cache_dir({}) == tmp_path / "home" / ".cache" / "moecluster"


def test_the_tiny_model_is_written_once_and_reused(tmp_path):
    path = tiny_model(tmp_path)
    assert path == tmp_path / TINY_MODEL_NAME and (path / "config.json").is_file()
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_NAME]  # no temporary directory left
