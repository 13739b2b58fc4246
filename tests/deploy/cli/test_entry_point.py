"""The `moecluster` console script named in pyproject.toml resolves to the CLI's main, and `--help` lists every
command (a moved module must not leave the installed script pointing at nothing)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_console_script_target_is_the_cli_main():
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]  # no tomllib on 3.10
    target = re.search(r'^moecluster\s*=\s*"([^"]+)"', scripts, re.MULTILINE).group(1)
    module, _, name = target.partition(":")
    main = getattr(importlib.import_module(module), name)
    assert callable(main)
    from deploy.cli.main import main as cli_main

    assert main is cli_main


def test_python_dash_m_deploy_cli_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for command in ("serve", "generate", "client", "bench", "demo", "tiny-model"):
        assert command in out.stdout
