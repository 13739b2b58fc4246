"""`moecluster generate` as a user runs it: JSON output, and one-line errors with exit 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import write_json


def moecluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True, text=True, timeout=120)


def moecluster_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """Same as the console script, without paying for a fresh interpreter per case."""
    from deploy.cli.main import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.conftest import make_hf_model

    path = tmp_path_factory.mktemp("ckpt")
    make_hf_model(interleave_moe_layer_step=2).save_pretrained(path)
    write_json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2], "do_sample": False})
    return path


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert (lines and lines[-1].startswith(("error:", "usage:"))) or "error:" in lines[-1], proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_json_output_has_generated_ids_text_and_finish_reason(checkpoint):
    proc = moecluster(
        "generate",
        "--model",
        str(checkpoint),
        "--prompt-ids",
        "1,5,9",
        "--prompt-ids",
        "1,7",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert (
            {"token_ids", "text", "finish_reason"} <= set(row) <= {"token_ids", "text", "finish_reason", "matched_stop"}
        )
        assert ("matched_stop" in row) == (row["finish_reason"] == "stop")
        assert row["finish_reason"] in ("length", "stop")
        assert 1 <= len(row["token_ids"]) <= 6
        assert row["finish_reason"] == "stop" or len(row["token_ids"]) == 6


def test_seeded_sampling_is_reproducible(checkpoint):
    args = (
        "generate",
        "--model",
        str(checkpoint),
        "--prompt-ids",
        "1,5,9",
        "--max-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--seed",
        "7",
        "--json",
        "--ignore-eos",
    )
    first, second = moecluster(*args), moecluster(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "/nonexistent/model", "--prompt-ids", "1"], ["/nonexistent/model", "does not exist"]),
        (["--prompt-ids", ""], ["--prompt-ids", "empty"]),
        (["--prompt", ""], ["--prompt", "empty"]),
        (["--prompt", "hello"], ["no tokenizer.json", "--prompt-ids"]),
        (["--prompt-ids", "1,99999"], ["prompt_ids", "99999", "outside the vocabulary [0, 320)"]),
        (["--prompt-ids", "1,x"], ["--prompt-ids", "comma-separated integers"]),
        (["--prompt-ids", "1", "--temperature", "-1"], ["temperature", ">= 0"]),
        (["--prompt-ids", "1", "--top-p", "0"], ["top_p", "(0, 1]"]),
        (["--prompt-ids", "1", "--top-p", "1.5"], ["top_p", "(0, 1]"]),
        (["--prompt-ids", "1", "--top-k", "-3"], ["top_k", ">= 0"]),
        (["--prompt-ids", "1", "--max-tokens", "0"], ["max_tokens", ">= 1"]),
        (["--prompt-ids", "1", "--max-tokens", "5000"], ["max_tokens", "context length 4096"]),
        (["--prompt-ids", "1", "--temperature", "nan"], ["temperature"]),
        (["--prompt-ids", "1", "--device", "tpu"], ["--device", "cpu, cuda"]),
        (["--prompt-ids", "1", "--dtype", "int3"], ["dtype", "float32"]),
        ([], ["--prompt"]),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(checkpoint, capsys, args, fragments):
    if "--model" not in args:
        args = ["--model", str(checkpoint), *args]
    assert_one_line_error(moecluster_in_process(capsys, "generate", *args), *fragments)


def test_contradictory_config_is_named(checkpoint, tmp_path):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["num_experts_per_tok"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(checkpoint / "model.safetensors"), tmp_path / "model.safetensors")
    assert_one_line_error(
        moecluster("generate", "--model", str(tmp_path), "--prompt-ids", "1"),
        "num_experts_per_tok (99) cannot exceed num_local_experts (8)",
    )


def test_wrong_tensor_shape_is_named(checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:100].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    assert_one_line_error(
        moecluster("generate", "--model", str(tmp_path), "--prompt-ids", "1"),
        "model.embed_tokens.weight",
        "[100, 64]",
        "[320, 64]",
    )


def test_missing_config_is_named(tmp_path):
    assert_one_line_error(moecluster("generate", "--model", str(tmp_path), "--prompt-ids", "1"), "no config.json")


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    from deploy.tiny.model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "maverick", train_steps=0)


def test_several_prompts_run_as_one_batch_and_print_in_the_order_given(tiny_with_tokenizer, tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "count from 3"}]))
    common = ["--model", str(tiny_with_tokenizer), "--max-tokens", "7", "--temperature", "0", "--ignore-eos", "--json"]
    inputs = [["--prompt", "12 13 14"], ["--messages", str(chat)], ["--prompt-ids", "1,40,41"], ["--prompt", "héllo"]]
    together = moecluster_in_process(capsys, "generate", *common, *[a for pair in inputs for a in pair])
    assert together.returncode == 0, together.stderr
    rows = [json.loads(line) for line in together.stdout.splitlines()]
    alone = []
    for pair in inputs:
        proc = moecluster_in_process(capsys, "generate", *common, *pair)
        assert proc.returncode == 0, proc.stderr
        alone.append(json.loads(proc.stdout))
    assert rows == alone
    assert all(len(r["token_ids"]) == 7 and r["finish_reason"] == "length" for r in rows)


def test_bad_messages_file_is_named(tiny_with_tokenizer, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"role": "user"}))
    proc = moecluster_in_process(capsys, "generate", "--model", str(tiny_with_tokenizer), "--messages", str(bad))
    assert_one_line_error(proc, "--messages", "role")


def test_output_constraints_from_the_command_line(tiny_with_tokenizer, tmp_path, capsys):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    common = ["generate", "--model", str(tiny_with_tokenizer), "--prompt", "count from 3", "--max-tokens", "30"]
    common += ["--temperature", "1", "--seed", "3", "--json"]
    picked = moecluster_in_process(capsys, *common, "--choice", "red", "--choice", "blue")
    assert picked.returncode == 0, picked.stderr
    assert json.loads(picked.stdout)["text"] in ("red", "blue")
    shaped = moecluster_in_process(capsys, *common, "--json-schema", f"@{tmp_path / 'schema.json'}")
    assert shaped.returncode == 0, shaped.stderr
    jsonschema.validate(json.loads(json.loads(shaped.stdout)["text"]), schema)
    both = moecluster_in_process(capsys, *common, "--regex", "a+", "--choice", "b")
    assert_one_line_error(both, "--choice", "not allowed with argument --regex")
    unreadable = moecluster_in_process(capsys, *common, "--grammar", f"@{tmp_path / 'missing.ebnf'}")
    assert_one_line_error(unreadable, "--grammar", "cannot read")
