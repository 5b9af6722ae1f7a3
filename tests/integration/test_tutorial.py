"""Runs every command and code block of docs/tutorial.md on a tiny model, so the tutorial cannot rot.

Shell blocks run in bash with ``softprompt`` wrapped to use the tiny model and a few steps; Python
blocks run in-process with the model name swapped for the tiny model's folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, free_port

TUTORIAL = REPO / "docs" / "tutorial.md"
SKIP_LINES = ("make ", ". .venv")  # installation steps: the test environment is already installed

WRAPPER = """
softprompt() {
  case "$1" in
    train) command softprompt "$@" --model "$TINY_MODEL" --max_steps 4 --eval_every 2 ;;
    init) command softprompt "$@" --model "$TINY_MODEL" ;;
    compare) command softprompt "$@" --model "$TINY_MODEL" --max_steps 2 --sweep_steps 1 --switch_repeats 1 \
      --num_virtual_tokens 4 --isolate false ;;
    serve) exec softprompt "$@" --model "$TINY_MODEL" ;;  # run with &: exec keeps $! the server's pid
    *) command softprompt "$@" ;;
  esac
}
set -euo pipefail
"""


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TUTORIAL.read_text(), flags=re.S)


@pytest.mark.slow
def test_tutorial_runs_top_to_bottom(tiny_model_dir, tmp_path, monkeypatch):
    bin_dir = Path(sys.executable).parent
    if shutil.which("softprompt", path=str(bin_dir)) is None:
        pytest.skip("the softprompt console script is not installed next to this Python (pip install -e .)")
    env = {**os.environ, "TINY_MODEL": tiny_model_dir, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env["PORT"] = str(free_port())  # the serving section's server, on a port no other test run holds
    shell = blocks("bash")
    assert len(shell) >= 4, "the tutorial lost its command blocks"
    for block in shell:
        script = "\n".join(line for line in block.splitlines() if not line.startswith(SKIP_LINES))
        done = subprocess.run(
            ["bash", "-c", WRAPPER + script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"tutorial block failed:\n{block}\n--- stderr ---\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs/reviews/prompt/adapter_model.safetensors").is_file()
    assert (tmp_path / "runs/reviews/curves.png").is_file()
    # section 13's twelve classes: no distinct first tokens, enough rows: a learned verbalizer
    assert json.loads((tmp_path / "runs/twelve/metrics.json").read_text())["scoring"] == "learned"
    assert (tmp_path / "runs/twelve/prompt/verbalizer.safetensors").is_file()

    monkeypatch.chdir(tmp_path)
    for block in blocks("python"):
        code = block.replace('"smollm2"', repr(tiny_model_dir))
        exec(compile(code, str(TUTORIAL), "exec"), {"__name__": "tutorial"})
