"""One family of errors for everything a user can get wrong: bad settings, bad data, bad files.

Every error softprompt raises *on purpose* derives from :class:`SoftpromptError`; its message says
what happened, what was expected and how to fix it, so the command line prints it alone. Any other
exception is a bug in softprompt (or in a library under it) and is shown with its traceback.

Each class also derives from the built-in exception a caller would naturally catch
(``ValueError``, ``FileNotFoundError``, ``KeyError``, ``OSError``), so ``except ValueError`` code
keeps working.
"""

from __future__ import annotations

MAX_LISTED_PROBLEMS = 20


class SoftpromptError(Exception):
    """Base class of the errors that are the user's to fix (the CLI prints them without a traceback)."""


class UsageError(SoftpromptError, ValueError):
    """An argument value that cannot be used: a template without ``{text}``, a bad verbalizer, ..."""


class ConfigError(SoftpromptError, ValueError):
    """A configuration value is missing, out of range or inconsistent with another one.

    ``problems`` lists every problem found, so a user fixes a bad config in one round.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")

    def __reduce__(self):  # keep problems when pickled (e.g. across processes)
        return (type(self), (self.problems,))


class DataError(SoftpromptError, ValueError):
    """A data file (or dataset) has rows that cannot be used; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str] | str, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint or "fix or remove the rows listed above, then run again."
        shown = "\n".join(f"  - {p}" for p in self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        if more > 0:
            shown += f"\n  ... and {more} more"
        super().__init__(f"{len(self.problems)} problem(s) in the data:\n{shown}\nHow to fix: {self.hint}")

    def __reduce__(self):  # keep problems when pickled (e.g. across DataLoader workers)
        return (type(self), (self.problems, self.hint))


class PromptFormatError(SoftpromptError, ValueError):
    """A saved prompt is missing, truncated, corrupt or not a prompt-tuning adapter."""


class ModelMismatchError(SoftpromptError, ValueError):
    """A saved prompt was made for a different base model."""


class MissingFileError(SoftpromptError, FileNotFoundError):
    """A file or folder the user named does not exist (or is the wrong kind of thing)."""


class FolderInUseError(SoftpromptError, FileExistsError):
    """A destination folder holds something that saving there would destroy."""


class ModelLoadError(SoftpromptError, OSError):
    """A base model could not be loaded (not installed, not offline, not a model folder)."""


class UnknownPromptError(SoftpromptError, KeyError):
    """No prompt with this name is loaded."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class InvalidPromptNameError(SoftpromptError, ValueError):
    """A prompt name that is not a plain folder name inside the store."""


class FolderLockedError(FolderInUseError):
    """Another live process is writing this folder (a training run, an ``init``)."""


class DiskWriteError(SoftpromptError, OSError):
    """Saving failed for a reason outside softprompt: a full disk, a read-only file system, no permission."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno N] ..."
        return str(self.args[0])


class TrainingInterrupted(SoftpromptError):
    """Training stopped on a signal (Ctrl-C, SIGTERM) after saving a checkpoint at the last whole step."""
