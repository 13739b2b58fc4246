"""The serve config: examples load, defaults hold, and every bad value is named by its key path with what is allowed."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from cluster.settings import SettingError, parse_bytes
from deploy.config import OVERRIDES, TINY_PRESETS, ServeConfig, apply_overrides, load_serve_config, parse_serve_config

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(raw) -> SettingError:
    with pytest.raises(SettingError) as info:
        parse_serve_config(raw, "config.yaml")
    return info.value


def test_the_four_documented_examples_exist():
    assert {p.name for p in EXAMPLES} >= {
        "tiny-cpu.yaml",
        "scout-4gpu.yaml",
        "scout-8gpu.yaml",
        "maverick-multinode.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_serve_config(path)
    assert isinstance(cfg, ServeConfig) and cfg.source == str(path)


def test_tiny_cpu_example_is_exactly_the_embedded_default():
    assert load_serve_config(CONFIGS / "tiny-cpu.yaml") == load_serve_config(None)


def test_gpu_examples_give_each_actor_a_gpu_and_join_the_ray_cluster():
    for name, workers in [("scout-4gpu.yaml", 4), ("scout-8gpu.yaml", 8), ("maverick-multinode.yaml", 16)]:
        c = load_serve_config(CONFIGS / name).cluster
        assert (c.device, c.workers, c.ray_address) == ("cuda", workers, "auto")
        assert c.router_resources.gpus(c.device) == c.worker_resources.gpus(c.device) == 1


DEFAULTS = {
    "model.path": None,
    "model.dtype": "auto",
    "model.name": None,
    "model.tiny_preset": "scout",
    "cluster.device": "cpu",
    "cluster.routers": 1,
    "cluster.workers": 2,
    "cluster.placement": None,
    "cluster.router_resources.num_cpus": None,
    "cluster.worker_resources.num_gpus": None,
    "cluster.worker_resources.memory": None,
    "cluster.collective_timeout_s": 60,
    "cluster.startup_timeout_s": 600,
    "cluster.ray_address": None,
    "cluster.vision_encoders": None,
    "cluster.vision_encoder_resources.num_cpus": None,
    "cluster.vision_encoder_resources.num_gpus": None,
    "cluster.vision_cache_memory": 256 * 2**20,
    "scheduler.max_num_seqs": 64,
    "scheduler.max_num_batched_tokens": 2048,
    "scheduler.max_model_len": None,
    "scheduler.block_size": 16,
    "scheduler.kv_cache_memory": None,
    "scheduler.micro_batches": None,
    "scheduler.prefix_caching": True,
    "gateway.host": "127.0.0.1",
    "gateway.port": 50051,
    "gateway.max_concurrent_streams": 256,
    "gateway.max_queued_requests": 1024,
    "gateway.max_message_bytes": 32 * 2**20,
    "gateway.max_image_bytes": 20 * 2**20,
    "gateway.max_image_pixels": 50_000_000,
    "gateway.max_images_per_request": 8,
    "gateway.drain_grace_s": 30,
    "gateway.request_timeout_s": None,
    "gateway.routing": "cache_aware",
    "gateway.api_keys_file": None,
    "gateway.tls.cert_file": None,
    "gateway.tls.key_file": None,
    "gateway.tls.client_ca_file": None,
    "metrics.enabled": False,
    "metrics.port": 9090,
    "logging.level": "INFO",
    "logging.format": "text",
}


def value_at(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("key", DEFAULTS)
def test_defaults(key):
    assert value_at(load_serve_config(None), key) == DEFAULTS[key]


def test_an_empty_file_gives_the_defaults(tmp_path):
    assert load_serve_config(write(tmp_path, "# nothing set\n")) == load_serve_config(None)


def test_gpus_per_actor_default_to_one_on_cuda_and_zero_on_cpu():
    res = load_serve_config(None).cluster.worker_resources
    assert (res.gpus("cpu"), res.gpus("cuda")) == (0, 1)


def test_served_name_is_the_name_else_the_checkpoint_directory_else_the_tiny_preset():
    assert parse_serve_config({"model": {"path": "/m/Llama-4-Scout"}}).model.served_name == "Llama-4-Scout"
    assert parse_serve_config({"model": {"path": "/m/x", "name": "scout"}}).model.served_name == "scout"
    assert parse_serve_config({"model": {"tiny_preset": "maverick"}}).model.served_name == "tiny-maverick"


def test_tiny_presets_are_the_tiny_models():
    tiny_model = pytest.importorskip("deploy.tiny.model")
    assert set(TINY_PRESETS) == set(tiny_model.PRESETS)


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_serve_config(None).cluster.workers = 3


def test_the_message_names_file_key_value_and_what_is_allowed(tmp_path):
    path = write(tmp_path, "cluster:\n  workers: -1\n")
    with pytest.raises(SettingError) as info:
        load_serve_config(path)
    assert str(info.value) == f"{path}: cluster.workers: expected an integer >= 0, got -1"
    assert isinstance(info.value, ValueError) and info.value.key == "cluster.workers"


def test_the_error_survives_pickling_as_it_would_crossing_ray():
    error = pickle.loads(pickle.dumps(error_of({"cluster": {"workers": -1}})))
    assert (error.source, error.key, str(error)) == (
        "config.yaml",
        "cluster.workers",
        "config.yaml: cluster.workers: expected an integer >= 0, got -1",
    )


BAD_VALUES = [  # (raw config, key path named, fragments of what is allowed / what was given)
    ({"model": {"dtype": "fp8"}}, "model.dtype", ["auto|float32|bfloat16|float16", "'fp8'"]),
    ({"model": {"tiny_preset": "behemoth"}}, "model.tiny_preset", ["scout|maverick"]),
    ({"model": {"path": ""}}, "model.path", ["non-empty string"]),
    ({"model": {"name": 7}}, "model.name", ["non-empty string", "got 7"]),
    ({"cluster": {"device": "gpu"}}, "cluster.device", ["cpu|cuda", "'gpu'"]),
    ({"cluster": {"routers": 0}}, "cluster.routers", ["integer >= 1", "got 0"]),
    ({"cluster": {"workers": "two"}}, "cluster.workers", ["integer >= 0", "'two'"]),
    ({"cluster": {"workers": True}}, "cluster.workers", ["integer >= 0", "True"]),
    ({"cluster": {"workers": 2.5}}, "cluster.workers", ["integer >= 0", "2.5"]),
    ({"cluster": {"worker_resources": {"num_cpus": -1}}}, "cluster.worker_resources.num_cpus", ["number >= 0"]),
    ({"cluster": {"router_resources": {"num_gpus": "one"}}}, "cluster.router_resources.num_gpus", ["number >= 0"]),
    ({"cluster": {"worker_resources": {"memory": "lots"}}}, "cluster.worker_resources.memory", ["'2GiB'"]),
    ({"cluster": {"placement": "0-7;eight"}}, "cluster.placement", ["'0-5;6-10;11-15'", "'0-7;eight'"]),
    ({"cluster": {"placement": {"a": [[0]]}}}, "cluster.placement", ["layer keys must be integers >= 0"]),
    ({"cluster": {"placement": {0: [[0], []]}}}, "cluster.placement", ["non-empty expert lists"]),
    ({"cluster": {"placement": [[0, 1], [2]]}}, "cluster.placement", ["mapping MoE layer"]),
    ({"cluster": {"collective_timeout_s": 0}}, "cluster.collective_timeout_s", ["number > 0", "got 0"]),
    ({"cluster": {"startup_timeout_s": float("inf")}}, "cluster.startup_timeout_s", ["number > 0"]),
    ({"cluster": {"ray_address": 5}}, "cluster.ray_address", ["non-empty string"]),
    ({"cluster": {"vision_encoders": -1}}, "cluster.vision_encoders", ["integer >= 0", "got -1"]),
    ({"cluster": {"vision_cache_memory": "big"}}, "cluster.vision_cache_memory", ["'512MiB'", "'big'"]),
    (
        {"cluster": {"vision_encoder_resources": {"num_cpus": -0.5}}},
        "cluster.vision_encoder_resources.num_cpus",
        ["number >= 0"],
    ),
    ({"scheduler": {"max_num_seqs": 0}}, "scheduler.max_num_seqs", ["integer >= 1", "got 0"]),
    ({"scheduler": {"max_model_len": -5}}, "scheduler.max_model_len", ["integer >= 1"]),
    ({"scheduler": {"block_size": "16"}}, "scheduler.block_size", ["integer >= 1", "'16'"]),
    ({"scheduler": {"kv_cache_memory": "2 parsecs"}}, "scheduler.kv_cache_memory", ["'512MiB'", "'2 parsecs'"]),
    ({"scheduler": {"kv_cache_memory": 0}}, "scheduler.kv_cache_memory", ["integer >= 1"]),
    ({"gateway": {"port": 70000}}, "gateway.port", ["integer in 0..65535", "70000"]),
    ({"gateway": {"port": -1}}, "gateway.port", ["integer in 0..65535"]),
    ({"gateway": {"host": ""}}, "gateway.host", ["non-empty string"]),
    ({"gateway": {"max_message_bytes": "4GiB"}}, "gateway.max_message_bytes", ["at most 2147483647 bytes"]),
    ({"gateway": {"drain_grace_s": -1}}, "gateway.drain_grace_s", ["number >= 0"]),
    ({"gateway": {"max_image_bytes": 0}}, "gateway.max_image_bytes", ["integer >= 1"]),
    ({"gateway": {"max_image_pixels": 10**9}}, "gateway.max_image_pixels", ["integer in 1..89478485"]),
    ({"gateway": {"max_images_per_request": -1}}, "gateway.max_images_per_request", ["integer >= 0"]),
    ({"gateway": {"request_timeout_s": 0}}, "gateway.request_timeout_s", ["number > 0"]),
    ({"gateway": {"api_keys_file": "/no/such/keys"}}, "gateway.api_keys_file", ["cannot read the key file"]),
    ({"gateway": {"tls": {"cert_file": "/no/cert.pem"}}}, "gateway.tls.cert_file", ["cannot read '/no/cert.pem'"]),
    ({"gateway": {"tls": {"client_ca_file": ""}}}, "gateway.tls.client_ca_file", ["non-empty string"]),
    ({"gateway": {"tls": "on"}}, "gateway.tls", ["expected a mapping of keys", "got 'on'"]),
    ({"metrics": {"enabled": "yes please"}}, "metrics.enabled", ["true or false"]),
    ({"metrics": {"port": 65536}}, "metrics.port", ["integer in 0..65535"]),
    ({"logging": {"level": "LOUD"}}, "logging.level", ["DEBUG|INFO|WARNING|ERROR|CRITICAL", "'LOUD'"]),
    ({"logging": {"format": "xml"}}, "logging.format", ["text|json"]),
    ({"cluster": 3}, "cluster", ["expected a mapping of keys", "got 3"]),
    ([1, 2], "(top level)", ["expected a mapping of keys"]),
]


@pytest.mark.parametrize("raw, key, fragments", BAD_VALUES, ids=[case[1] for case in BAD_VALUES])
def test_each_bad_value_names_its_key_and_what_is_allowed(raw, key, fragments):
    error = error_of(raw)
    assert error.key == key and str(error).startswith(f"config.yaml: {key}: ")
    for fragment in fragments:
        assert fragment in error.problem


CROSS_FIELD = [
    (
        {"cluster": {"device": "cuda", "worker_resources": {"num_gpus": 0}}},
        "cluster.worker_resources.num_gpus",
        "expected a number >= 1",
    ),
    (
        {"cluster": {"device": "cuda", "workers": 0, "router_resources": {"num_gpus": 0.5}}},
        "cluster.router_resources.num_gpus",
        "own GPU",
    ),
    ({"cluster": {"workers": 2, "placement": "0-5;6-10;11-15"}}, "cluster.placement", "names 3 workers"),
    (
        {"cluster": {"workers": 2, "placement": {1: [[0], [1]], 3: [[0, 1]]}}},
        "cluster.placement",
        "same number of workers",
    ),
    (
        {"scheduler": {"max_num_seqs": 128, "max_num_batched_tokens": 64}},
        "scheduler.max_num_batched_tokens",
        ">= max_num_seqs (128)",
    ),
    ({"metrics": {"enabled": True, "port": 50051}}, "metrics.port", "also gateway.port"),
]


@pytest.mark.parametrize("raw, key, fragment", CROSS_FIELD, ids=[case[1] for case in CROSS_FIELD])
def test_rules_across_keys_name_the_key_to_change(raw, key, fragment):
    error = error_of(raw)
    assert error.key == key and fragment in error.problem


def test_vision_encoders_default_to_one_with_a_vision_tower_and_zero_without():
    cluster = load_serve_config(None).cluster
    assert (cluster.with_vision(True).vision_encoders, cluster.with_vision(False).vision_encoders) == (1, 0)
    assert parse_serve_config({"cluster": {"vision_encoders": 0}}).cluster.with_vision(True).vision_encoders == 0


def test_vision_encoders_for_a_checkpoint_without_a_vision_tower_are_refused_naming_the_key():
    with pytest.raises(SettingError) as info:
        parse_serve_config({"cluster": {"vision_encoders": 2}}).cluster.with_vision(False)
    assert info.value.key == "vision_encoders" and "no vision tower" in info.value.problem


def test_cuda_without_workers_needs_no_worker_gpus():
    cfg = parse_serve_config({"cluster": {"device": "cuda", "workers": 0, "worker_resources": {"num_gpus": 0}}})
    assert cfg.cluster.workers == 0


def test_gpus_and_ports_that_are_allowed_pass():
    cfg = parse_serve_config(
        {"cluster": {"device": "cuda"}, "metrics": {"enabled": False, "port": 50051}, "gateway": {"port": 0}}
    )
    assert cfg.cluster.worker_resources.gpus("cuda") == 1 and cfg.gateway.port == 0


@pytest.mark.parametrize(
    "raw, key, suggestion",
    [
        ({"clustr": {}}, "clustr", "did you mean 'cluster'?"),
        ({"cluster": {"worker": 4}}, "cluster.worker", "did you mean 'workers'?"),
        ({"cluster": {"worker_resources": {"num_gpu": 1}}}, "cluster.worker_resources.num_gpu", "'num_gpus'"),
        ({"scheduler": {"max_num_seq": 8}}, "scheduler.max_num_seq", "'max_num_seqs'"),
    ],
)
def test_unknown_keys_are_named_with_the_closest_allowed_key(raw, key, suggestion):
    error = error_of(raw)
    assert error.key == key and "unknown key" in error.problem and suggestion in error.problem


def test_an_unknown_key_lists_the_keys_allowed_at_its_level():
    problem = error_of({"metrics": {"zzz": 1}}).problem
    assert "did you mean" not in problem and "allowed in metrics: enabled, port" in problem
    assert (
        "allowed at the top level: model, cluster, scheduler, gateway, metrics, logging"
        in error_of({"source": "x"}).problem
    )


def test_a_key_given_twice_is_an_error(tmp_path):
    with pytest.raises(SettingError, match="'workers' is given twice"):
        load_serve_config(write(tmp_path, "cluster:\n  workers: 2\n  workers: 4\n"))


def test_yaml_syntax_errors_and_missing_files_name_the_file(tmp_path):
    with pytest.raises(SettingError, match=r"config.yaml: \(file\): not valid YAML"):
        load_serve_config(write(tmp_path, "cluster: [unclosed\n"))
    with pytest.raises(SettingError, match=r"missing.yaml: \(file\): cannot read the config file"):
        load_serve_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "text, size",
    [
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", 3 * 2**29),
        ("64KiB", 65536),
        ("2GB", 2 * 10**9),
        ("2Gi", 2 * 2**30),
        ("4096", 4096),
        ("100B", 100),
        ("1tib", 2**40),
        (12345, 12345),
    ],
)
def test_kv_cache_memory_sizes_parse_to_bytes(text, size):
    assert parse_bytes(text) == size
    assert parse_serve_config({"scheduler": {"kv_cache_memory": text}}).scheduler.kv_cache_memory == size


def test_placement_accepts_ranges_and_per_layer_mappings():
    assert parse_serve_config({"cluster": {"placement": "0-7; 8-15"}}).cluster.placement == "0-7; 8-15"
    mapping = parse_serve_config({"cluster": {"placement": {0: [[0, 1], [2, 3]], "1": [[3], [0, 1, 2]]}}})
    assert mapping.cluster.placement == {0: ((0, 1), (2, 3)), 1: ((3,), (0, 1, 2))}


def test_logging_level_is_case_insensitive():
    assert parse_serve_config({"logging": {"level": "debug"}}).logging.level == "DEBUG"


def scout_file(tmp_path: Path) -> ServeConfig:
    return load_serve_config(
        write(tmp_path, "model: {path: /models/scout}\ncluster: {workers: 4}\ngateway: {port: 6000}\n")
    )


def test_command_line_overrides_win_over_the_file(tmp_path):
    cfg = apply_overrides(scout_file(tmp_path), model_path="/other/model", workers=3, port=7000, dtype="bfloat16")
    assert (cfg.model.path, cfg.cluster.workers, cfg.gateway.port, cfg.model.dtype) == (
        "/other/model",
        3,
        7000,
        "bfloat16",
    )


def test_flags_not_given_keep_the_file_and_the_original_is_unchanged(tmp_path):
    original = scout_file(tmp_path)
    cfg = apply_overrides(original, model_path=None, workers=None, device="cuda")
    assert (cfg.model.path, cfg.cluster.workers, cfg.cluster.device) == ("/models/scout", 4, "cuda")
    assert original.cluster.device == "cpu"


def test_a_bad_override_names_the_flag_and_its_key(tmp_path):
    with pytest.raises(SettingError) as info:
        apply_overrides(scout_file(tmp_path), workers=-2)
    assert str(info.value) == "command line: --workers (cluster.workers): expected an integer >= 0, got -2"


def test_an_override_that_breaks_a_file_value_is_reported_against_the_file_key(tmp_path):
    cfg = load_serve_config(write(tmp_path, "cluster: {workers: 2, worker_resources: {num_gpus: 0}}\n"))
    with pytest.raises(SettingError) as info:
        apply_overrides(cfg, device="cuda")
    assert info.value.key == "cluster.worker_resources.num_gpus" and "command-line flags" in info.value.source


def test_overrides_parse_sizes_and_placements_like_the_file():
    cfg = apply_overrides(load_serve_config(None), kv_cache_memory="1GiB", placement="0-7;8-15", workers=2)
    assert (cfg.scheduler.kv_cache_memory, cfg.cluster.placement) == (2**30, "0-7;8-15")


def test_an_unknown_flag_is_a_programming_error():
    with pytest.raises(TypeError, match="unknown flags \\['wokers'\\]"):
        apply_overrides(load_serve_config(None), wokers=3)


def test_every_override_sets_a_real_key():
    cfg = load_serve_config(None)
    for key in OVERRIDES.values():
        value_at(cfg, key)  # raises AttributeError for a key that does not exist
