"""Peak memory of one benchmark variant, measured alone in a child process: the child resets the
kernel's high-water mark after setting up, runs its steps and prints ``MEMORY {json}``; the parent
reads that line."""

from __future__ import annotations

import gc
import json
import resource
import subprocess
from collections.abc import Callable
from pathlib import Path


def proc_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def report_steps(step: Callable[[], object], steps: int) -> None:
    """In the child: the peak while running ``step`` ``steps`` times, over the RSS before them."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base_kib = proc_kib("VmRSS")
    except OSError:  # no reset possible: ru_maxrss includes the load peak, so this is an upper bound
        base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        step()
    print("MEMORY " + json.dumps({"base_mib": base_kib / 1024, "peak_mib": proc_kib("VmHWM") / 1024}))


def child_memory(cmd: list[str], name: str) -> dict[str, float]:
    """In the parent: run ``cmd`` (a child that calls :func:`report_steps`) and read its figures."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"memory run of {name} failed:\n{res.stderr[-3000:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("MEMORY "))
    return json.loads(line.removeprefix("MEMORY "))
