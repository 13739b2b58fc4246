"""`moecluster generate --messages chat.json` with images, as a user runs it: content lists of text and image
parts (a path relative to the JSON file, or a data: URL) give the same output in this process (`--workers 0`, the
engine encoding images itself) as on a Ray cluster of 2 expert workers and a vision encoder; and a bad part is
refused before anything starts, naming the file and the part."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from deploy.tiny.squares import QUESTION, square_png


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    return str(write_tiny_model(tmp_path_factory.mktemp("vlm"), "maverick", train_steps=0, vision=True))


def write_chats(tmp_path) -> list[str]:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.png").write_bytes(square_png("red", 40, 50, 1))
    url = "data:image/png;base64," + base64.b64encode(square_png("blue", 90, 100, 2)).decode()
    chats = {
        "one.json": [{"role": "user", "content": [{"type": "image", "path": "images/red.png"}, QUESTION]}],
        "two.json": [
            {"role": "system", "content": "Answer in one word."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "First"},
                    {"type": "image", "url": url},
                    {"type": "text", "text": "then"},
                    {"type": "image", "path": "images/red.png"},
                    {"type": "text", "text": QUESTION},
                ],
            },
        ],
    }
    for name, messages in chats.items():
        (tmp_path / name).write_text(json.dumps(messages))
    return [str(tmp_path / name) for name in chats]


def generate(model_dir: str, chats: list[str], *flags: str) -> subprocess.CompletedProcess:
    inputs = [arg for path in chats for arg in ("--messages", path)]
    cmd = [sys.executable, "-m", "deploy.cli", "generate", "--model", model_dir, *inputs, "--json"]
    cmd += ["--max-tokens", "16", "--ignore-eos", "--temperature", "0", *flags]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"}
    )


@pytest.mark.slow
def test_image_chats_give_the_same_output_in_process_and_on_a_cluster(model_dir, tmp_path):
    chats = write_chats(tmp_path)
    local = generate(model_dir, chats, "--workers", "0")
    assert local.returncode == 0, local.stderr
    results = [json.loads(line) for line in local.stdout.splitlines()]
    assert [len(r["token_ids"]) for r in results] == [16, 16]
    cluster = generate(model_dir, chats, "--workers", "2")  # and a vision encoder: the default with a vision tower
    assert cluster.returncode == 0, cluster.stderr
    assert [json.loads(line)["token_ids"] for line in cluster.stdout.splitlines()] == [r["token_ids"] for r in results]


def test_a_bad_image_part_is_refused_naming_the_file_and_the_part(model_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "user", "content": [{"type": "image", "path": "missing.png"}]}]))
    done = generate(model_dir, [str(bad)])
    assert done.returncode == 2
    assert f"{bad}: messages[0].content[0].path: cannot read {tmp_path / 'missing.png'}" in done.stderr
