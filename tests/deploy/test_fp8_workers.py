"""FP8 experts on Ray workers: the official-layout checkpoint in both variants gives transformers' greedy tokens on
the dequantized weights over 2 workers, the workers hold their experts in FP8 (measured resident bytes about half
of bf16, reported with the dtype), quantize-on-load runs on the workers, and a worker killed mid-generation with 2
expert replicas changes no token."""

from __future__ import annotations

import uuid

import pytest
import ray
import torch

from cluster.actor_state import MemberState
from deploy.bench.interruption import interrupted
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from deploy.tiny.fp8_layout import write_fp8_copy
from router.reference.decode import Generator
from router.request.messages import EngineRequest
from router.request.sampling_params import SamplingParams
from tests.cluster.test_fp8_checkpoints import MODELS, PROMPTS, dequantized_copy, hf_greedy
from tests.conftest import make_hf_model
from tests.deploy.test_failover import Streams, sigkill
from tests.procs import pid_of
from tests.waiting import wait_for

pytestmark = pytest.mark.slow
TOKENS = 24


def greedy_requests(max_tokens: int = TOKENS) -> list[EngineRequest]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [EngineRequest(uuid.uuid4().hex, params, prompt_ids=tuple(p)) for p in PROMPTS]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source")
    make_hf_model(seed=5, num_local_experts=8, **MODELS["maverick-like"]).save_pretrained(path)
    return path


def transformers_tokens(fp8_dir, tmp_path) -> list[list[int]]:
    from transformers import Llama4ForCausalLM

    oracle = dequantized_copy(fp8_dir, tmp_path / "dequantized")
    hf = Llama4ForCausalLM.from_pretrained(oracle, dtype=torch.float32, attn_implementation="sdpa").eval()
    return [hf_greedy(hf, p, TOKENS) for p in PROMPTS]


def start(path, dtype: str = "float32", expert_dtype: str = "auto", replicas: int = 1) -> Deployment:
    cluster = ClusterConfig(workers=2, expert_replicas=replicas)
    spec = DeploymentSpec(str(path), cluster, dtype=dtype, expert_dtype=expert_dtype, show_progress=False)
    return Deployment.start(spec)


@pytest.mark.parametrize("scope", ["fp8", "fp8-mlp"])
def test_two_workers_give_transformers_tokens_and_hold_fp8(source, tmp_path, scope):
    fp8 = write_fp8_copy(source, tmp_path / scope, scope)
    expected = transformers_tokens(fp8, tmp_path)
    with start(fp8) as d:
        results = d.generate_batch(greedy_requests(), timeout_s=300)
        workers = d.stats().workers
    assert [r["token_ids"] for r in results] == expected
    assert [w.expert_dtype for w in workers] == ["fp8", "fp8"]


def test_resident_expert_bytes_in_fp8_are_about_half_of_bf16(source):
    with start(source, dtype="bfloat16") as d:
        bf16 = d.stats().workers
    with start(source, dtype="bfloat16", expert_dtype="fp8") as d:  # quantized as each worker reads its experts
        fp8 = d.stats().workers
    assert [w.expert_dtype for w in bf16] == ["bfloat16"] * 2 and [w.expert_dtype for w in fp8] == ["fp8"] * 2
    for a, b in zip(fp8, bf16):
        assert a.experts == b.experts and b.bytes_resident > 0
        assert 0.45 < a.bytes_resident / b.bytes_resident < 0.56  # 1 byte a weight + fp32 scales per row


def test_quantize_on_load_on_workers_gives_the_fp8_checkpoints_tokens(source, tmp_path):
    fp8 = write_fp8_copy(source, tmp_path / "fp8")
    in_process = Generator.from_checkpoint(fp8, dtype="float32")
    expected = [in_process.generate(list(p), r.params).token_ids for p, r in zip(PROMPTS, greedy_requests())]
    with start(source, expert_dtype="fp8") as d:
        assert [r["token_ids"] for r in d.generate_batch(greedy_requests(), timeout_s=300)] == expected


def test_a_worker_killed_mid_generation_with_two_replicas_changes_no_token(source, tmp_path):
    fp8 = write_fp8_copy(source, tmp_path / "fp8")
    in_process = Generator.from_checkpoint(fp8, dtype="float32")
    requests = greedy_requests(120)
    expected = [in_process.generate(list(r.prompt_ids), r.params).token_ids for r in requests]
    with start(fp8, replicas=2) as d:
        victim = pid_of(d.workers[1])
        results = run_kill(d, victim, requests)
        assert [r["finish_reason"] for r in results] == ["length"] * len(requests)
        assert [r["token_ids"] for r in results] == expected
        wait_for(lambda: all(s.state is MemberState.SERVING for s in d.supervision().slots))
        assert ray.get(d.router.stats.remote(), timeout=30).channel.failovers >= 1


def run_kill(d: Deployment, victim: int, requests: list[EngineRequest]) -> list[dict]:
    """The requests streamed while worker `victim` is killed once every one of them is generating; checked to
    have come between their tokens."""
    streams = Streams(d, requests)
    killed = streams.when_generating(sigkill(victim))
    results = streams.join()
    assert interrupted(streams.times, killed), "the kill landed after the load"
    return results
