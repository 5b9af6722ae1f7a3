"""Benchmark: the vLLM gateway (``softprompt serve --vllm_url``) against calling vLLM directly and
against softprompt's own server, same inputs (``python benchmarks/serve_load.py --gateway``).

Three servers on loopback, each in its own process: vLLM's OpenAI server (the CPU build from
``make vllm-env``) on SmolLM2 as ``export-model`` writes it, with ``--enable-prompt-embeds``; the
gateway in front of it with ``--num-prompts`` prompts in its store (500: the issue's figure); and
``softprompt serve`` on the same store (no vLLM).

- **Latency, one client**: ``--requests`` completions (``--max-tokens`` greedy tokens), each input
  under a different stored prompt, sent in turn to vLLM directly (the ``prompt_embeds`` body built
  beforehand, as ``softprompt export-embeds`` writes it), to the gateway (the text and the prompt's
  name) and to our server, the order rotating each round. Reported: p50/p95 per path and the
  gateway's overhead over the direct call (``p95`` of the gateway minus ``p95`` direct, and the p95
  of the per-input differences). The gateway's answers must equal vLLM's direct ones.
- **Where the gateway's time goes**: building one request's body in-process (embedding lookup,
  ``torch.save``, base64, JSON), median over the same inputs.
- **Throughput, ``--clients`` concurrent clients**: requests/s of the gateway, of vLLM direct with
  ``prompt_embeds``, and of vLLM given the same texts as plain tokens (the issue's GPU target is the
  gateway at >= 90% of the last; on 2 CPU cores the gateway process shares the cores with vLLM).

Run:  .venv/bin/python benchmarks/serve_load.py --gateway   (writes results/serve_gateway.json)
Needs ``make vllm-env``; about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from local_server import free_port, launch
from results_io import run_command, utc_now, write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "serve_gateway.json"
VLLM_PYTHON = Path(os.environ.get("SOFTPROMPT_VLLM_PYTHON", REPO / ".vllm-venv" / "bin" / "python"))
TEMPLATE = "Question: {text}\nAnswer:"
QUESTIONS = [
    "What is the capital of France?", "Who wrote Hamlet?", "What colour is the sky?", "How many legs has a spider?",
    "What is the largest ocean?", "Who painted the Mona Lisa?", "What is water made of?", "When did the war end?",
    "Which planet is the red one?", "What do bees make?", "How far is the moon?", "What is the speed of light?",
    "Who discovered penicillin?", "What language is spoken in Brazil?", "What is the boiling point of water?",
    "Which animal is the fastest?", "What is the tallest mountain?", "Who invented the telephone?",
    "What is the main gas in air?", "How many days has a leap year?",
]  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build_store(root: Path, n: int, model, tokenizer) -> list[str]:
    from softprompt import PromptConfig, SoftPrompt, save_prompt

    names = []
    for i in range(n):
        prompt = SoftPrompt.initialize(
            PromptConfig(num_virtual_tokens=20, init="vocab", seed=i), model, tokenizer
        )
        prompt.meta.template = TEMPLATE
        save_prompt(prompt, root / f"p{i:03d}", model)
        names.append(f"p{i:03d}")
    return names


def start_vllm(folder: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": ""}
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "512", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 900) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            time.sleep(1)
    raise RuntimeError(f"vLLM not ready in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        proc.kill()


def latency_phase(args, urls: dict, bodies: dict, served: str) -> dict:
    """One client; each round sends input i to every path, in a rotating order."""
    import httpx

    times: dict[str, list[float]] = {k: [] for k in bodies}
    texts: dict[str, list[str]] = {k: [] for k in bodies}
    with httpx.Client(timeout=120) as client:
        for i in range(args.warmup + args.requests):
            order = list(bodies)[i % 3 :] + list(bodies)[: i % 3]
            for path in order:
                t0 = time.perf_counter()
                r = client.post(urls[path] + "/v1/completions", json=bodies[path][i % len(bodies[path])])
                dt = time.perf_counter() - t0
                r.raise_for_status()
                if i >= args.warmup:
                    times[path].append(dt * 1000)
                    texts[path].append(r.json()["choices"][0]["text"])
    out = {}
    for path, ts in times.items():
        out[f"{path}_p50_ms"], out[f"{path}_p95_ms"] = statistics.median(ts), percentile(ts, 0.95)
    diffs = [g - d for g, d in zip(times["gateway"], times["direct"], strict=True)]
    out["gateway_overhead_p95_ms"] = out["gateway_p95_ms"] - out["direct_p95_ms"]
    out["gateway_overhead_p50_ms"] = out["gateway_p50_ms"] - out["direct_p50_ms"]
    out["gateway_minus_direct_paired_p95_ms"] = percentile(diffs, 0.95)
    out["gateway_minus_direct_paired_median_ms"] = statistics.median(diffs)
    out["gateway_texts_equal_direct"] = texts["gateway"] == texts["direct"]
    out["gateway_texts_equal_own_server"] = sum(
        a == b for a, b in zip(texts["gateway"], texts["own"], strict=True)
    ) / len(texts["own"])
    return out


async def throughput(url: str, bodies: list[dict], clients: int, n: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as client:
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                r = await client.post(url + "/v1/completions", json=bodies[i % len(bodies)])
                r.raise_for_status()

        await client.post(url + "/v1/completions", json=bodies[0])  # warm
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=500)
    ap.add_argument("--requests", type=int, default=200, help="inputs timed per path (one client)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--throughput-requests", type=int, default=160)
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not VLLM_PYTHON.is_file():
        print(f"skipped: no vLLM environment at {VLLM_PYTHON} (make vllm-env)")
        return
    from softprompt.loading import load_model
    from softprompt.model_folder import save_model_folder
    from softprompt.prompt import load_prompt
    from softprompt.vllm import prompt_embeds_request

    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2", device="cpu")
    work = Path(tempfile.mkdtemp(prefix="gateway-"))
    folder = save_model_folder(model, work / "model", tokenizer)
    names = build_store(work / "store", args.num_prompts, model, tokenizer)
    n = args.warmup + args.requests
    picked = [names[(i * 7) % len(names)] for i in range(n)]  # spread over the store
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    common = {"max_tokens": args.max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    direct, build_ms = [], []
    for name, q in zip(picked, questions, strict=True):
        prompt = load_prompt(work / "store" / name, model)
        t = time.perf_counter()
        body = prompt_embeds_request(prompt, q, tokenizer, model, served_model=str(folder), **common)
        json.dumps(body)
        build_ms.append((time.perf_counter() - t) * 1000)
        direct.append(body)
    print(f"{len(direct)} direct requests built in {time.perf_counter() - t0:.1f} s")
    bodies = {
        "direct": direct,
        "gateway": [
            {"model": name, "prompt": q, **common} for name, q in zip(picked, questions, strict=True)
        ],
        "own": [{"model": name, "prompt": q, **common} for name, q in zip(picked, questions, strict=True)],
    }
    vllm_port, gw_port, own_port = free_port(), free_port(), free_port()
    log = work / "vllm.log"
    vllm = start_vllm(folder, vllm_port, log)
    procs = [vllm]
    try:
        vllm_url = f"http://127.0.0.1:{vllm_port}"
        ready = wait_ready(vllm, vllm_url, log)
        print(f"vLLM ready in {ready:.0f} s")
        cli = [sys.executable, "-m", "softprompt.cli", "serve", str(work / "store"), "--max_queue", "1024"]
        t = time.perf_counter()
        gw, gw_url = launch([*cli, "--port", str(gw_port), "--vllm_url", vllm_url], gw_port, "the gateway")
        gateway_start = time.perf_counter() - t
        procs.append(gw)
        own, own_url = launch([*cli, "--port", str(own_port)], own_port, "softprompt serve")
        procs.append(own)
        urls = {"direct": vllm_url, "gateway": gw_url, "own": own_url}
        result = latency_phase(args, urls, bodies, str(folder))
        plain = [{"model": str(folder), "prompt": TEMPLATE.format(text=q), **common} for q in questions]
        rates = {}
        for what, url, reqs in (("vllm_plain_tokens", vllm_url, plain), ("direct", vllm_url, direct),
                                ("gateway", gw_url, bodies["gateway"])):  # fmt: skip
            rates[what] = asyncio.run(throughput(url, reqs, args.clients, args.throughput_requests))
            print(f"throughput {what}: {rates[what]:.2f} req/s")
    finally:
        for p in reversed(procs):
            stop(p)
    res = {
        "model": "smollm2", "device": "cpu (2 cores, all three servers and the client on them)",
        "vllm": "vllm-cpu 0.32.0", "num_prompts": args.num_prompts, "requests": args.requests,
        "max_tokens": args.max_tokens, "vllm_start_seconds": ready, "gateway_start_seconds": gateway_start,
        **result,
        "request_build_median_ms": statistics.median(build_ms), "request_build_p95_ms": percentile(build_ms, 0.95),
        "clients": args.clients, "throughput_requests": args.throughput_requests,
        **{f"throughput_{k}_rps": v for k, v in rates.items()},
        "gateway_throughput_ratio_vs_plain_tokens": rates["gateway"] / rates["vllm_plain_tokens"],
        "gateway_throughput_ratio_vs_direct": rates["gateway"] / rates["direct"],
        "command": run_command(), "date": utc_now(),
    }  # fmt: skip
    for k, v in res.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    write_results(args.output, res)


if __name__ == "__main__":
    main()
