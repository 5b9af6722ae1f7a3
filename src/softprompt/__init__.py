"""softprompt: prompt tuning for Hugging Face causal language models.

The top-level modules are the core (prompt, model, files, text, scoring, decoding, data, metrics);
``softprompt.training``, ``softprompt.serving`` and ``softprompt.compare`` are built on it, and the
core never imports them.
"""

from softprompt.classifier import Classifier
from softprompt.config import InitMethod, PromptConfig
from softprompt.decoding import Generator, generate
from softprompt.deep import DeepPrompt
from softprompt.errors import (
    ConfigError,
    DataError,
    ModelMismatchError,
    PromptFormatError,
    SoftpromptError,
    UsageError,
)
from softprompt.initialize import initialize_prompt
from softprompt.loading import load_model
from softprompt.meta import PromptMeta
from softprompt.model import PromptedLM
from softprompt.prompt import SoftPrompt, load_prompt, save_prompt
from softprompt.usage import PromptUsage

__all__ = [
    "Classifier",
    "ConfigError",
    "DataError",
    "DeepPrompt",
    "Generator",
    "InitMethod",
    "ModelMismatchError",
    "PromptConfig",
    "PromptFormatError",
    "PromptMeta",
    "PromptUsage",
    "PromptedLM",
    "SoftPrompt",
    "SoftpromptError",
    "UsageError",
    "generate",
    "initialize_prompt",
    "load_model",
    "load_prompt",
    "save_prompt",
]
__version__ = "0.1.0"
