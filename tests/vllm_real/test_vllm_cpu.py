"""softprompt against a real vLLM (the CPU build, ``make vllm-env``) on SmolLM2 and Gemma 3: vLLM's
greedy tokens and their log-probabilities equal PromptedLM's, for plain token prompts and for ``prompt_embeds``
requests built by ``softprompt.vllm`` (a template, the chat template, several inputs in one batch).
vLLM runs in its own environment (its pins differ from the project's) through ``runner.py``, on the
folder ``softprompt export-model`` writes. Skipped without that environment: ``make test-vllm`` makes
it and runs this (install a few minutes, the engine's start about 2-3 minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from helpers.vllm import VLLM_PYTHON
from softprompt import PromptConfig, PromptedLM, SoftPrompt
from softprompt.decoding import generate
from softprompt.model_folder import save_model_folder
from softprompt.usage import PromptUsage
from softprompt.vllm import decode_embeds, prompt_embeds_request

STEPS = 8
ATOL = 1e-3  # float32 on both sides; vLLM's CPU kernels sum in another order

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON} (make vllm-env)"
    ),
]


def ours(model, ids: list[int], prompt) -> tuple[list[int], list[float]]:
    """PromptedLM's greedy tokens after ``ids`` under ``prompt`` and each one's log-probability."""
    prompted = PromptedLM(model)
    out = generate(prompted, torch.tensor([ids]), prompt=prompt, max_new_tokens=STEPS, eos_token_id=-1)
    tokens = out.tokens[0]
    with torch.no_grad():
        logits = prompted(torch.tensor([ids + tokens]), prompt=prompt, positions="all")[0].float()
    logp = logits.log_softmax(-1)
    return tokens, [float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(tokens)]


@pytest.mark.parametrize("base", ["smollm2", "gemma3"])
def test_vllm_cpu_generates_what_softprompt_generates(base, request, tmp_path):
    """On SmolLM2, and on Gemma 3 (its embedding module scales token vectors by sqrt(hidden): the
    request carries them scaled, as the decoder receives them; skipped without its optional package)."""
    model, tok = request.getfixturevalue(base)
    folder = save_model_folder(model, tmp_path / "model", tok)
    prompt = SoftPrompt.initialize(PromptConfig(num_virtual_tokens=8, init="text",
                                                init_text="Answer the question in a few words:"), model, tok)  # fmt: skip
    with torch.no_grad():  # away from any token's vectors: a prompt only embeddings can carry
        prompt.weight.add_(
            0.02 * torch.randn(prompt.weight.shape, generator=torch.Generator().manual_seed(0))
        )
    template = "Question: {text}\nAnswer:"
    texts = ["What is the capital of France?", "Who wrote Hamlet?", "What colour is the sky?"]
    messages = [{"role": "user", "content": "What is the capital of Italy?"}]
    cases: list[tuple[str, list[int], object, dict]] = []  # (name, token ids we run, prompt, job item)
    plain = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    cases.append(("plain tokens", plain, None, {"token_ids": plain}))
    usage = PromptUsage.from_meta(None, tok, template=template)
    request = prompt_embeds_request(prompt, texts, tok, model, template)  # several inputs, one request
    for i, (text, embeds) in enumerate(zip(texts, request["prompt_embeds"], strict=True)):
        path = tmp_path / f"embeds{i}.pt"
        torch.save(decode_embeds(embeds), path)
        cases.append((f"template: {text}", usage.encode(text).ids, prompt, {"embeds": str(path)}))
    if tok.chat_template:  # a base model may have none
        chat = prompt_embeds_request(prompt, None, tok, model, messages=messages)
        torch.save(decode_embeds(chat["prompt_embeds"]), tmp_path / "chat.pt")
        chat_ids = PromptUsage.from_meta(None, tok).encode_chat(messages).ids
        cases.append(("chat template", chat_ids, prompt, {"embeds": str(tmp_path / "chat.pt")}))

    job = {"model": str(folder), "max_tokens": STEPS, "logprobs": 1, "items": [c[3] for c in cases]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""}
    done = subprocess.run([str(VLLM_PYTHON), str(Path(__file__).with_name("runner.py")), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=1500, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    for (name, ids, p, _), result in zip(cases, got["results"], strict=True):
        tokens, logprobs = ours(model, ids, p)
        assert result["token_ids"] == tokens, (name, tok.decode(result["token_ids"]), tok.decode(tokens))
        diff = max(abs(a - b) for a, b in zip(result["logprobs"], logprobs, strict=True))
        assert diff < ATOL, (name, diff)
        print(f"{name}: {len(tokens)} tokens equal, log-probabilities within {diff:.1e}")
    print(f"{base}: vLLM {got['vllm']} (CPU build), engine ready in {got['start_seconds']:.0f} s")
