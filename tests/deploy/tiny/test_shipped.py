"""The trained tiny checkpoints that ship in the repository: the cache and `moecluster tiny-model` copy them byte for
byte, they are what the current recipe writes (config, tokenizer, tensor names and shapes), a missing file is named
with the command that regenerates it, and an install carries them. That they count and name colours is checked in
test_tiny_model.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from safetensors import safe_open

from deploy.cli.main import main
from deploy.tiny import shipped
from deploy.tiny.cache import TINY_MODEL_NAME, tiny_model
from deploy.tiny.model import PRESETS, write_tiny_model
from deploy.tiny.shipped import FILES, SEED, MissingCheckpoint, copy_shipped, shipped_dir

ROOT = Path(__file__).resolve().parents[3]


def tensor_layout(path: Path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


def assert_same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("preset", PRESETS)
def test_the_cache_copy_is_the_shipped_checkpoint_byte_for_byte(tmp_path, preset):
    path = tiny_model(tmp_path, preset)
    assert path == tmp_path / TINY_MODEL_NAME.replace("scout", preset)
    assert_same_files(path, shipped_dir(preset))
    assert all((path / name).stat().st_mode & 0o777 == 0o644 for name in FILES)


def test_the_cli_copies_the_shipped_checkpoint_and_trains_only_when_asked(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "copy"), "--preset", "maverick"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy")
    assert_same_files(tmp_path / "copy", shipped_dir("maverick"))
    assert main(["tiny-model", str(tmp_path / "random"), "--preset", "maverick", "--train-steps", "0"]) == 0
    random_weights = (tmp_path / "random" / "model.safetensors").read_bytes()
    assert random_weights != (shipped_dir("maverick") / "model.safetensors").read_bytes()
    assert tensor_layout(tmp_path / "random") == tensor_layout(shipped_dir("maverick"))


@pytest.mark.parametrize("preset", PRESETS)
def test_the_shipped_files_are_what_the_current_recipe_writes(tmp_path, preset):
    """A change to the config, the tokenizer or the tensors' names and shapes without regenerating the shipped
    checkpoints fails here (their weights need training, which is not repeated in a test)."""
    fresh = write_tiny_model(tmp_path, preset, seed=SEED, train_steps=0, vision=True)
    for name in FILES:
        if name != "model.safetensors":
            assert (fresh / name).read_bytes() == (shipped_dir(preset) / name).read_bytes(), name
    assert tensor_layout(fresh) == tensor_layout(shipped_dir(preset))


def test_a_missing_shipped_file_is_named_with_the_command_that_regenerates_it(tmp_path, monkeypatch):
    partial = tmp_path / "checkpoints" / "scout"
    shutil.copytree(shipped_dir("scout"), partial)
    (partial / "model.safetensors").unlink()
    monkeypatch.setattr(shipped, "CHECKPOINTS", tmp_path / "checkpoints")
    with pytest.raises(MissingCheckpoint, match=r"lacks \['model.safetensors'\].*moecluster tiny-model --train"):
        tiny_model(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-copied model left in the cache
    with pytest.raises(ValueError, match="scout, maverick"):
        copy_shipped("behemoth", tmp_path / "out")


@pytest.mark.slow
def test_an_installed_package_carries_the_shipped_checkpoints(tmp_path):
    source = tmp_path / "source"  # a copy of what the build reads, so it leaves nothing in the working tree
    for name in ("cluster", "workers", "router", "protos", "deploy"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("moecluster-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in PRESETS:
        assert {f"deploy/tiny/checkpoints/{preset}/{name}" for name in FILES} <= names
