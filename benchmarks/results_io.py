"""What every benchmark records with its figures: the command that made them, when, and where."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path


def run_command() -> str:
    """This run's command line, e.g. ``python benchmarks/serve_load.py --dtype bfloat16``."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_results(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path`` (folders made as needed) and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
