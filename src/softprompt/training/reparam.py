"""Residual reparameterisation of a soft prompt while it trains (Residual Prompt Tuning,
Razdaibiedina et al. 2023, ``reparam=residual``).

The loss sees ``prompt + LayerNorm(MLP(prompt))`` instead of the prompt itself; the MLP is shared
across the P tokens, and both it and the P x D base vectors train. The MLP only shapes how the
prompt moves: what is saved is its output, collapsed to a plain P x D prompt (:meth:`collapsed`),
so the PEFT format, serving and the vLLM export are those of any prompt.

A deep prompt trains the same way (prefix tuning's reparameterisation, Li & Liang 2021, in the
residual form): each virtual token's row holds its keys and values of every layer, so one MLP over
the row couples the layers' updates; what is saved is again the output, a plain deep prompt.
"""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from softprompt.deep import DeepPrompt
from softprompt.errors import ConfigError
from softprompt.prompt import SoftPrompt

STATE_FILE = "reparam.safetensors"  # in a checkpoint folder: base weight and MLP, as trained


class ResidualPrompt(nn.Module):
    """``output = prompt.weight + LayerNorm(Linear(D->h) -> ReLU -> Linear(h->D))(prompt.weight)``, (P, D)
    (a deep prompt's D being its keys and values of every layer).

    The LayerNorm's affine weight and bias start at zero, so at step 0 the output *is* the initial
    prompt, bit for bit: the init (label words, text, a transferred prompt) keeps its meaning, and
    the untrained-prompt baseline is the same as without the reparameterisation. (With a zero gain
    only the LayerNorm gets a gradient at step 0; the MLP's layers get theirs from step 1 on.)

    The Linear layers are drawn from ``seed`` on their own generator (PyTorch's default Linear init,
    uniform in +-1/sqrt(fan_in)), so two runs with the same settings are bit-identical whatever else
    drew random numbers before.

    Args:
        prompt: the run's prompt (input or deep); its ``weight`` is the trainable base (shared, not copied).
        hidden: width h of the MLP's hidden layer.
        seed: the run's seed.
    """

    def __init__(self, prompt: SoftPrompt | DeepPrompt, hidden: int, seed: int = 0):
        super().__init__()
        self.prompt = prompt
        dim = prompt.token_dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (self.mlp[0], self.mlp[2]):
                bound = 1 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
            self.norm.weight.zero_()
            self.norm.bias.zero_()
        self.to(prompt.weight.device)  # moves the MLP; the prompt is already there

    def output(self) -> torch.Tensor:
        """(P, D): the prompt's weight as the model receives it (with the graph back to the MLP)."""
        weight = self.prompt.weight  # (P, D) fp32
        return weight + self.norm(self.mlp(weight))

    def forward(self) -> torch.Tensor | DeepPrompt:
        """What a loss takes: the (P, D) output, or for a deep prompt a deep prompt holding it."""
        if isinstance(self.prompt, DeepPrompt):
            return self.prompt.holding(self.output())
        return self.output()

    def trainable(self) -> list[nn.Parameter]:
        """Everything the optimizer updates: the base vectors first (optimizer index 0, as a plain
        prompt's), then the MLP's and the LayerNorm's parameters."""
        return [self.prompt.weight, *self.mlp.parameters(), *self.norm.parameters()]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable())

    @torch.no_grad()
    def collapsed(self) -> SoftPrompt | DeepPrompt:
        """The prompt as the model sees it now: a plain P x D prompt (or deep prompt) with the run's
        metadata and the prompt's learned class vectors (the same objects, not copies)."""
        if isinstance(self.prompt, DeepPrompt):
            out = DeepPrompt(self.output(), self.prompt.shape, self.prompt.meta)
        else:
            out = SoftPrompt(self.output(), self.prompt.meta)
        out.classes = self.prompt.classes
        return out

    def save(self, path) -> None:
        """Base weight and MLP, bit for bit (a checkpoint's ``reparam.safetensors``)."""
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path) -> None:
        """Restore what :meth:`save` wrote; refuses a file of another shape (other ``reparam_hidden``)."""
        saved = load_file(str(path))
        own = self.state_dict()
        wrong = [f"{k}: {tuple(saved[k].shape)} saved, {tuple(v.shape)} now" for k, v in own.items()
                 if k in saved and saved[k].shape != v.shape]  # fmt: skip
        missing = sorted(own.keys() - saved.keys())
        if wrong or missing:
            raise ConfigError(
                [
                    f"{path} does not fit this run's residual reparameterisation ("
                    + "; ".join(wrong + [f"{k} missing" for k in missing])
                    + "); resume with the run's original reparam_hidden and num_virtual_tokens"
                ]  # fmt: skip
            )
        self.load_state_dict({k: saved[k] for k in own})
