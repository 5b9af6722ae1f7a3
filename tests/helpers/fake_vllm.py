"""A stand-in for a vLLM OpenAI server, for the gateway's tests: the routes the gateway uses
(``/health``, ``/version``, ``/v1/models``, ``/v1/completions`` with ``prompt_embeds``), answered the way vLLM
0.32 answers them, by a plain Hugging Face model run on the received tensors (``inputs_embeds``,
greedy, whole sequence each step; nothing of softprompt's model code).

It is an ``httpx.MockTransport`` handler, so the gateway's real HTTP client talks to it in-process.
Every request body is kept in ``requests`` for the tests to inspect.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import torch


class FakeVLLM:
    def __init__(self, model, tokenizer, *, name: str = "base", version: str = "0.32.0",
                 max_model_len: int = 512, enable_prompt_embeds: bool = True):  # fmt: skip
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.version, self.max_model_len, self.enabled = version, max_model_len, enable_prompt_embeds
        self.requests: list[dict] = []
        self.fail_with: tuple[int, str] | None = None  # answer every completion with this error
        self.transport = httpx.MockTransport(self.handle)

    # ------------------------------------------------------------------ routes
    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/version":
            return httpx.Response(200, json={"version": self.version})
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": self.name, "object": "model", "max_model_len": self.max_model_len}]})  # fmt: skip
        if path == "/v1/completions":
            body = json.loads(request.content)
            self.requests.append(body)
            if self.fail_with is not None:
                status, message = self.fail_with
                return httpx.Response(status, json={"error": {"message": message, "code": status}})
            if not self.enabled:
                return httpx.Response(400, json={"error": {"message": "You must set `--enable-prompt-embeds` "
                                                           "to input `prompt_embeds`."}})  # fmt: skip
            return self.complete(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def complete(self, body: dict) -> httpx.Response:
        embeds = body["prompt_embeds"]
        embeds = embeds if isinstance(embeds, list) else [embeds]
        choices = [self.generate(i, self.decode(e), body) for i, e in enumerate(embeds)]
        usage = {"prompt_tokens": 0, "completion_tokens": sum(len(c["token_ids"]) for c in choices)}
        if not body.get("stream"):
            return httpx.Response(200, json={"id": "cmpl-fake", "object": "text_completion",
                                             "model": body["model"], "choices": choices, "usage": usage})  # fmt: skip
        events = []
        for c in choices:  # one chunk per token, then the finish, as vLLM streams
            for n, t in enumerate(c["token_ids"]):
                last = n == len(c["token_ids"]) - 1
                piece = c["pieces"][n]
                events.append({"index": c["index"], "text": piece, "token_ids": [t],
                               "finish_reason": c["finish_reason"] if last else None})  # fmt: skip
            if not c["token_ids"]:
                events.append(
                    {"index": c["index"], "text": "", "token_ids": [], "finish_reason": c["finish_reason"]}
                )
        lines = "".join(f"data: {json.dumps({'id': 'cmpl-fake', 'choices': [e]})}\n\n" for e in events)
        return httpx.Response(200, content=(lines + "data: [DONE]\n\n").encode(),
                              headers={"content-type": "text/event-stream"})  # fmt: skip

    # ------------------------------------------------------------------ the model
    @staticmethod
    def decode(data: str) -> torch.Tensor:
        tensor = torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True)
        assert tensor.dim() == 2 and tensor.is_floating_point()
        return tensor

    def generate(self, index: int, embeds: torch.Tensor, body: dict) -> dict:
        assert body.get("temperature") == 0.0, "the fake vLLM decodes greedily only"
        embedding = self.model.get_input_embeddings()
        eos, stops = self.tokenizer.eos_token_id, body.get("stop") or []
        tokens, steps = [], []
        x = embeds.to(embedding.weight.dtype)[None]
        finish = "length"
        bias = {int(k): v for k, v in (body.get("logit_bias") or {}).items()}
        with torch.no_grad():
            for _ in range(body["max_tokens"]):
                logits = self.model(inputs_embeds=x).logits[0, -1].float()
                logp = logits.log_softmax(-1)  # vLLM's raw log-probabilities: before the bias
                for t, b in bias.items():
                    logits[t] += b
                token = int(logits.argmax())
                steps.append(logp)
                tokens.append(token)
                if token in (body.get("stop_token_ids") or []) or (
                    token == eos and not body.get("ignore_eos")
                ):
                    finish = "stop"  # the token stays in token_ids and logprobs, as in vLLM
                    break
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if any(s in text for s in stops):
                    finish = "stop"
                    break
                x = torch.cat([x, embedding(torch.tensor([[token]]))], dim=1)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in stops:
            text = text.split(s)[0] if s in text else text
        # streamed pieces: each token's new text, cut where the final text ends (vLLM sends no stop string)
        upto = [
            self.tokenizer.decode(tokens[: n + 1], skip_special_tokens=True)[: len(text)]
            for n in range(len(tokens))
        ]
        pieces = [p[len(q) :] for p, q in zip(upto, ["", *upto[:-1]], strict=True)]
        choice = {"index": index, "text": text, "token_ids": tokens, "finish_reason": finish, "pieces": pieces,
                  "logprobs": self.logprobs(tokens, steps, body)}  # fmt: skip
        return choice

    @staticmethod
    def logprobs(tokens: list[int], steps: list[torch.Tensor], body: dict) -> dict | None:
        k, wanted = body.get("logprobs"), body.get("logprob_token_ids")
        if k is None:
            return None
        assert body.get("return_tokens_as_token_ids"), "the gateway reads tokens by id"
        tops = []
        for token, logp in zip(tokens, steps, strict=True):
            ids = list(wanted) if wanted else logp.topk(k).indices.tolist()
            tops.append({f"token_id:{i}": float(logp[i]) for i in [*ids, token]})
        return {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": [float(s[t]) for t, s in zip(tokens, steps, strict=True)],
                "top_logprobs": tops, "text_offset": [0] * len(tokens)}  # fmt: skip
