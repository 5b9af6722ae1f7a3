"""What the model feeds its first transformer block: the reference a vLLM ``prompt_embeds`` request
must equal (tiny models in ``core/test_vllm.py``, the real Gemma in ``integration/test_gemma.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from helpers import REPO
from softprompt.model import PromptedLM

VLLM_PYTHON = Path(os.environ.get("SOFTPROMPT_VLLM_PYTHON", REPO / ".vllm-venv" / "bin" / "python"))
"""The vLLM environment's interpreter (``make vllm-env``), for ``tests/vllm_real``."""


def first_layer_input(prompted: PromptedLM, ids: list[int], prompt) -> torch.Tensor:
    """What ``prompted`` hands its first transformer block for one unpadded row: (L, D)."""
    from softprompt.hf_parts import decoder_layers

    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = decoder_layers(prompted.model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            prompted(torch.tensor([ids]), prompt=prompt)
    finally:
        handle.remove()
    return seen[0][0]
