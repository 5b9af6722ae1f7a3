"""softprompt: prompt tuning for Hugging Face causal language models."""

from softprompt.config import ConfigError, InitMethod, PromptConfig, PromptMeta
from softprompt.loading import load_model
from softprompt.model import PromptedLM
from softprompt.prompt import SoftPrompt
from softprompt.store import ModelMismatchError, PromptFormatError, load_prompt, save_prompt

__all__ = [
    "ConfigError",
    "InitMethod",
    "ModelMismatchError",
    "PromptConfig",
    "PromptFormatError",
    "PromptMeta",
    "PromptedLM",
    "SoftPrompt",
    "load_model",
    "load_prompt",
    "save_prompt",
]
__version__ = "0.1.0"
