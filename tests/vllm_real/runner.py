"""Runs inside the vLLM environment (``make vllm-env``; never the project's own): greedy generation
with vLLM's offline engine for a job file, written as JSON. Imports nothing of softprompt.

    .vllm-venv/bin/python tests/vllm_real/runner.py JOB.json OUT.json

JOB: ``{"model": DIR, "max_tokens": N, "logprobs": K, "items": [{"token_ids": [...]} or
{"embeds": "file.pt"}]}``. OUT: per item, the generated token ids and each step's log-probability of
the chosen token (vLLM's own, float32).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=job["model"], enable_prompt_embeds=True, dtype="float32", max_model_len=512,
              seed=0)  # fmt: skip
    ready = time.perf_counter() - start
    prompts = [
        {"prompt_token_ids": item["token_ids"]} if "token_ids" in item
        else {"prompt_embeds": torch.load(item["embeds"], weights_only=True)}
        for item in job["items"]
    ]  # fmt: skip
    params = SamplingParams(
        temperature=0, max_tokens=job["max_tokens"], logprobs=job["logprobs"], ignore_eos=True
    )
    outputs = llm.generate(prompts, params)
    results = []
    for out in outputs:
        gen = out.outputs[0]
        chosen = [step[t].logprob for t, step in zip(gen.token_ids, gen.logprobs, strict=True)]
        results.append({"token_ids": list(gen.token_ids), "logprobs": chosen})
    import vllm

    Path(sys.argv[2]).write_text(
        json.dumps({"vllm": vllm.__version__, "start_seconds": ready, "results": results})
    )


if __name__ == "__main__":
    main()
