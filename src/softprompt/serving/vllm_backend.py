"""The gateway's engine: ``softprompt serve --vllm_url URL`` answers every request for a named prompt
through a vLLM server on this machine, instead of running the model itself.

It stands where the :class:`~softprompt.serving.batcher.Batcher` stands (``run`` and ``submit``, called
by the same routes after the same checks), so the routes, the prompt store, prompt management and the
request guard are today's. For each request it builds vLLM ``POST /v1/completions`` bodies whose
``prompt_embeds`` are the prompt's vectors followed by the token embeddings of the ids the route
encoded (the prompt's template, or the chat template, exactly as training and ``softprompt serve``
encode them; see :mod:`softprompt.vllm`), and turns vLLM's answer into the same
:class:`~softprompt.serving.mixed.Completion` the batcher returns. Streams are passed through chunk by
chunk.

- **Generation**: every sampling field the server honours is sent explicitly (temperature, top_p,
  stop, penalties, logit_bias, and ``repetition_penalty=1``, ``top_k=0``, ``min_p=0``), so vLLM's
  defaults from the model's ``generation_config.json`` never change an answer behind the client.
- **Classification**: exact where vLLM can score it: first-token labels, through
  ``logprob_token_ids`` (the full-vocabulary log-probability of each label's token at the first
  step, then the log-softmax over the labels, which is what first-token scoring computes). Labels
  scored by their whole words or by a learned verbalizer are refused with a message, as are deep
  prompts everywhere (vLLM takes input embeddings, not key/value prefixes).
- **Safety**: clients never send tensors (the routes take text and messages only); the tensors sent
  are built here from the store's prompts. The start-up checks
  (:func:`~softprompt.serving.vllm_connect.connect`) refuse a vLLM off loopback, one older than the
  fix of CVE-2025-62164 (a memory-safety flaw of ``prompt_embeds``), and one whose model gives other
  next-token log-probabilities than the local model on a probe input.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import torch

from softprompt.decoding import TokenLogprob
from softprompt.deep import DeepPrompt
from softprompt.errors import UsageError
from softprompt.loading import resolve_dtype
from softprompt.serving.batcher import Job, QueueFullError, ShuttingDownError, StreamText
from softprompt.serving.mixed import Completion
from softprompt.serving.registry import PromptEntry, PromptStore
from softprompt.serving.settings import ServeLimits
from softprompt.serving.vllm_connect import (
    BackendError,
    BackendUnavailableError,
    VLLMInfo,
    connect,
    error_message,
    token_id,
)
from softprompt.vllm import encode_embeds, prompt_embeds

log = logging.getLogger(__name__)

MAX_LABEL_TOKENS = 128
"""Most label tokens one vLLM request scores (vLLM's ``MAX_LOGPROB_TOKEN_IDS``)."""


class VLLMBackend:
    """Answers the routes' ``run`` and ``submit`` through vLLM (see the module's docstring).

    Args:
        store: the prompts (their base model's embeddings build the tensors sent).
        limits: ``max_queue`` bounds the requests in flight to vLLM (503 beyond).
        info: the vLLM server (from :func:`connect`).
        dtype: of the tensors sent (the dtype vLLM serves in halves the bytes for bfloat16).
        transport: an ``httpx`` transport (tests); default: the network.
        timeout_s: longest wait for vLLM's answer or next streamed chunk.
    """

    def __init__(self, store: PromptStore, limits: ServeLimits, info: VLLMInfo, *,
                 dtype: torch.dtype = torch.float32, transport=None, timeout_s: float = 600.0):  # fmt: skip
        self.store, self.limits, self.info = store, limits, info
        self.dtype, self.transport, self.timeout_s = dtype, transport, timeout_s
        self.max_model_len = info.max_model_len
        self.eos = store.tokenizer.eos_token_id  # where softprompt's decoding stops
        self.stats = {"batches": 0, "rows": 0, "requests": 0}
        self._client = None
        self._in_flight = 0
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ the Batcher's interface
    def start(self) -> None:
        self._stopping = False

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True

    def queued(self) -> int:
        """Requests in flight to vLLM."""
        return self._in_flight

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def submit(self, key: tuple, entries: list[PromptEntry], texts: list, *, stream: bool = False,
               ids: list[list[int]] | None = None, **params) -> Job:  # fmt: skip
        """Start a streamed request: read ``job.stream`` as the batcher's (StreamText items, then the
        list of completions or the exception); without ``stream``, await :meth:`run`. Rows are token
        ids: ``ids``, or ``texts`` that are lists of ids (the chat route's)."""
        if not stream:
            raise UsageError("VLLMBackend.submit streams; await run() for a whole answer")
        ids = self._rows(texts, ids)
        self._admit(key, entries, ids)
        loop = asyncio.get_running_loop()
        job = Job(key, entries, texts, loop, loop.create_future(), params, asyncio.Queue(), ids)
        task = loop.create_task(self._stream(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def run(self, key: tuple, entries: list[PromptEntry], texts: list, *, ids=None, **params):
        """Send the request and return its results: completions, or class log-scores per row. A
        client that goes away cancels this, which closes the connection to vLLM (vLLM then aborts)."""
        ids = self._rows(texts, ids)
        self._admit(key, entries, ids)
        loop = asyncio.get_running_loop()
        job = Job(key, entries, texts, loop, loop.create_future(), params, None, ids)
        self._in_flight += 1
        try:
            return await self._compute(job)
        finally:
            self._in_flight -= 1

    @staticmethod
    def _rows(texts: list, ids):
        return texts if ids is None and all(isinstance(t, list) for t in texts) else ids

    # ------------------------------------------------------------------ checks
    def _admit(self, key: tuple, entries: list[PromptEntry], ids) -> None:
        if self._stopping:
            raise ShuttingDownError("the server is shutting down")
        if ids is None:
            raise UsageError("the vLLM backend takes token ids encoded by the routes")
        for e in entries:
            if isinstance(e.prompt, DeepPrompt):
                raise UsageError(
                    f"prompt {e.name} is a deep prompt (keys and values at every layer); vLLM takes input "
                    "embeddings only, so this gateway cannot serve it. Serve it with `softprompt serve` "
                    "without --vllm_url, or train an input prompt (--prompt_kind input)"
                )
            if key[0] == "classify" and e.usage.labels.mode != "first_token":
                raise UsageError(
                    f"prompt {e.name} scores its labels by {e.usage.labels.mode} scoring, which vLLM cannot "
                    "compute exactly (it gives log-probabilities of single next tokens); the gateway "
                    "classifies first-token labels only. Classify with `softprompt serve` without --vllm_url"
                )
            if key[0] == "classify" and len({w[0] for w in e.usage.labels.label_ids}) > MAX_LABEL_TOKENS:
                raise UsageError(f"prompt {e.name} has more than {MAX_LABEL_TOKENS} label tokens, more "
                                 "than vLLM scores in one request")  # fmt: skip
        if key[0] == "classify" and self.max_model_len:  # generation: the routes check with max_tokens
            longest = max(len(row) + e.num_virtual_tokens + 1 for e, row in zip(entries, ids, strict=True))
            if longest > self.max_model_len:
                raise UsageError(f"an input + its prompt + 1 token is {longest} positions, over vLLM's "
                                 f"max_model_len of {self.max_model_len}; shorten the input")  # fmt: skip
        if self._in_flight >= self.limits.max_queue:
            raise QueueFullError(
                f"the server is busy ({self.limits.max_queue} requests in flight to vLLM); retry shortly"
            )

    # ------------------------------------------------------------------ building requests
    def _embeds(self, entry: PromptEntry, ids: list[int]) -> str:
        return encode_embeds(prompt_embeds(entry.prompt, ids, self.store.prompted, self.dtype))

    def _rows_embeds(self, entries: list[PromptEntry], rows: list[list[int]]) -> list[str]:
        """Each row's encoded tensor; a row repeated (``n`` choices of one input) is built once."""
        built: dict[tuple, str] = {}
        for e, ids in zip(entries, rows, strict=True):
            key = (e.name, e.version, tuple(ids))
            if key not in built:
                built[key] = self._embeds(e, ids)
        return [built[(e.name, e.version, tuple(ids))] for e, ids in zip(entries, rows, strict=True)]

    def _generation_body(self, job: Job, stream: bool) -> dict:
        p = job.params
        body = {
            "model": self.info.model,
            "prompt_embeds": self._rows_embeds(job.entries, job.ids),
            "max_tokens": p["max_tokens"],
            "temperature": p["temperature"],
            "top_p": p["top_p"],
            "stop": list(p.get("stop") or []),
            "presence_penalty": p.get("presence_penalty", 0.0),
            "frequency_penalty": p.get("frequency_penalty", 0.0),
            # vLLM would take these from the model's generation_config.json: state what the server does
            "repetition_penalty": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "n": 1,
            # stop where softprompt stops: the tokenizer's EOS, not also generation_config's others
            "ignore_eos": self.eos is not None,
            "stop_token_ids": [] if self.eos is None else [self.eos],
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
            "stream": stream,
        }
        if p.get("logit_bias"):
            body["logit_bias"] = {str(k): v for k, v in p["logit_bias"].items()}
        if p.get("logprobs") is not None:
            body["logprobs"] = p["logprobs"]
        return body

    def _classify_body(
        self, entries: list[PromptEntry], rows: list[list[int]], label_tokens: list[int]
    ) -> dict:
        return {
            "model": self.info.model,
            "prompt_embeds": self._rows_embeds(entries, rows),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 0,
            "logprob_token_ids": label_tokens,
            "return_tokens_as_token_ids": True,
        }

    # ------------------------------------------------------------------ talking to vLLM
    def _http(self):
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.info.url,
                transport=self.transport,
                timeout=httpx.Timeout(self.timeout_s, connect=5.0),
                limits=httpx.Limits(max_connections=self.limits.max_queue, max_keepalive_connections=64),
            )
        return self._client

    async def _post(self, body: dict) -> dict:
        import httpx

        try:
            answer = await self._http().post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise BackendUnavailableError(
                f"vLLM at {self.info.url} did not answer: {type(e).__name__}"
            ) from None
        if answer.status_code != 200:
            raise BackendError(f"vLLM answered HTTP {answer.status_code}: {error_message(answer.text)}")
        return answer.json()

    async def _compute(self, job: Job) -> list:
        if job.key[0] == "classify":
            result = await self._classify(job)
        else:
            choices = (await self._post(self._generation_body(job, stream=False)))["choices"]
            result = [self._completion(job, c) for c in sorted(choices, key=lambda c: c["index"])]
        self._count(job)
        return result

    async def _classify(self, job: Job) -> list[torch.Tensor]:
        """Per row, the log-softmax over its labels of their first tokens' log-probabilities; rows
        whose prompts use other label tokens go in separate requests, sent together."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, e in enumerate(job.entries):
            groups.setdefault(tuple(w[0] for w in e.usage.labels.label_ids), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(job.entries)

        async def score(tokens: tuple[int, ...], rows: list[int]) -> None:
            unique = sorted(set(tokens))
            body = self._classify_body([job.entries[i] for i in rows], [job.ids[i] for i in rows], unique)
            choices = sorted((await self._post(body))["choices"], key=lambda c: c["index"])
            for i, choice in zip(rows, choices, strict=True):
                got = {token_id(k): v for k, v in choice["logprobs"]["top_logprobs"][0].items()}
                missing = [t for t in unique if t not in got]
                if missing:
                    raise BackendError(f"vLLM did not return log-probabilities for label tokens {missing}")
                out[i] = torch.tensor([got[t] for t in tokens], dtype=torch.float64).log_softmax(0).float()

        await asyncio.gather(*(score(t, rows) for t, rows in groups.items()))
        return out

    def _completion(self, job: Job, choice: dict) -> Completion:
        i = choice["index"]
        tokens = _token_ids(choice)
        logprobs = self._logprobs(choice.get("logprobs"), job.params.get("logprobs"))
        finish = choice.get("finish_reason") or "length"
        if finish == "stop" and tokens and tokens[-1] == self.eos:  # vLLM counts the EOS; softprompt does not
            tokens = tokens[:-1]
            logprobs = None if logprobs is None else logprobs[: len(tokens)]
        return Completion(
            text=choice["text"],
            tokens=tokens,
            finish_reason=finish,
            prompt_tokens=len(job.ids[i]),
            logprobs=logprobs,
        )

    @staticmethod
    def _logprobs(data: dict | None, k: int | None) -> list[TokenLogprob] | None:
        if k is None or data is None:
            return None
        out = []
        for lp, top in zip(data["token_logprobs"], data["top_logprobs"], strict=True):
            ranked = sorted(((token_id(t), v) for t, v in (top or {}).items()), key=lambda x: -x[1])
            out.append(TokenLogprob(logprob=lp, top=ranked[:k]))
        return out

    def _count(self, job: Job) -> None:
        self.stats["batches"] += 1
        self.stats["rows"] += len(job.entries)
        self.stats["requests"] += 1

    async def _stream(self, job: Job) -> None:
        """Pass vLLM's chunks on as :class:`StreamText`; stops reading (and so closes vLLM's stream,
        which aborts the generation) once the client has gone."""
        import httpx

        self._in_flight += 1
        texts = [""] * len(job.entries)
        tokens: list[list[int]] = [[] for _ in job.entries]
        try:
            body = self._generation_body(job, stream=True)
            async with self._http().stream("POST", "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    raise BackendError(
                        f"vLLM answered HTTP {answer.status_code}: {error_message((await answer.aread()).decode())}"
                    )
                async for line in answer.aiter_lines():
                    if job.cancelled.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise BackendError(f"vLLM failed while streaming: {error_message(data)}")
                    for c in chunk.get("choices", []):
                        i = c["index"]
                        texts[i] += c.get("text", "")
                        tokens[i] += _token_ids(c)
                        done = None
                        if c.get("finish_reason"):
                            whole = {"index": i, "text": texts[i], "token_ids": tokens[i],
                                     "finish_reason": c["finish_reason"]}  # fmt: skip
                            done = self._completion(job, whole)
                        job.stream.put_nowait(StreamText(i, c.get("text", ""), done))
            self._count(job)
            job.stream.put_nowait([])
        except httpx.HTTPError as e:
            job.stream.put_nowait(
                BackendUnavailableError(f"vLLM at {self.info.url} stopped answering: {type(e).__name__}")
            )
        except Exception as e:
            job.stream.put_nowait(e)
        finally:
            self._in_flight -= 1


def _token_ids(choice: dict) -> list[int]:
    """A choice's (or streamed chunk's) generated token ids; vLLM gives them with ``return_token_ids``."""
    ids = choice.get("token_ids")
    if ids is None:
        raise BackendError(
            "vLLM answered without token_ids although the request asked for them (return_token_ids)"
        )
    return list(ids)


def backend_for(store: PromptStore, limits: ServeLimits, url: str, *, served_model: str | None = None,
                dtype: str = "float32", transport=None, wait_s: float = 0.0) -> VLLMBackend:  # fmt: skip
    """:func:`~softprompt.serving.vllm_connect.connect` to the vLLM at ``url`` (waiting up to
    ``wait_s`` seconds for it to listen), then a :class:`VLLMBackend` on it."""
    torch_dtype = resolve_dtype(dtype)
    t0 = time.perf_counter()
    info = connect(
        url, store, served_model=served_model, dtype=torch_dtype, transport=transport, wait_s=wait_s
    )
    log.info("gateway to %s, checked in %.1f s", info.describe(), time.perf_counter() - t0)
    return VLLMBackend(store, limits, info, dtype=torch_dtype, transport=transport)
