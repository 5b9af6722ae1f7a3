"""``python -m softprompt.cli`` (torchrun and accelerate launch run the command line this way)."""

from softprompt.cli import main

main()
