"""Benchmark: a bounded load test of ``softprompt serve`` on loopback, many tasks vs one, vs PEFT.

Each configuration runs its server in a child process (uvicorn on 127.0.0.1) and this process sends
``POST /v1/classify`` requests (one text each) from ``--clients`` concurrent clients:

* ``mixed``: 8 classification tasks (different templates, label words and prompt lengths), requests
  interleaved over the tasks; our batcher gathers them into shared batches with cached prefixes.
* ``single``: the same server, every request for one task (the best case for batching).
* ``peft``: the same API and HTTP stack, but each request handled alone the way PEFT allows:
  ``set_adapter(task)`` + forward (PEFT keeps one active adapter per model, so requests take turns).
* ``loaded_N``: one client, requests for one task, with N = 1, 100 and 1,000 prompts loaded: the
  latency must not grow with the number of prompts in the store.

Reported: requests/s and p50/p99 latency (ms) per configuration (``mixed``, ``single`` and ``peft``
each run ``--rounds`` times, interleaved in alternating order, medians reported; for ours also the
requests per batch), ``mixed_ratio_vs_single`` (target >= 0.9) and ``mixed_ratio_vs_peft`` (target
>= 3), each the median of the per-round ratios, and ``loaded_1000_ratio_vs_1`` (target <= 1.1).
The prompts are untrained (speed does not depend on the values). ``--dtype bfloat16`` runs every
server (ours and PEFT) in bf16. ``--smoke`` runs a tiny model.

``--stream`` measures streaming instead (our server alone, ``results/serve_load_stream.json``):
``--clients`` clients send ``/v1/completions`` with ``stream: true`` (``--stream-tokens`` tokens,
8 tasks interleaved) and time the first chunk of text (time to first chunk, TTFC) and the whole
answer; the same requests unstreamed give the wait without streaming (``ttfc_ratio_vs_unstreamed``;
under this load the first chunk mostly waits for a batch slot), and the same for one client alone
(``one_client_*``: no queueing).
Then one client classifies, alone and while the streams run: the batcher answers it between
decoding steps (``classify_during_streams_ratio`` is its p50 latency over the p50 alone).

``--gateway`` measures the vLLM gateway (``softprompt serve --vllm_url``) against calling vLLM directly
and against our own server, same inputs, 500 prompts stored (``serve_gateway.py``; needs
``make vllm-env``).

Run:  .venv/bin/python benchmarks/serve_load.py [--dtype bfloat16 --output results/serve_load_bf16.json]
      [--device cuda] [--stream] [--gateway]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from local_server import free_port, launch
from pydantic import BaseModel
from results_io import run_command, utc_now, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"
STREAM_RESULTS = RESULTS.with_name("serve_load_stream.json")
TASKS = [  # (template, verbalizer): eight tasks, each with its own words and prompt length
    ("Review: {text}\nSentiment:", {"neg": "negative", "pos": "positive"}),
    ("Article: {text}\nTopic:", {"w": "world", "s": "sports", "b": "business", "t": "science"}),
    ("Question: {text}\nAnswer type:", {"d": "description", "e": "entity", "h": "person", "l": "location"}),
    ("Comment: {text}\nToxic:", {"no": "no", "yes": "yes"}),
    ("Sentence: {text}\nStyle:", {"f": "formal", "c": "casual"}),
    ("Text: {text}\nEmotion:", {"j": "joy", "a": "anger", "s": "sadness", "f": "fear"}),
    ("Message: {text}\nSpam:", {"ham": "no", "spam": "yes"}),
    ("Text: {text}\nLanguage:", {"en": "English", "fr": "French", "de": "German"}),
]
LENGTHS = [10, 20, 30, 16, 12, 24, 8, 20]


# ---------------------------------------------------------------------------- the server side
class PeftRequest(BaseModel):
    model: str
    input: str


def load_base(args):
    from softprompt.loading import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.smoke:  # the real tokenizer on a tiny random model with the same vocabulary
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
        model = LlamaForCausalLM(cfg).eval().to(args.device)
    return model, tokenizer


def task_prompt(i: int, model, tokenizer):
    from softprompt import PromptConfig, SoftPrompt

    template, verbalizer = TASKS[i % len(TASKS)]
    cfg = PromptConfig(num_virtual_tokens=LENGTHS[i % len(LENGTHS)], init="vocab", seed=i)
    prompt = SoftPrompt.initialize(cfg, model, tokenizer)
    prompt.meta.template, prompt.meta.label_words = template, list(verbalizer.values())
    prompt.meta.verbalizer = verbalizer
    return prompt


def run_server(args) -> None:
    """Child process: build the configured server and serve until killed."""
    import tempfile

    import uvicorn

    from softprompt.serving.server import one_torch_thread

    torch.set_num_threads(args.threads)
    with one_torch_thread():  # as `softprompt serve` does: model compute only in the serving thread
        model, tokenizer = load_base(args)
        if args.serve == "peft":
            app = peft_app(model, tokenizer)
        else:
            from softprompt.serving.registry import PromptStore
            from softprompt.serving.server import ServeLimits, create_app

            store = PromptStore(tempfile.mkdtemp(), model, tokenizer)
            for i in range(args.num_prompts):
                store.add(f"task{i}", task_prompt(i, model, tokenizer), save=False)
            limits = ServeLimits(max_batch_size=args.max_batch_size, batch_window_ms=args.window_ms,
                                 batch_gap_ms=args.gap_ms)  # fmt: skip
            app = create_app(store, limits)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


class PeftBaseline:
    """Each request run alone the way PEFT allows: ``set_adapter(task)`` + forward, one at a time."""

    def __init__(self, model, tokenizer):
        import tempfile

        from peft import PeftModel

        from softprompt import save_prompt

        root = Path(tempfile.mkdtemp())
        self.tokenizer, self.specs = tokenizer, []
        for i in range(len(TASKS)):
            save_prompt(task_prompt(i, model, tokenizer), root / f"task{i}", model)
            template, verbalizer = TASKS[i]
            firsts = [
                tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in verbalizer.values()
            ]
            self.specs.append((template, list(verbalizer), firsts))
        self.model = PeftModel.from_pretrained(model, root / "task0", adapter_name="task0")
        for i in range(1, len(TASKS)):
            self.model.load_adapter(root / f"task{i}", adapter_name=f"task{i}")
        self.model.eval()

    def __call__(self, name: str, text: str) -> dict:
        """The label and per-label scores of ``text`` under task ``name`` (``"task3"``)."""
        template, labels, firsts = self.specs[int(name.removeprefix("task"))]
        ids = self.tokenizer(template.replace("{text}", text), return_tensors="pt").input_ids
        with torch.no_grad():
            self.model.set_adapter(name)
            logits = self.model(input_ids=ids.to(self.model.device)).logits[0, -1]
        probs = logits.float().log_softmax(-1)[firsts].softmax(-1)
        return {
            "label": labels[int(probs.argmax())],
            "scores": dict(zip(labels, probs.tolist(), strict=True)),
        }


def peft_app(model, tokenizer):
    """The baseline server: the same /v1/classify API, each request run by :class:`PeftBaseline`."""
    from fastapi import FastAPI

    baseline = PeftBaseline(model, tokenizer)
    # One active adapter per model, so requests take turns: one thread runs them all, as our batcher
    # does (a single compute thread also avoids a second OpenMP team; see serve.one_torch_thread).
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft-baseline")
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(req: PeftRequest):
        result = await asyncio.get_running_loop().run_in_executor(worker, baseline, req.model, req.input)
        return {"data": [result]}

    return app


# ---------------------------------------------------------------------------- the client side
def start(args, serve: str, num_prompts: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", serve, "--port", str(port), "--num-prompts", str(num_prompts),
           "--model", args.model, "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
           "--window-ms", str(args.window_ms), "--gap-ms", str(args.gap_ms), "--dtype", args.dtype,
           "--device", args.device] + (["--smoke"] if args.smoke else [])  # fmt: skip
    return launch(cmd, port, f"the {serve} server")


async def load(url: str, names: list[str], texts: list[str], n: int, clients: int) -> dict:
    """``n`` requests from ``clients`` concurrent clients, request i for ``names[i % len(names)]``."""
    import httpx

    latencies: list[float] = []
    counter = iter(range(n))
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        for i in counter:
            body = {"model": names[i % len(names)], "input": texts[i % len(texts)]}
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/classify", json=body)
            latencies.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200:
                failures += 1
                print(f"request failed ({r.status_code}): {r.text[:300]}", file=sys.stderr)

    limits = httpx.Limits(max_connections=clients)  # one connection per client
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start_t = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start_t
    if failures:
        raise RuntimeError(f"{failures} of {n} requests failed")
    q = statistics.quantiles(latencies, n=100)
    return {"rps": n / wall, "p50_ms": statistics.median(latencies), "p99_ms": q[98]}


async def stream_load(url: str, names: list[str], texts: list[str], n: int, clients: int, tokens: int,
                      stream: bool = True) -> dict:  # fmt: skip
    """``n`` greedy completions of at most ``tokens`` tokens (the same requests streamed or not) from
    ``clients`` clients; with ``stream``, also the time to the first chunk that carries text."""
    import httpx

    firsts: list[float] = []
    totals: list[float] = []
    counter = iter(range(n))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            body = {"model": names[i % len(names)], "prompt": texts[i % len(texts)], "max_tokens": tokens,
                    "temperature": 0, "stream": stream}  # fmt: skip
            t0 = time.perf_counter()
            if not stream:
                r = await http.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                totals.append((time.perf_counter() - t0) * 1000)
                continue
            first = None
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {") and '"text": ""' not in line:
                        first = (time.perf_counter() - t0) * 1000
                    if line == "data: [DONE]":
                        break
            firsts.append(first if first is not None else (time.perf_counter() - t0) * 1000)
            totals.append((time.perf_counter() - t0) * 1000)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    out = {"total_p50_ms": statistics.median(totals), "total_p99_ms": statistics.quantiles(totals, n=100)[98]}
    if stream:
        out |= {
            "ttfc_p50_ms": statistics.median(firsts),
            "ttfc_p99_ms": statistics.quantiles(firsts, n=100)[98],
        }
    return out


async def classify_while(url: str, texts: list[str], n: int, background) -> dict:
    """p50 latency of ``n`` classify requests sent one after another while ``background`` runs."""
    import httpx

    latencies: list[float] = []
    task = asyncio.ensure_future(background) if background is not None else None
    async with httpx.AsyncClient(timeout=600) as http:
        if task is not None:
            await asyncio.sleep(0.5)  # let the streams start
        for i in range(n):
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/classify", json={"model": "task0", "input": texts[i % len(texts)]})
            r.raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1000)
    if task is not None:
        await task
    return {"p50_ms": statistics.median(latencies)}


def streaming(args, names8: list[str], texts: list[str]) -> dict:
    """Time to first chunk vs the whole unstreamed answer, and classify latency while streams run."""
    proc, url = start(args, "ours", len(TASKS))
    out: dict = {"stream_tokens": args.stream_tokens, "stream_requests": args.stream_requests}
    try:
        warm = max(4, args.clients)
        asyncio.run(stream_load(url, names8, texts, warm, args.clients, args.stream_tokens))  # warm-up
        streamed, unstreamed = [], []
        for r in range(args.rounds):  # alternate, so drift favours neither
            order = [True, False] if r % 2 == 0 else [False, True]
            for stream in order:
                res = asyncio.run(stream_load(url, names8, texts, args.stream_requests, args.clients,
                                              args.stream_tokens, stream))  # fmt: skip
                (streamed if stream else unstreamed).append(res)
        for key in ("ttfc_p50_ms", "ttfc_p99_ms", "total_p50_ms", "total_p99_ms"):
            out[f"stream_{key}"] = statistics.median(res[key] for res in streamed)
        out["unstreamed_total_p50_ms"] = statistics.median(res["total_p50_ms"] for res in unstreamed)
        out["ttfc_ratio_vs_unstreamed"] = out["stream_ttfc_p50_ms"] / out["unstreamed_total_p50_ms"]
        # one client alone: no queueing, the first chunk comes after the prefill and one step
        n1 = max(4, args.rounds * 2)
        one = asyncio.run(stream_load(url, names8, texts, n1, 1, args.stream_tokens))
        one_plain = asyncio.run(stream_load(url, names8, texts, n1, 1, args.stream_tokens, False))
        out["one_client_ttfc_p50_ms"], out["one_client_total_p50_ms"] = (
            one["ttfc_p50_ms"],
            one["total_p50_ms"],
        )
        out["one_client_unstreamed_p50_ms"] = one_plain["total_p50_ms"]
        out["one_client_ttfc_ratio_vs_unstreamed"] = one["ttfc_p50_ms"] / one_plain["total_p50_ms"]
        alone = asyncio.run(classify_while(url, texts, args.latency_requests, None))
        busy = asyncio.run(classify_while(url, texts, args.latency_requests, stream_load(
            url, names8, texts, args.stream_requests, args.clients, args.stream_tokens)))  # fmt: skip
        out["classify_alone_p50_ms"], out["classify_during_streams_p50_ms"] = alone["p50_ms"], busy["p50_ms"]
        out["classify_during_streams_ratio"] = busy["p50_ms"] / alone["p50_ms"]
    finally:
        stop(proc)
    print(f"one client, {args.stream_tokens} tokens: time to first chunk p50 {out['one_client_ttfc_p50_ms']:.1f} ms, "
          f"whole answer {out['one_client_total_p50_ms']:.1f} ms, unstreamed {out['one_client_unstreamed_p50_ms']:.1f} ms "
          f"(TTFC / unstreamed {out['one_client_ttfc_ratio_vs_unstreamed']:.2f})")  # fmt: skip
    print(f"streaming ({args.clients} clients, {args.stream_tokens} tokens): time to first chunk p50 "
          f"{out['stream_ttfc_p50_ms']:.1f} ms (p99 {out['stream_ttfc_p99_ms']:.1f}), whole answer p50 "
          f"{out['stream_total_p50_ms']:.1f} ms; unstreamed p50 {out['unstreamed_total_p50_ms']:.1f} ms "
          f"(TTFC / unstreamed {out['ttfc_ratio_vs_unstreamed']:.2f}); classify p50 alone "
          f"{out['classify_alone_p50_ms']:.1f} ms, during the streams {out['classify_during_streams_p50_ms']:.1f} ms "
          f"({out['classify_during_streams_ratio']:.2f}x)")  # fmt: skip
    return out


def batch_counts(url: str) -> tuple[int, int]:
    """Requests and batches our server has run so far (its ``/health``)."""
    import httpx

    stats = httpx.get(url + "/health", timeout=10).json()
    return stats["requests"], stats["batches"]


def report(label: str, result: dict) -> None:
    per_batch = (
        f"  {result['requests_per_batch']:5.1f} requests/batch" if "requests_per_batch" in result else ""
    )
    print(f"{label:<28} {result['rps']:7.1f} req/s  p50 {result['p50_ms']:7.1f} ms  "
          f"p99 {result['p99_ms']:7.1f} ms{per_batch}", flush=True)  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


def throughput(args, names8: list[str], texts: list[str]) -> dict:
    """``mixed``, ``single`` and ``peft`` measured in turn, ``--rounds`` times; medians per configuration.

    Both servers stay up for the whole test (an idle server uses no CPU), so the rounds interleave
    the configurations. The order reverses every other round (mixed, single, peft, then peft, single,
    mixed), so a machine that slowly speeds up or slows down favours no configuration, and the ratios
    are taken within each round (the medians of the per-round ratios are reported).
    """
    servers = {"ours": start(args, "ours", len(TASKS)), "peft": start(args, "peft", len(TASKS))}
    configs = {"mixed": ("ours", names8), "single": ("ours", ["task0"]), "peft": ("peft", names8)}
    rounds: dict[str, list[dict]] = {key: [] for key in configs}
    try:
        for serve, names in configs.values():  # warm-up
            asyncio.run(load(servers[serve][1], names, texts, max(8, 2 * args.clients), args.clients))
        for r in range(args.rounds):
            order = list(configs.items())
            for key, (serve, names) in order if r % 2 == 0 else order[::-1]:
                url = servers[serve][1]
                before = batch_counts(url) if serve == "ours" else None
                res = asyncio.run(load(url, names, texts, args.requests, args.clients))
                if before is not None:  # how full our batches were
                    after = batch_counts(url)
                    res["requests_per_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                rounds[key].append(res)
                report(f"round {r + 1} {key} ({args.clients} clients)", res)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    out: dict = {}
    for key, results in rounds.items():
        for k in ("rps", "p50_ms", "p99_ms", "requests_per_batch"):
            if k in results[0]:
                out[f"{key}_{k}"] = statistics.median(res[k] for res in results)
        out[f"{key}_rps_rounds"] = [round(res["rps"], 2) for res in results]
    for other in ("single", "peft"):  # within each round: the machine's drift cancels
        per_round = [m["rps"] / o["rps"] for m, o in zip(rounds["mixed"], rounds[other], strict=True)]
        out[f"mixed_ratio_vs_{other}_rounds"] = [round(x, 3) for x in per_round]
        out[f"mixed_ratio_vs_{other}"] = statistics.median(per_round)
    return out


def measure(args, num_prompts: int, names: list[str], texts, clients: int, n: int) -> dict:
    proc, url = start(args, "ours", num_prompts)
    try:
        asyncio.run(load(url, names, texts, max(8, 2 * clients), clients))  # warm-up
        result = asyncio.run(load(url, names, texts, n, clients))
    finally:
        stop(proc)
    report(f"ours, {num_prompts} prompts ({clients} client)", result)
    return result


def main() -> None:
    if "--gateway" in sys.argv:  # the vLLM gateway vs vLLM direct vs ours: its own script and options
        import serve_gateway

        serve_gateway.main([a for a in sys.argv[1:] if a != "--gateway"])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=128, help="Requests per configuration and round.")
    ap.add_argument(
        "--latency-requests", type=int, default=60, help="Requests per loaded-prompts configuration."
    )
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6, help="Throughput rounds (medians are reported).")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server.")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--window-ms", type=float, default=25.0, help="The batcher's longest wait (ms).")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="The batch closes after this quiet gap (ms).")
    ap.add_argument("--dtype", default="float32", help="Model dtype of every server (ours and PEFT).")
    ap.add_argument("--device", default="cpu", help="Device of every server's model, e.g. cuda.")
    ap.add_argument("--smoke", action="store_true", help="A tiny random model and few requests (seconds).")
    ap.add_argument("--stream", action="store_true", help="Measure streaming (time to first chunk) instead.")
    ap.add_argument("--stream-tokens", type=int, default=32, help="Tokens per streamed completion.")
    ap.add_argument("--stream-requests", type=int, default=32, help="Streamed requests per round.")
    ap.add_argument(
        "--output", default=None, help="Results file (default: results/serve_load[_stream].json)."
    )
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # child process: run a server
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--num-prompts", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args)
        return
    default_output = STREAM_RESULTS if args.stream else RESULTS
    if args.smoke:
        args.requests, args.latency_requests, args.rounds = 48, 12, 2
        args.stream_requests = min(args.stream_requests, 16)
    from softprompt.data import demo_paths, read_examples

    texts = [ex.text for ex in read_examples(str(demo_paths()[1]))][:64]
    names8 = [f"task{i}" for i in range(len(TASKS))]
    if args.stream:
        out = {"model": "tiny-random-llama" if args.smoke else args.model, "clients": args.clients,
               "tasks": len(TASKS), "rounds": args.rounds, "dtype": args.dtype, "device": args.device,
               "threads": args.threads}  # fmt: skip
        out |= streaming(args, names8, texts)
        out["command"], out["date"] = run_command(), utc_now()
        if not args.smoke or args.output is not None:
            write_results(args.output or default_output, out)
        return
    out: dict = {"model": "tiny-random-llama" if args.smoke else args.model, "clients": args.clients,
                 "requests": args.requests, "tasks": len(TASKS), "rounds": args.rounds, "dtype": args.dtype,
                 "device": args.device, "batch_window_ms": args.window_ms, "batch_gap_ms": args.gap_ms}  # fmt: skip
    out |= throughput(args, names8, texts)
    for n in (1, 100, 1000):
        r = measure(args, n, ["task0"], texts, 1, args.latency_requests)
        out |= {f"loaded_{n}_{k}": v for k, v in r.items()}
    out["loaded_1000_ratio_vs_1"] = out["loaded_1000_p50_ms"] / out["loaded_1_p50_ms"]
    out["command"], out["date"] = run_command(), utc_now()
    print(f"mixed/single throughput {out['mixed_ratio_vs_single']:.2f} (target >= 0.9), "
          f"mixed/PEFT {out['mixed_ratio_vs_peft']:.2f} (target >= 3), "
          f"p50 with 1000 prompts / 1 prompt {out['loaded_1000_ratio_vs_1']:.2f} (target <= 1.1)")  # fmt: skip
    if not args.smoke or args.output is not None:
        write_results(args.output or default_output, out)


if __name__ == "__main__":
    main()
