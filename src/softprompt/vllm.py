"""Serving a trained prompt on vLLM: completions requests whose ``prompt_embeds`` carry the prompt.

vLLM started with ``--enable-prompt-embeds`` takes, on ``POST /v1/completions``, a field
``prompt_embeds``: base64 of a ``torch.save``'d float tensor ``(seq_len, hidden)`` that replaces the
token embeddings of the input. :func:`prompt_embeds_request` builds that tensor the way
:class:`~softprompt.model.PromptedLM` builds its input: the prompt's P vectors first (positions
0..P-1), then the token embeddings of the text in the prompt's template, tokenized without special
tokens (no BOS, as everywhere in softprompt), so vLLM's first token is the one ``PromptedLM`` predicts
(tested on the first-token logits). With ``messages`` the conversation is put in the base model's
chat template instead, still after the prompt.

What the tensor holds, per architecture: exactly what ``PromptedLM`` hands the decoder as
``inputs_embeds`` (in the model's dtype, then cast to ``dtype``): the prompt, then
``model.get_input_embeddings()(ids)``. vLLM's model ports take ``prompt_embeds`` where Hugging
Face takes ``inputs_embeds``; the one exception known here is Gemma 1/2 in older vLLM (below).

- Llama, Mistral, Qwen2/Qwen3, Phi-3, Falcon (rotary), GPT-NeoX, and Gemma 3: the decoder's first
  layer receives this tensor as it is (tested with a hook on that layer, Llama and Gemma 3).
  Gemma's vectors include its embedding scale (token rows x sqrt(hidden_size), ~25x at hidden
  640), and so do its prompts, which live in that space: vLLM's Gemma 3 takes ``prompt_embeds``
  already scaled, as Hugging Face's ``inputs_embeds``.
- Gemma 1 and Gemma 2: the same scaled tensor. vLLM releases before PR #36787 (merged March 2026)
  multiplied ``prompt_embeds`` of these two by sqrt(hidden_size) a second time, which gives
  garbage; serve them with a vLLM that has that change.
- GPT-2 and OPT (learned absolute positions): the tensor carries no positions; the model adds its
  position embeddings to it (OPT after its input projection, where it has one), as it does to
  ``inputs_embeds``, so the first layer receives tensor + positions (tested for GPT-2).
- BLOOM: the model applies its embedding layer norm to the tensor before the first layer.

The flag lets a client hand the server arbitrary tensors: keep such a vLLM server behind your own
service and never expose it to untrusted clients (README, "Serving at scale with vLLM").
"""

from __future__ import annotations

import base64
import io

import torch

from softprompt.deep import DeepPrompt
from softprompt.errors import UsageError
from softprompt.model import PromptedLM
from softprompt.prompt import SoftPrompt
from softprompt.text import Template
from softprompt.usage import PromptUsage


def input_ids(tokenizer, text: str | None = None, template: str | Template | None = None,
              messages: list[dict] | None = None) -> list[int]:  # fmt: skip
    """The token ids that follow the prompt: ``text`` in ``template`` (default ``{text}``), or
    ``messages`` in the tokenizer's chat template with the assistant's turn opened; no BOS is added."""
    if (text is None) == (messages is None):
        raise UsageError("give either a text or chat messages to build the input from")
    if messages is not None:
        return _nonempty(PromptUsage.from_meta(None, tokenizer).encode_chat(messages).ids)
    return _nonempty(PromptUsage.from_meta(None, tokenizer, template=template).encode(text).ids)


def _nonempty(ids: list[int]) -> list[int]:
    if not ids:
        raise UsageError("the input tokenises to nothing; give some text")
    return ids


def prompt_embeds(prompt: SoftPrompt | torch.Tensor, ids: list[int], model,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """``[prompt vectors; embeddings of ids]``: a ``(P + len(ids), hidden)`` tensor on the CPU.

    ``model`` is the base model (any Hugging Face causal LM, or a :class:`PromptedLM`); only its
    input embeddings are read.
    """
    if isinstance(prompt, DeepPrompt):
        raise UsageError(
            "a deep prompt cannot be exported as input embeddings: it holds keys and values for every layer, "
            "and vLLM takes input embeddings only (prompt_embeds), not key/value prefixes. Serve it with "
            "`softprompt serve` (one loaded model, any mix of deep and input prompts), or train an input "
            "prompt (--prompt_kind input) for vLLM"
        )
    weight = prompt.weight if isinstance(prompt, SoftPrompt) else prompt
    embedding = model.embed_tokens if isinstance(model, PromptedLM) else model.get_input_embeddings()
    if weight.dim() != 2 or weight.shape[1] != embedding.weight.shape[1]:
        raise UsageError(
            f"the prompt is {tuple(weight.shape)} but the model's hidden size is {embedding.weight.shape[1]}; "
            "give a (P, hidden) prompt trained on this model"
        )
    with torch.no_grad():
        tokens = embedding(torch.tensor(ids, device=embedding.weight.device))  # (T, D)
        # the model's own dtype for the tokens, the prompt cast to it as PromptedLM casts at use
        rows = torch.cat([weight.detach().to(tokens.device, tokens.dtype), tokens])  # (P + T, D)
    return rows.to("cpu", dtype).contiguous()


def encode_embeds(tensor: torch.Tensor) -> str:
    """Base64 of ``torch.save(tensor)``: the form vLLM reads in ``prompt_embeds``."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_embeds(data: str) -> torch.Tensor:
    """The tensor of an :func:`encode_embeds` string (read with ``weights_only=True``, as vLLM does)."""
    tensor = torch.load(io.BytesIO(base64.b64decode(data)), map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        raise UsageError("prompt_embeds must hold one 2-D float tensor (seq_len, hidden)")
    return tensor


def prompt_embeds_request(
    prompt: SoftPrompt | torch.Tensor,
    text: str | list[str] | None,
    tokenizer,
    model,
    template: str | Template | None = None,
    *,
    messages: list[dict] | None = None,
    served_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = 16,
    temperature: float = 0.0,
    **params,
) -> dict:
    """The JSON body of a vLLM ``POST /v1/completions`` request for ``text`` under ``prompt``.

    Args:
        prompt: a trained prompt (its template is the default ``template``) or a (P, D) tensor.
        text: the input, or a list of inputs (one ``prompt_embeds`` entry each, one choice each).
        tokenizer, model: the base model the prompt was trained on (only its embeddings are read).
        template: the input template; default: the prompt's own (``{text}`` without one). A prompt
            trained with ``--chat_template true`` gets its input in the chat template, as in training.
        messages: instead of ``text``, a conversation put in the tokenizer's chat template (for a
            prompt trained in it, its last user message in the prompt's template, as the server does).
        served_model: the ``model`` field: the name vLLM serves the base model under (default: the
            prompt's ``base_model``, else the model's ``name_or_path``).
        dtype: of the sent tensor; ``torch.bfloat16`` halves the request for a bf16 server.
        max_tokens, temperature, params: further fields of the request (``stop``, ``logprobs``, ...).

    Send it with any HTTP client, or with the openai client through :func:`openai_arguments`.
    """
    meta = getattr(prompt, "meta", None)
    # the prompt's own template, in the chat template when it was trained in it (as served)
    usage = PromptUsage.from_meta(meta, tokenizer, template=template, read_labels=False)
    if (text is None) == (messages is None):
        raise UsageError("give either text or chat messages to build the input from, not both")
    texts = [text] if isinstance(text, str) or text is None else list(text)
    if not texts:
        raise UsageError("text is an empty list; give at least one input")
    rows = [usage.encode_chat(messages).ids] if messages is not None else [usage.encode(t).ids for t in texts]
    encoded = [encode_embeds(prompt_embeds(prompt, _nonempty(ids), model, dtype)) for ids in rows]
    if served_model is None:
        config = model.config if not isinstance(model, PromptedLM) else model.model.config
        served_model = (
            getattr(meta, "base_model", None) or getattr(config, "name_or_path", None) or "base-model"
        )
    return {
        "model": served_model,
        "prompt_embeds": encoded[0] if len(encoded) == 1 and isinstance(text, str | None) else encoded,
        "max_tokens": max_tokens,
        "temperature": temperature,
        **params,
    }


def openai_arguments(request: dict) -> dict:
    """Keyword arguments for ``openai.OpenAI(...).completions.create`` that send ``request``: the
    client requires a ``prompt`` (an empty one, which vLLM ignores next to ``prompt_embeds``) and
    passes ``prompt_embeds`` in ``extra_body``."""
    rest = {k: v for k, v in request.items() if k != "prompt_embeds"}
    return {**rest, "prompt": "", "extra_body": {"prompt_embeds": request["prompt_embeds"]}}
