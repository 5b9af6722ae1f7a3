"""The gateway's start-up checks (:func:`connect`): is the server at ``--vllm_url`` a vLLM the gateway
may talk to, and does it serve the prompts' base model?

- on a loopback address (a vLLM started with ``--enable-prompt-embeds`` accepts arbitrary tensors
  from anyone who reaches it);
- vLLM :data:`MIN_VLLM` or newer (CVE-2025-62164: a crafted ``prompt_embeds`` tensor could corrupt
  the server's memory, affecting 0.10.2 to 0.11.0, fixed in 0.11.1);
- one served model, or the one named;
- ``prompt_embeds`` accepted, and a probe input giving the local model's next-token log-probability
  within :data:`PROBE_TOLERANCE` (vLLM serving another model, or a converted folder whose tied
  embedding it did not read, is refused instead of answering garbage).

Also the errors the gateway raises when vLLM fails (:class:`BackendError`,
:class:`BackendUnavailableError`) and the two readers of vLLM's answers both modules use.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch

from softprompt.errors import UsageError
from softprompt.serving.guard import is_loopback
from softprompt.serving.registry import PromptStore
from softprompt.vllm import encode_embeds, prompt_embeds

log = logging.getLogger(__name__)

MIN_VLLM = (0, 11, 1)
"""Oldest vLLM the gateway talks to: the release that fixed CVE-2025-62164 (memory corruption through
a crafted ``prompt_embeds`` tensor). Tested with 0.32.0 (CPU build)."""
PROBE_TEXT = "The capital of France is"
PROBE_TOLERANCE = {torch.float32: 0.02, torch.bfloat16: 0.25, torch.float16: 0.1}
"""Largest difference in the probe's top log-probability between vLLM and the local model."""


class BackendError(Exception):
    """vLLM refused or failed a request the gateway built (502: the gateway's upstream failed)."""


class BackendUnavailableError(Exception):
    """vLLM did not answer (503: retry once it is back)."""


@dataclass(frozen=True)
class VLLMInfo:
    """What :func:`connect` learned of the vLLM server."""

    url: str
    model: str
    version: str
    max_model_len: int | None

    def describe(self) -> str:
        return f"vLLM {self.version} at {self.url} (model {self.model!r}, max_model_len {self.max_model_len})"


def parse_version(version: str) -> tuple[int, ...]:
    """``"0.32.0"``, ``"0.13.0rc1+cpu"`` -> ``(0, 32, 0)``, ``(0, 13, 0)``."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        raise UsageError(f"cannot read vLLM's version {version!r}") from None
    return tuple(release) + (0,) * (3 - len(release))


def check_url(url: str) -> str:
    """``url`` without a trailing slash, refused unless it is http(s) on a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--vllm_url {url!r} is not an http URL; give e.g. http://127.0.0.1:8001")
    if not is_loopback(parts.hostname):
        raise UsageError(
            f"--vllm_url {url!r} is not on a loopback address. A vLLM started with --enable-prompt-embeds "
            "accepts arbitrary tensors from anyone who reaches it: run it on this machine with --host "
            "127.0.0.1 and point the gateway at http://127.0.0.1:PORT"
        )
    return url.rstrip("/")


def _request(client, method: str, path: str, **kwargs):
    """One start-up request; a vLLM that stops answering here refuses the start with a message."""
    import httpx

    try:
        return client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise UsageError(f"vLLM at {client.base_url} stopped answering ({method} {path}: {e})") from None


def wait_ready(client, wait_s: float, poll_s: float = 1.0) -> None:
    """Wait up to ``wait_s`` seconds for vLLM's ``GET /health`` to answer 200 (a vLLM started beside
    the gateway takes minutes to listen); a clear error after that."""
    import httpx

    start = last_said = time.monotonic()
    while True:
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now - start >= wait_s:
            raise UsageError(
                f"no vLLM answered at {client.base_url} within {wait_s:.0f} s. Start it first (python -m "
                "vllm.entrypoints.openai.api_server --model DIR --enable-prompt-embeds --host 127.0.0.1 --port "
                "PORT, DIR from `softprompt export-model`), or wait longer with --vllm_wait_s"
            )
        if now - last_said >= 15:
            log.info("waiting for vLLM at %s (%.0f s so far)", client.base_url, now - start)
            last_said = now
        time.sleep(poll_s)


def connect(url: str, store: PromptStore, *, served_model: str | None = None, dtype: torch.dtype = torch.float32,
            transport=None, timeout_s: float = 60.0, wait_s: float = 0.0, poll_s: float = 1.0) -> VLLMInfo:  # fmt: skip
    """Check the vLLM at ``url`` before serving through it: loopback, version, the model it serves
    (``served_model``, or its only one), that it takes ``prompt_embeds``, and that it gives the local
    model's next-token log-probabilities on a probe input (:data:`PROBE_TOLERANCE`). Waits up to
    ``wait_s`` seconds for it to start listening (:func:`wait_ready`)."""
    import httpx

    url = check_url(url)
    with httpx.Client(base_url=url, transport=transport, timeout=timeout_s) as client:
        wait_ready(client, wait_s, poll_s)
        answer = _request(client, "GET", "/version")
        version = answer.json().get("version", "") if answer.status_code == 200 else ""
        if not version:
            raise UsageError(f"{url} does not answer GET /version as vLLM does (HTTP {answer.status_code}); "
                             "is --vllm_url the address of a vLLM OpenAI server?")  # fmt: skip
        if parse_version(version) < MIN_VLLM:
            raise UsageError(
                f"vLLM {version} is older than {'.'.join(map(str, MIN_VLLM))}: its prompt_embeds input has a "
                "known memory-safety flaw (CVE-2025-62164); upgrade vLLM"
            )
        models = _request(client, "GET", "/v1/models").json().get("data", [])
        names = [m.get("id") for m in models]
        if served_model is None:
            if len(names) != 1:
                raise UsageError(f"vLLM serves {len(names)} models ({', '.join(map(str, names))}); name the base "
                                 "model with --vllm_model")  # fmt: skip
            served_model = names[0]
        elif served_model not in names:
            raise UsageError(
                f"vLLM does not serve {served_model!r} (it serves: {', '.join(map(str, names))})"
            )
        card = models[names.index(served_model)]
        info = VLLMInfo(url, served_model, version, card.get("max_model_len"))
        _probe(client, info, store, dtype)
    return info


def _probe(client, info: VLLMInfo, store: PromptStore, dtype: torch.dtype) -> None:
    tokenizer, prompted = store.tokenizer, store.prompted
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    empty = torch.zeros(0, prompted.embed_tokens.weight.shape[1])
    body = {"model": info.model, "prompt_embeds": encode_embeds(prompt_embeds(empty, ids, prompted, dtype)),
            "max_tokens": 1, "temperature": 0.0, "logprobs": 1, "return_tokens_as_token_ids": True}  # fmt: skip
    answer = _request(client, "POST", "/v1/completions", json=body)
    if answer.status_code != 200:
        message = error_message(answer.text)
        hint = " Start vLLM with --enable-prompt-embeds." if "embed" in message.lower() else ""
        raise UsageError(
            f"vLLM refused a prompt_embeds request (HTTP {answer.status_code}: {message}).{hint}"
        )
    (choice,) = answer.json()["choices"]
    theirs = {token_id(k): v for k, v in choice["logprobs"]["top_logprobs"][0].items()}
    with torch.no_grad():
        logits = prompted.model(
            input_ids=torch.tensor([ids], device=prompted.embed_tokens.weight.device)
        ).logits
    ours = logits[0, -1].float().log_softmax(-1)
    best = int(ours.argmax())
    tolerance = PROBE_TOLERANCE.get(dtype, 0.25)
    if best not in theirs or abs(theirs[best] - float(ours[best])) > tolerance:
        raise UsageError(
            f"vLLM's model {info.model!r} does not match the prompts' base model: after {PROBE_TEXT!r} the "
            f"local model gives token {best} log-probability {float(ours[best]):.4f}, vLLM gives "
            f"{theirs.get(best)} (tolerance {tolerance}). Serve the folder `softprompt export-model` writes "
            "for these prompts' model"
        )
    log.info(
        "vLLM agrees with the local model on the probe (token %d: %.4f vs %.4f)",
        best,
        theirs[best],
        ours[best],
    )


def error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


def token_id(key: str) -> int:
    """vLLM's ``token_id:123`` (with ``return_tokens_as_token_ids``) -> 123."""
    if not key.startswith("token_id:"):
        raise BackendError(
            f"vLLM named a token {key!r} instead of by id; it ignored return_tokens_as_token_ids"
        )
    return int(key[len("token_id:") :])
