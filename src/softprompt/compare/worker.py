"""The isolated run of ``softprompt compare``: ``python -m softprompt.compare.worker JOB.json RESULT.json``
trains one method in a fresh process, so its peak memory is its own (see :func:`run_method`)."""

import json
import sys
from pathlib import Path

from softprompt.compare.config import CompareConfig
from softprompt.compare.run import run_method

if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    result = run_method(CompareConfig(**job["cfg"]), *job["args"])
    Path(sys.argv[2]).write_text(json.dumps(result))
