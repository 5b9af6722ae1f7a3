"""Folders replaced atomically (a saved prompt, a checkpoint): a crash at any point leaves the old
contents or the new, and readers find a complete copy (:func:`complete_copy`)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from softprompt.locking import disk_error

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- atomic folders
# A folder is replaced in steps that a crash cannot tear, each a rename:
#   1. the new files are written into ".NAME.tmp-PID-xxxx" and flushed to disk
#   2. that folder is renamed ".NAME.new"        (from here on a complete copy, known by its name)
#   3. the current NAME, if any, is renamed ".NAME.old"
#   4. ".NAME.new" is renamed NAME
#   5. ".NAME.old" is deleted
# Killed after step 2, a complete copy is left under a known name: readers fall back to it
# (:func:`complete_copy`, newest first) and the next write finishes the interrupted one
# (:func:`settle_folder`), which also deletes temporaries left by dead processes.
FAULT_POINTS = ("written", "complete", "old_moved", "new_moved", "done")


def _fault_point(name: str, dest: Path) -> None:
    """A point where a save of ``dest`` can be cut off; tests replace this to simulate a kill there."""


def sibling(dest: Path, tag: str) -> Path:
    return dest.with_name(f".{dest.name}.{tag}")


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: this process is not writing it now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def complete_copy(dest: str | os.PathLike) -> Path:
    """The folder to read for ``dest``: ``dest`` itself, or the complete copy an interrupted save
    left beside it (the new one first); ``dest`` when there is neither."""
    dest = Path(dest)
    for _ in range(3):  # a concurrent save may be between renames: look again
        for candidate in (dest, sibling(dest, "new"), sibling(dest, "old")):
            if candidate.is_dir():
                if candidate != dest:
                    log.warning(
                        "%s: a save was interrupted; reading its complete copy %s", dest, candidate.name
                    )
                return candidate
    return dest


def settle_folder(dest: Path) -> None:
    """Finish a save of ``dest`` that a crash interrupted, and delete dead processes' temporaries."""
    new, old = sibling(dest, "new"), sibling(dest, "old")
    if new.is_dir():
        log.warning("%s: finishing a save that was interrupted", dest)
        _promote(new, dest)
    elif old.is_dir():
        if dest.exists():
            _discard(old)
        else:
            log.warning("%s: restoring the copy an interrupted save moved aside", dest)
            os.rename(old, dest)
    if dest.parent.is_dir():
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            pid = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _discard(stale)


def _promote(new: Path, dest: Path) -> None:
    """Steps 3-5: ``new`` (complete) becomes ``dest``; the previous ``dest`` is deleted."""
    old = sibling(dest, "old")
    if dest.exists():
        _discard(old)
        os.rename(dest, old)
        _fault_point("old_moved", dest)
    os.rename(new, dest)
    _fault_point("new_moved", dest)
    _discard(old)
    _fault_point("done", dest)


def _sync_tree(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        # mkdtemp makes a private 0700 folder; give the result the permissions of a normal save
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~umask)
            with open(path, "rb") as f:  # data on disk before the rename makes it visible
                os.fsync(f.fileno())


def write_folder_atomically(dest: str | os.PathLike, fill) -> Path:
    """Replace folder ``dest`` by what ``fill(folder)`` writes into an empty folder, so that a crash
    at any point leaves the old contents or the new, each readable through :func:`complete_copy`."""
    dest = Path(dest)
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        settle_folder(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
        new = sibling(dest, "new")
        fill(tmp)
        _fault_point("written", dest)
        _sync_tree(tmp)
        os.rename(tmp, new)
    except BaseException as e:
        if tmp is not None:
            _discard(tmp)
        refused = disk_error(e, "save", dest)  # a full or read-only disk: one line, not a traceback
        if refused is not e:
            raise refused from e
        raise
    _fault_point("complete", dest)
    _promote(new, dest)
    return dest


# ---------------------------------------------------------------------------- loading
