"""`softprompt <command>`: a thin command-line layer over the library.

:mod:`~softprompt.cli.parser` builds the options (from typed signatures and the config dataclasses,
so ``--help`` shows each field's docstring); :mod:`~softprompt.cli.commands` runs each command;
:func:`main` parses, dispatches and turns the user's errors into one ``error:`` line.
"""

from __future__ import annotations

import logging
import sys

from safetensors import SafetensorError

from softprompt.cli.commands import (
    cmd_compare,
    cmd_eval,
    cmd_export_embeds,
    cmd_export_model,
    cmd_generate,
    cmd_info,
    cmd_init,
    cmd_inspect,
    cmd_predict,
    cmd_serve,
    cmd_train,
)
from softprompt.cli.parser import build_parser, unknown_options
from softprompt.errors import SoftpromptError, TrainingInterrupted

__all__ = ["build_parser", "main", "unknown_options"]

log = logging.getLogger("softprompt")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("transformers", "accelerate", "peft", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF de-quantisation bar is noise to our users


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    problems = unknown_options(parser, sys.argv[1:] if argv is None else argv)
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        raise SystemExit(2)
    try:
        args = parser.parse_args(argv)
    except SoftpromptError as e:  # a dataclass's own validation, raised while parsing
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _setup_logging()
    name = args.command
    options = {k: v for k, v in args[name].items() if k != "config"}
    try:
        if name == "train":
            from softprompt.training import TrainConfig

            cmd_train(TrainConfig(**options))
        elif name == "compare":
            from softprompt.compare import CompareConfig

            cmd_compare(CompareConfig(**options))
        elif name == "init":
            from softprompt.config import PromptConfig

            where = {k: options.pop(k) for k in ("output", "model", "dtype")}
            cmd_init(**where, prompt=PromptConfig(**options))
        else:  # each of the other commands takes its options as keyword arguments
            commands = {
                "eval": cmd_eval,
                "predict": cmd_predict,
                "generate": cmd_generate,
                "info": cmd_info,
                "serve": cmd_serve,
                "export-embeds": cmd_export_embeds,
                "export-model": cmd_export_model,
                "inspect": cmd_inspect,
            }
            commands[name](**options)
    except TrainingInterrupted as e:  # a checkpoint was saved at the last whole step
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop: saves are atomic
        print(
            "interrupted: stopped at once; files saved before are complete (saves are atomic)",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except SoftpromptError as e:
        # The user's to fix, and the message says how: a traceback would bury it. Anything else is a
        # bug in softprompt or below it, and goes up with its traceback.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, SafetensorError) as e:
        from softprompt.locking import disk_error

        refused = disk_error(e, "write")  # a full, read-only or forbidden disk: what, where, what to do
        if refused is not e:
            print(f"error: {refused}", file=sys.stderr)
            raise SystemExit(2) from None
        if getattr(e, "filename", None) is None:  # not about a path the user gave: a bug, with its traceback
            raise
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        raise SystemExit(2) from None
