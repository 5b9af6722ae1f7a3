"""Prompt tuning vs LoRA vs full fine-tuning on the same data, budget and evaluation: settings
(:mod:`~softprompt.compare.config`), the runs (:mod:`~softprompt.compare.run`) and the report
(:mod:`~softprompt.compare.report`)."""

from softprompt.compare.config import CompareConfig
from softprompt.compare.run import compare

__all__ = ["CompareConfig", "compare"]
