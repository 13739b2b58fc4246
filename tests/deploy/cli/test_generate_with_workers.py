"""`moecluster generate --workers N` as a user runs it: same output as in-process, also when a worker is killed
mid-generation (it is replaced and the step replayed), with no Ray process left behind. The kill comes once the
worker is computing steps (its CPU time grows), not after a fixed delay, and the log shows it interrupted a step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import LLAMA3_ROPE, make_hf_model
from tests.procs import cpu_seconds, descendants_running, ray_gone, ray_processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for name, overrides in {
        "scout-like": dict(num_local_experts=16, use_qk_norm=True, rope_parameters=LLAMA3_ROPE),
        "maverick-like-top2": dict(
            num_local_experts=16, interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False
        ),
    }.items():
        paths[name] = tmp_path_factory.mktemp(name)
        make_hf_model(seed=3, **overrides).save_pretrained(paths[name])
    return paths


def generate_command(model, *flags: str) -> list[str]:
    """`moecluster generate --model MODEL FLAGS --json` as a command line; the tests add `--workers N`."""
    return [sys.executable, "-m", "deploy.cli", "generate", "--model", str(model), *flags, "--json"]


def test_killing_a_worker_mid_generation_changes_nothing_in_the_output(checkpoints):
    assert ray_gone(), "another Ray is running; this test checks that ours leaves nothing behind"
    base = generate_command(
        checkpoints["scout-like"], "--prompt-ids", "1,2,3", "--max-tokens", "600", "--ignore-eos", "--temperature", "0"
    )
    local = subprocess.run([*base, "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    proc = subprocess.Popen(
        [*base, "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    deadline = time.monotonic() + 120
    serving = "ray::ExpertWorker.wait_stopped"  # a worker's title once the supervisor watches it
    while not (victims := descendants_running(proc.pid, serving)) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert victims, "the workers never started serving"  # wait_stopped is called once a worker serves
    busy = cpu_seconds(victims[-1]) + 0.3  # a third of a second of expert work: decode steps are running
    while cpu_seconds(victims[-1]) < busy:
        assert proc.poll() is None and time.monotonic() < deadline, "the worker never computed"
        time.sleep(0.02)
    os.kill(victims[-1], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "failed over" in stderr  # the kill interrupted a step (one between steps would cost no failover)
    assert stdout == local.stdout
    assert "Traceback" not in stderr
    assert ray_gone(), ray_processes()


def test_generate_cli_with_workers_prints_the_in_process_tokens(checkpoints):
    base = generate_command(
        checkpoints["maverick-like-top2"], "--prompt-ids", "1,40,41,42", "--max-tokens", "12", "--temperature", "0"
    )
    local = subprocess.run([*base, "--workers", "0"], capture_output=True, text=True, timeout=120)
    remote = subprocess.run(
        [*base, "--workers", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr, remote.stderr)
    assert remote.stdout == local.stdout
    assert ray_gone(), ray_processes()


def test_generate_cli_with_two_routers_prints_the_tokens_of_one(checkpoints):
    prompts = [a for i in range(6) for a in ("--prompt-ids", f"1,{40 + i},41,42")]
    base = generate_command(
        checkpoints["scout-like"], "--max-tokens", "12", "--temperature", "0.8", "--seed", "3", *prompts
    )
    local = subprocess.run([*base, "--workers", "0"], capture_output=True, text=True, timeout=120)
    spread = subprocess.run([*base, "--workers", "2", "--routers", "2"], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and spread.returncode == 0, (local.stderr, spread.stderr)
    assert spread.stdout == local.stdout and len(local.stdout.splitlines()) == 6
    assert ray_gone(), ray_processes()
