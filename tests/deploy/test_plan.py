"""`moecluster plan` from the real Scout and Maverick config.json: the sizes of issue 20's table (within 2%), which
deployments fit, exit status 0/1, and `serve` refusing a plan that cannot fit before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from cluster.expert_map import PlacementError
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from deploy.plan import GIB, GPUS, Topology, memory_plan

FIXTURES = Path(__file__).parents[1] / "fixtures" / "llama4"


def raw(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def plan(name: str, gpu: str, workers: int, fp8: bool, encoders: int = 0):
    cluster = ClusterConfig(device="cuda", workers=workers, vision_encoders=encoders)
    return memory_plan(raw(name), Topology(GPUS[gpu], cluster, fp8))


def near(value: float, expected: float) -> bool:
    return abs(value - expected) <= 0.02 * expected


def test_whole_model_sizes_match_the_table():
    assert near(plan("maverick", "h100", 7, False).model_bytes / GIB, 748)
    assert near(plan("maverick", "h100", 7, True).model_bytes / GIB, 388)
    assert near(plan("scout", "h200", 0, False).model_bytes / GIB, 202)
    assert 107 * 0.98 <= plan("scout", "h200", 0, True).model_bytes / GIB <= 112 * 1.02


def test_maverick_on_eight_h100s_fits_in_fp8_only():
    assert near(8 * GPUS["h100"] / GIB, 636)  # "about 636 GiB usable on 8 H100s"
    bf16, fp8 = plan("maverick", "h100", 7, False), plan("maverick", "h100", 7, True)
    assert bf16.gpus == fp8.gpus == 8
    assert near(fp8.model_bytes / fp8.gpus / GIB, 48.5)  # per GPU on average
    assert fp8.fits and all(a.fits for a in fp8.actors)
    assert not bf16.fits and not any(a.fits for a in bf16.actors if a.role == "worker")
    assert "model.expert_dtype: fp8" in bf16.problems[0] and "cluster.workers >=" in bf16.problems[0]


def test_scout_fits_one_h200_in_fp8_but_not_in_bf16():
    assert plan("scout", "h200", 0, True).fits
    bf16 = plan("scout", "h200", 0, False)
    assert not bf16.fits and "cluster.workers >= 1" in bf16.problems[0]
    assert plan("scout", "h200", 2, False).fits  # bf16 on this split: a router and two workers (three H200s)


def test_routers_report_kv_capacity_at_the_block_size():
    router = plan("maverick", "h100", 7, True).actors[0]
    assert router.role == "router" and router.kv_tokens > 100_000 and router.kv_tokens % 16 == 0


def run_plan(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "plan", *args], capture_output=True, text=True, timeout=120
    )


def test_the_command_exits_0_when_it_fits_and_1_when_it_does_not():
    base = ["--model", str(FIXTURES / "maverick"), "--gpu", "h100", "--workers", "7", "--vision-encoders", "0"]
    fits = run_plan(*base, "--expert-dtype", "fp8", "--json")
    assert fits.returncode == 0, fits.stderr
    out = json.loads(fits.stdout)
    assert out["fits"] and out["gpus"] == 8 and near(out["model_bytes"] / GIB, 388)
    assert near(out["model_bytes_other_expert_dtype"] / GIB, 748)
    refused = run_plan(*base, "--expert-dtype", "bf16")
    assert refused.returncode == 1 and "model.expert_dtype: fp8" in refused.stdout
    assert run_plan(*base, "--gpu", "h9000").returncode == 2


def test_serve_refuses_a_plan_that_cannot_fit_naming_the_keys(tmp_path):
    model = tmp_path / "maverick"
    model.mkdir()
    (model / "config.json").write_text((FIXTURES / "maverick" / "config.json").read_text())  # no weights needed
    cluster = ClusterConfig(device="cuda", workers=7, vision_encoders=0, gpu_memory="80GB")
    with pytest.raises(PlacementError) as err:
        Deployment.start(DeploymentSpec(str(model), cluster, show_progress=False))
    assert "cluster.workers" in str(err.value) and "model.expert_dtype: fp8" in str(err.value)
    assert not ray.is_initialized()
