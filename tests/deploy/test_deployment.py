"""Expert parallelism on a real local Ray: the cluster computes exactly what the in-process model computes,
each worker holds only its share, and a worker killed mid-generation fails the run clearly and cleanly."""

from __future__ import annotations

import os

import pytest
import ray

from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from router.reference.decode import Generator
from router.request.sampling_params import SamplingParams
from tests.cluster.test_llama4_parity import full_logits, load_ours
from tests.conftest import LLAMA3_ROPE, make_hf_model

pytestmark = pytest.mark.slow

PRESETS = {
    "scout-like": dict(
        num_local_experts=16,
        interleave_moe_layer_step=1,
        num_experts_per_tok=1,
        use_qk_norm=True,
        rope_parameters=LLAMA3_ROPE,
    ),
    "maverick-like-top2": dict(
        num_local_experts=16, interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False
    ),
}
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=24, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for name, overrides in PRESETS.items():
        paths[name] = tmp_path_factory.mktemp(name)
        make_hf_model(seed=3, **overrides).save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_cluster_matches_in_process_model(local_ray, checkpoints, preset, workers):
    path = checkpoints[preset]
    model, transport = load_ours(path)
    ids = list(range(2, 40))  # crosses several 8-token attention chunks
    expected_logits = full_logits(model, transport, ids)
    expected_tokens = Generator.from_checkpoint(path, dtype="float32").generate(PROMPT, GREEDY).token_ids
    with Deployment.start(DeploymentSpec(str(path), ClusterConfig(workers=workers))) as cluster:
        logits = ray.get(cluster.router.forward_logits.remote(ids))
        tokens = cluster.generate(PROMPT, GREEDY)["token_ids"]
        stats = cluster.stats()
    assert (logits - expected_logits).abs().max().item() < 1e-5
    assert tokens == expected_tokens
    cfg = model.config
    # Every routed row reached exactly one worker: forward_logits (38 tokens) + prefill (7) + 23 decode steps.
    # Decode steps carry 1 token with top-k <= 2 experts, so with 3+ workers some workers get no rows at all.
    rows = (len(ids) + len(PROMPT) + GREEDY.max_tokens - 1) * cfg.num_experts_per_tok
    for layer in cfg.moe_layers:
        assert sum(sum(w.tokens_per_expert[layer].values()) for w in stats.workers) == rows


@pytest.mark.parametrize("placement", [None, "0-1;2-9;10-15"])
def test_each_worker_holds_only_its_share_of_expert_bytes(local_ray, checkpoints, placement):
    path = checkpoints["scout-like"]
    cfg = load_ours(path)[0].config
    per_expert = 4 * 3 * cfg.hidden_size * cfg.intermediate_size  # fp32 gate, up and down
    with Deployment.start(DeploymentSpec(str(path), ClusterConfig(workers=3, placement=placement))) as cluster:
        stats = cluster.stats()
        expected = cluster.expert_map
    total = 0
    for w in stats.workers:
        held = {layer: tuple(experts) for layer, experts in w.experts.items()}
        assert held == {layer: expected.experts_of(w.slot, layer) for layer in cfg.moe_layers}
        share = sum(len(e) for e in held.values()) * per_expert
        assert w.bytes_resident == share and w.bytes_read == share  # nothing else was read
        total += share
    assert total == cfg.num_local_experts * len(cfg.moe_layers) * per_expert
    assert stats.router.bytes_read < total  # the router reads no routed expert
