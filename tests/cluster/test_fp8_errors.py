"""Bad FP8 input is refused when the checkpoint is opened, before any weight is read or any actor starts, with an
error naming the tensor or the config field: a missing or mis-shaped scale, an unsupported scheme, FP8 tensors the
config does not account for."""

from __future__ import annotations

import json
import shutil

import pytest
import ray
from safetensors.torch import load_file, save_file

from cluster.checkpoint import CheckpointError, CheckpointReader
from cluster.config import ConfigError
from deploy.cluster_config import ClusterConfig
from deploy.deployment import Deployment, DeploymentSpec
from deploy.tiny.model import write_tiny_model

UP = "model.layers.1.feed_forward.experts.3.up_proj.weight"
GROUP = "quantization_config.config_groups.group_0"


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("fp8"), "maverick", train_steps=0, quantize="fp8")


def broken(fp8_dir, tmp_path, tensors=None, config=None):
    """A copy of the FP8 tiny model with `tensors(dict)` / `config(dict)` applied."""
    dst = tmp_path / "broken"
    shutil.copytree(fp8_dir, dst)
    if tensors is not None:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors")
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_a_missing_scale_names_the_scale_tensor(fp8_dir, tmp_path):
    path = broken(fp8_dir, tmp_path, tensors=lambda t: t.pop(UP + "_scale"))
    with pytest.raises(CheckpointError, match=rf"'{UP}_scale' is missing.*'{UP}'"):
        CheckpointReader(path)


@pytest.mark.parametrize("shape", [(64,), (1, 1), (1, 64)])
def test_a_scale_of_the_wrong_shape_names_the_tensor_and_both_shapes(fp8_dir, tmp_path, shape):
    def reshape(t):
        t[UP + "_scale"] = t[UP + "_scale"].reshape(-1)[: shape[0] * (shape[1] if len(shape) > 1 else 1)].reshape(shape)

    with pytest.raises(CheckpointError) as err:
        CheckpointReader(broken(fp8_dir, tmp_path, tensors=reshape))
    assert f"'{UP}_scale' has shape {list(shape)}, expected [64, 1]" in str(err.value)


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("weights.strategy", "block", f"{GROUP}.weights.strategy is 'block'"),
        ("weights.strategy", "tensor", f"{GROUP}.weights.strategy is 'tensor'"),
        ("weights.num_bits", 4, f"{GROUP}.weights.num_bits is 4"),
        ("weights.type", "int", f"{GROUP}.weights.type is 'int'"),
        ("weights.block_structure", [128, 128], f"{GROUP}.weights.block_structure is [128, 128]"),
        ("weights.group_size", 128, f"{GROUP}.weights.group_size is 128"),
        ("input_activations.dynamic", False, f"{GROUP}.input_activations.dynamic is False"),
        ("input_activations.strategy", "tensor", f"{GROUP}.input_activations.strategy is 'tensor'"),
    ],
)
def test_an_unsupported_scheme_names_the_field_and_value(fp8_dir, tmp_path, field, value, named):
    section, key = field.split(".")

    def change(c):
        c["quantization_config"]["config_groups"]["group_0"][section][key] = value

    with pytest.raises(ConfigError) as err:
        CheckpointReader(broken(fp8_dir, tmp_path, config=change))
    assert named in str(err.value) and "supported:" in str(err.value)


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("quant_method", "fbgemm_fp8", "quantization_config.quant_method is 'fbgemm_fp8'"),
        ("quant_method", "gptq", "quantization_config.quant_method is 'gptq'"),
        ("format", "pack-quantized", "quantization_config.format is 'pack-quantized'"),  # w4a16
        ("format", "int-quantized", "quantization_config.format is 'int-quantized'"),
        ("quantization_status", "frozen", "quantization_config.quantization_status is 'frozen'"),
        ("kv_cache_scheme", {"num_bits": 8}, "quantization_config.kv_cache_scheme is {'num_bits': 8}"),
        ("config_groups", {}, "quantization_config.config_groups is {}"),
    ],
)
def test_an_unsupported_config_names_the_field_and_value(fp8_dir, tmp_path, key, value, named):
    def change(c):
        c["quantization_config"][key] = value

    with pytest.raises(ConfigError, match="supported:") as err:
        CheckpointReader(broken(fp8_dir, tmp_path, config=change))
    assert named in str(err.value)


def test_fp8_tensors_without_a_quantization_config_are_refused(fp8_dir, tmp_path):
    path = broken(fp8_dir, tmp_path, config=lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match=r"is F8_E4M3, but config.json has no quantization_config"):
        CheckpointReader(path)


def test_an_fp8_tensor_of_an_ignored_module_is_refused(fp8_dir, tmp_path):
    path = broken(fp8_dir, tmp_path, config=lambda c: c["quantization_config"]["ignore"].append("re:.*experts"))
    with pytest.raises(CheckpointError, match=r"is F8_E4M3, but quantization_config does not quantize module"):
        CheckpointReader(path)


def test_a_targeted_module_stored_unquantized_is_refused(fp8_dir, tmp_path):
    def unignore_shared(c):
        c["quantization_config"]["ignore"] = [i for i in c["quantization_config"]["ignore"] if "shared" not in i]

    with pytest.raises(
        CheckpointError, match=r"shared_expert\.\w+_proj\.weight. is F32, but quantization_config quantizes module"
    ):
        CheckpointReader(broken(fp8_dir, tmp_path, config=unignore_shared))


def test_nothing_starts_on_a_bad_checkpoint(fp8_dir, tmp_path):
    path = broken(fp8_dir, tmp_path, tensors=lambda t: t.pop(UP + "_scale"))
    with pytest.raises(CheckpointError, match="is missing"):
        Deployment.start(DeploymentSpec(str(path), ClusterConfig(workers=2), show_progress=False))
    assert not ray.is_initialized()  # refused before Ray (and any actor) started
