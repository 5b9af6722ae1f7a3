"""PromptStore: many saved prompts served from ONE loaded base model.

A store is a folder of saved prompts, one sub-folder per prompt (the layout of
:func:`softprompt.prompt.save_prompt`)::

    prompts/
      sentiment/   adapter_config.json  adapter_model.safetensors  softprompt.json
      topic/       ...

Prompts can be listed, added, replaced and removed while requests are running. Readers take an
immutable :class:`StoreSnapshot` (one attribute read, no lock), writers build a new snapshot under a
lock and swap it in, so a request sees the old set or the new set, never a mix. Every prompt is
checked against the base model's embedding fingerprint when it is loaded; lengths may differ.

A causal model's virtual tokens attend only to each other, so their per-layer key/value cache is the
same for every input. When the model supports it (``PromptedLM.prefix_cache``), the store computes it
once per prompt version and hands it out until the prompt is replaced or removed.

A folder that cannot be loaded (damaged, hand-edited, made for another model) does not stop the
others: the store loads the rest, logs a warning and lists it in :meth:`PromptStore.failures`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from softprompt.errors import (
    FolderInUseError,
    InvalidPromptNameError,
    MissingFileError,
    ModelMismatchError,
    PromptFormatError,
    SoftpromptError,
    UnknownPromptError,
    UsageError,
)
from softprompt.model import PromptedLM
from softprompt.peft_format import CONFIG_NAME
from softprompt.prompt import AnyPrompt, load_prompt, save_prompt
from softprompt.usage import PromptUsage

log = logging.getLogger(__name__)

# What reading a damaged or hand-edited folder can raise beyond softprompt's own checks (e.g. a field
# of the wrong JSON type used as a number): reported as a PromptFormatError naming the folder.
READ_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError)

# A prompt name is a folder name inside the store: no separators, no dot-names, nothing that could
# leave the root (checked again on the resolved path). Matched whole (fullmatch): "$" alone would
# also accept a trailing newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class PromptEntry:
    """One loaded prompt. Immutable: a replace makes a new entry with a higher ``version``.

    ``usage``: how the prompt is used (:class:`~softprompt.usage.PromptUsage`), read once when it loads.
    """

    name: str
    version: int
    prompt: AnyPrompt
    usage: PromptUsage
    path: Path | None

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.num_virtual_tokens

    @property
    def labels(self) -> list[str] | None:
        return self.usage.label_names

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "num_virtual_tokens": self.num_virtual_tokens,
            **self.usage.describe(),
            "path": None if self.path is None else str(self.path),
        }


class StoreSnapshot(Mapping[str, PromptEntry]):
    """A read-only view of the loaded prompts at one moment; later changes to the store do not show."""

    def __init__(self, entries: Mapping[str, PromptEntry]):
        self._entries = MappingProxyType(dict(entries))

    def __getitem__(self, name: str) -> PromptEntry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)[:20]) or "none"
            raise UnknownPromptError(
                f"no prompt named {name!r} is loaded (loaded: {known}); load it first or check the name"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class PromptStore:
    """Prompts from the folder ``root``, all on the base model of ``prompted``.

    Args:
        root: the store folder (created if missing). ``load_all=True`` loads every prompt folder in it;
            one that fails is skipped with a warning and listed by :meth:`failures`.
        model: the base model (a ``PromptedLM`` or the HF model it wraps).
        tokenizer: needed for classification tasks (label words -> token ids).
        check_model: refuse prompts whose embedding fingerprint is another model's (default True).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        model: PromptedLM | torch.nn.Module,
        tokenizer=None,
        *,
        load_all: bool = True,
        check_model: bool = True,
    ):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.prompted = model if isinstance(model, PromptedLM) else PromptedLM(model)
        self.tokenizer = tokenizer
        self.check_model = check_model
        self._lock = threading.Lock()  # serialises writers; readers never take it
        self._snapshot = StoreSnapshot({})
        self._versions = itertools.count(1)
        self._prefixes: dict[tuple, object] = {}
        self._prefix_lock = threading.Lock()
        self._failed: dict[str, str] = {}  # folder name -> why it could not be loaded
        if load_all:
            for name in self.available():
                try:
                    self.load(name)
                except SoftpromptError as e:
                    log.warning("prompt folder %r cannot be loaded; serving the others: %s", name, e)

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> StoreSnapshot:
        """The prompts loaded right now, frozen (a later add/replace/remove does not change it)."""
        return self._snapshot

    def names(self) -> list[str]:
        return sorted(self._snapshot)

    def get(self, name: str) -> PromptEntry:
        return self._snapshot[name]

    def __contains__(self, name: object) -> bool:
        return name in self._snapshot

    def __len__(self) -> int:
        return len(self._snapshot)

    def available(self) -> list[str]:
        """Names of the prompt folders in ``root`` (loaded or not)."""
        names = []
        for p in self.root.iterdir():
            if not NAME_PATTERN.fullmatch(p.name):
                continue
            try:
                # A symbolic link is listed even when broken or pointing out of the store, so that
                # loading it fails and says why (in failures()) instead of it vanishing silently.
                if p.is_symlink() or (p.is_dir() and (p / CONFIG_NAME).is_file()):
                    names.append(p.name)
            except OSError:  # unreadable: listed, so that loading it says why
                names.append(p.name)
        return sorted(names)

    def failures(self) -> list[dict[str, str]]:
        """The prompt folders of ``root`` that could not be loaded: ``[{"name", "error"}]`` by name.

        A folder leaves the list when it loads (or is replaced) successfully, or is deleted.
        """
        failed = dict(self._failed)
        return [{"name": n, "error": failed[n]} for n in sorted(failed) if os.path.lexists(self.root / n)]

    def redact(self, text: str) -> str:
        """``text`` with paths inside the store written relative to it (``topic/softprompt.json``)
        and the store folder itself as ``<store>``: for messages shown to remote clients."""
        root = str(self.root)
        return text.replace(root + os.sep, "").replace(root, "<store>")

    def path_of(self, name: str) -> Path:
        """The folder of prompt ``name`` inside ``root``; refuses names that would point elsewhere."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
            raise InvalidPromptNameError(
                f"invalid prompt name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit (no path separators)"
            )
        path = (self.root / name).resolve()
        if path.parent != self.root:  # e.g. a symlink pointing out of the store
            raise InvalidPromptNameError(
                f"prompt name {name!r} resolves outside the store folder {self.root}"
            )
        return path

    # ------------------------------------------------------------------ writing
    def load(self, name: str) -> PromptEntry:
        """Load (or reload) ``root/name`` from disk; it replaces a loaded prompt of that name.

        A failure is remembered for :meth:`failures` while something named ``name`` is in the store.
        """
        try:
            path = self.path_of(name)
            if not path.is_dir():
                raise MissingFileError(
                    f"no prompt folder {name!r} in the store {self.root} (available: "
                    f"{', '.join(self.available()[:20]) or 'none'}); save one there first"
                )
        except (InvalidPromptNameError, MissingFileError) as e:
            if isinstance(name, str) and NAME_PATTERN.fullmatch(name) and os.path.lexists(self.root / name):
                self._failed[name] = str(e)  # e.g. a symbolic link that is broken or leaves the store
            raise
        try:
            prompt = load_prompt(path, self.prompted.model, check_model=self.check_model)
            return self._put(name, prompt, path)
        except SoftpromptError as e:
            self._failed[name] = str(e)
            raise
        except READ_ERRORS as e:
            error = PromptFormatError(
                f"prompt folder {name!r} cannot be loaded ({type(e).__name__}: {e}); a file in it is "
                "damaged or was edited by hand (check the field types of its JSON files), or re-save it"
            )
            self._failed[name] = str(error)
            raise error from e

    def add(self, name: str, prompt: AnyPrompt, *, save: bool = True, overwrite: bool = False) -> PromptEntry:
        """Add ``prompt`` as ``name``; with ``save`` it is also written to ``root/name`` (PEFT format).

        Refuses an existing name unless ``overwrite`` (see :meth:`replace`).
        """
        path = self.path_of(name)
        if not overwrite and (name in self._snapshot or (save and path.exists())):
            raise FolderInUseError(
                f"a prompt named {name!r} already exists in the store; use replace() to swap it, "
                "or choose another name"
            )
        self._check_dims(prompt, name)
        if save:
            save_prompt(prompt, path, self.prompted.model)
            prompt = load_prompt(path, self.prompted.model, check_model=self.check_model)
        return self._put(name, prompt, path if save else None)

    def replace(self, name: str, prompt: AnyPrompt, *, save: bool = True) -> PromptEntry:
        """Swap the prompt ``name`` for ``prompt``; requests already running keep the old one."""
        if name not in self._snapshot:
            raise UnknownPromptError(f"no prompt named {name!r} is loaded; use add() for a new prompt")
        return self.add(name, prompt, save=save, overwrite=True)

    def remove(self, name: str, *, delete_files: bool = False) -> PromptEntry:
        """Unload ``name``; with ``delete_files`` its folder is deleted from the store too."""
        self.path_of(name)
        with self._lock:
            current = self._snapshot
            entry = current[name]  # UnknownPromptError when absent
            self._snapshot = StoreSnapshot({k: v for k, v in current.items() if k != name})
        self._drop_prefixes(name)
        if delete_files and entry.path is not None:
            shutil.rmtree(entry.path, ignore_errors=True)
        log.info("unloaded prompt %s (version %d)", name, entry.version)
        return entry

    def _check_dims(self, prompt: AnyPrompt, name: str) -> None:
        try:
            prompt.check_model(self.prompted.model, f"prompt {name!r}")
        except ModelMismatchError as e:
            raise UsageError(str(e)) from e

    def _put(self, name: str, prompt: AnyPrompt, path: Path | None) -> PromptEntry:
        self._check_dims(prompt, name)
        usage = PromptUsage.from_prompt(prompt, self.tokenizer)  # validates label words before going live
        # Keep an fp32 copy on the model's device so batches never copy prompts from the CPU.
        frozen = prompt.frozen_copy(self.prompted.device)
        with self._lock:
            entry = PromptEntry(name, next(self._versions), frozen, usage, path)
            self._snapshot = StoreSnapshot({**self._snapshot, name: entry})
            self._failed.pop(name, None)
        self._drop_prefixes(name)
        log.info(
            "loaded prompt %s (%d virtual tokens, version %d)", name, entry.num_virtual_tokens, entry.version
        )
        return entry

    # ------------------------------------------------------------------ prefix cache
    def prefix(self, entry: PromptEntry, head: bool = False):
        """The cached key/value prefix of ``entry`` (computed once per version, dtype and device).

        ``head=True``: of the prompt followed by its template's head tokens (``entry.usage.head_ids``).
        """
        tokens = entry.usage.head_ids if head else ()
        key = (entry.name, entry.version, self.prompted.dtype, str(self.prompted.device), tokens)
        cached = self._prefixes.get(key)
        if cached is not None:
            return cached
        with torch.no_grad():
            prefix = self.prompted.prefix_cache(entry.prompt, tokens=tokens)
        with self._prefix_lock:
            current = self._snapshot.get(entry.name)
            # Cache only what is still live: an entry replaced meanwhile would never be evicted.
            if current is not None and current.version == entry.version:
                self._prefixes[key] = prefix
        return prefix

    def _drop_prefixes(self, name: str) -> None:
        with self._prefix_lock:
            for key in [k for k in self._prefixes if k[0] == name]:
                del self._prefixes[key]

    def cached_prefixes(self) -> int:
        return len(self._prefixes)
