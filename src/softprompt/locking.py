"""One writer per folder, and errors from the disk said in one line.

A command that writes a folder (``train`` its run folder, ``init`` its prompt folder) holds a lock on
it for the whole command, so a second writer is refused at once, with the holder's PID and command,
instead of deleting or mixing into a live run. The lock is the operating system's (``filelock``:
``flock`` on POSIX), so it goes away with its process: a lock left by a killed process is simply
taken over, and the log says whose it was.

The lock files sit beside the folder (``.NAME.lock`` and ``.NAME.lock.json``, the holder's PID and
command), not inside it: a prompt folder is replaced by renames on every save, which would take a
lock inside it along.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from safetensors import SafetensorError

from softprompt.errors import DiskWriteError, FolderLockedError

log = logging.getLogger(__name__)

# errno values that mean "the disk or the file system refused", not "softprompt has a bug"
DISK_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free some space there or write to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space in your quota or write to another disk"),
    errno.EROFS: ("the file system is read-only", "write to a writable location"),
    errno.EACCES: ("permission denied", "fix the folder's permissions or write somewhere you may write"),
    errno.EPERM: ("operation not permitted", "fix the folder's permissions or write somewhere you may write"),
}


def lock_paths(folder: str | os.PathLike) -> tuple[Path, Path]:
    """The lock file and the holder file of ``folder`` (beside it)."""
    folder = Path(os.path.abspath(folder))
    return folder.with_name(f".{folder.name}.lock"), folder.with_name(f".{folder.name}.lock.json")


def read_holder(folder: str | os.PathLike) -> dict | None:
    """Who holds (or last held, if it died) the lock of ``folder``: pid, command, host, since."""
    try:
        holder = json.loads(lock_paths(folder)[1].read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not written its PID yet)"
    where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
    return f"PID {holder.get('pid')}{where} ({holder.get('command')}), since {holder.get('since')}"


def _make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing ancestors; returns those created, deepest first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_if_empty(paths: list[Path]) -> None:
    """Remove each of ``paths`` that is an empty folder (deepest first): a refused command leaves no litter."""
    for path in paths:
        try:
            path.rmdir()
        except OSError:
            return  # not empty (or gone): its parents are not empty either


@contextmanager
def folder_lock(folder: str | os.PathLike, hint: str = "choose another folder") -> Iterator[None]:
    """Hold the write lock of ``folder`` for the ``with`` block, or raise :class:`FolderLockedError`.

    ``hint`` ends the refusal message (e.g. "choose another --output_dir"). Folders above ``folder``
    that this call created, and are still empty when the block fails, are removed again.
    """
    folder = Path(folder)
    lock_file, holder_file = lock_paths(folder)
    created = []
    try:
        created = _make_parents(lock_file)
        lock = FileLock(lock_file, timeout=0)
        lock.acquire()
    except Timeout:
        remove_if_empty(created)
        raise FolderLockedError(
            f"{folder} is being written by another softprompt process: {describe(read_holder(folder))}. "
            f"Wait for it to finish or stop it, or {hint}."
        ) from None
    except OSError as e:
        remove_if_empty(created)
        raise disk_error(e, f"lock {folder}") from e
    failed = True
    try:
        stale = read_holder(folder)
        if stale is not None and stale.get("pid") != os.getpid():
            log.warning("%s: taking over the lock left by %s, which is no longer running", folder,
                        describe(stale))  # fmt: skip
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
        holder = {"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        tmp = holder_file.with_name(f"{holder_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, holder_file)  # a reader sees the old holder or the new, never half a file
        yield
        failed = False
    finally:
        try:
            holder_file.unlink(missing_ok=True)
        finally:
            lock.release()
            if failed and created:
                lock_file.unlink(missing_ok=True)
                remove_if_empty(created)


def disk_error(e: Exception, doing: str, where: str | os.PathLike | None = None) -> Exception:
    """A :class:`DiskWriteError` saying what failed, where, and what to do, when ``e`` is the disk's
    refusal (full, read-only, no permission); ``e`` itself otherwise."""
    if isinstance(e, DiskWriteError) or not isinstance(e, OSError | SafetensorError):
        return e
    code = getattr(e, "errno", None)
    if code is None:  # safetensors reports I/O errors as text: "... Os { code: 28, ... }"
        found = re.search(r"code: (\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code not in DISK_ERRNOS:
        return e
    what, fix = DISK_ERRNOS[code]
    place = where or getattr(e, "filename", None)
    at = f" ({place})" if place else ""
    return DiskWriteError(
        f"could not {doing}: {what}{at}. Files saved before are intact; {fix}, then run again.", code
    )
