"""Soak test of ``softprompt serve``: many clients for minutes while prompts are hot-swapped.

The server runs in a child process (uvicorn on 127.0.0.1, with an API key). ``--clients`` concurrent
clients send ``POST /v1/classify`` (four tasks) and ``POST /v1/completions`` (one generation prompt,
greedy) for ``--duration`` seconds, while another thread changes the store every ``--churn-s``
seconds: it replaces a prompt with another version (new files, then ``POST /v1/prompts/NAME/load``)
or deletes it (``DELETE``) and adds it back a moment later.

Every prompt has three versions with different weights. Before the run, each version's answers to
the probe texts are recorded (the reference). Every 200 answer during the run must equal (scores
within ``--tolerance``; completions exactly) the reference of a version of the requested prompt
that was live at some moment during the request: anything else is a *wrong-prompt answer*
(expected 0). A 404 is expected only while the prompt was deleted; any other non-200 is an error.
The server's RSS is sampled every 2 s (growth over the run, and its slope over the second half).

Reported: requests and requests/s, p50/p99 latency, errors by status code, unexpected errors,
wrong-prompt answers, swaps done, RSS at start/end/max and growth. ``--smoke`` runs a tiny random
model with a word-level tokenizer for ~10 s and writes to a temporary file.

Run:  .venv/bin/python benchmarks/soak.py [--duration 300 --clients 16]   (SmolLM2, ~6 min)
      .venv/bin/python benchmarks/soak.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from local_server import free_port, launch
from results_io import run_command, utc_now, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
API_KEY = "soak-test-key"
VERSIONS = 3
GEN = "gen"  # the generation prompt
# (template, verbalizer) of the classification tasks; the smoke set uses the tiny vocabulary.
TASKS = [
    ("Review: {text}\nSentiment:", {"neg": "negative", "pos": "positive"}),
    ("Article: {text}\nTopic:", {"w": "world", "s": "sports", "b": "business", "t": "science"}),
    ("Comment: {text}\nToxic:", {"no": "no", "yes": "yes"}),
    ("Text: {text}\nEmotion:", {"j": "joy", "a": "anger", "s": "sadness", "f": "fear"}),
]
SMOKE_TASKS = [
    ("review {text} sentiment", {"neg": "negative", "pos": "positive"}),
    ("news {text} label", {"s": "sports", "b": "business", "t": "technology"}),
    ("text {text} answer", {"good": "good", "bad": "bad"}),
    ("classify {text} label", {"w": "world", "s": "science", "n": "news"}),
]
TEXTS = ["the food was really good", "a boring film and a slow plot", "the staff were fast and fine",
         "not a great product", "news of the world and business", "love the actor"]  # fmt: skip
PROBES = ["the movie", "the news of", "a review of the food"]
SMOKE_WORDS = (
    "the a and or but of to in on it this that is was were be not no very really good bad great fine "
    "movie film food service product review sentiment positive negative love hate boring fun plot "
    "actor staff price slow fast classify text label answer news sports business science world technology"
).split()


# ---------------------------------------------------------------------------- the server side
def smoke_tokenizer():
    """A word-level tokenizer over a small vocabulary, built in-process (no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *SMOKE_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def load_base(args):
    import torch

    if not args.smoke:
        from softprompt.loading import load_model

        return load_model(args.model, dtype=args.dtype, device=args.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smoke_tokenizer()
    torch.manual_seed(0)  # initializer_range 0.3: a model whose outputs a prompt visibly changes
    cfg = LlamaConfig(vocab_size=len(tokenizer) + 5, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=None, eos_token_id=1, initializer_range=0.3)  # fmt: skip
    cfg.name_or_path = "tiny-random-llama"
    return LlamaForCausalLM(cfg).eval().to(args.device), tokenizer


def make_prompt(task: int | None, version: int, model, tokenizer, smoke: bool):
    """Version ``version`` of a classification task (``task``) or of the generation prompt (None)."""
    import torch

    from softprompt import PromptConfig, SoftPrompt

    seed = 1000 * (task if task is not None else 99) + version
    if smoke:  # random vectors: the tiny model's vocabulary embeddings are too alike to tell apart
        hidden = model.get_input_embeddings().weight.shape[1]
        weight = 3 * torch.randn(4 + version, hidden, generator=torch.Generator().manual_seed(seed))
        prompt = SoftPrompt(weight)
    else:
        cfg = PromptConfig(num_virtual_tokens=8 + 4 * version, init="vocab", seed=seed)
        prompt = SoftPrompt.initialize(cfg, model, tokenizer)
    if task is not None:
        template, verbalizer = (SMOKE_TASKS if smoke else TASKS)[task]
        prompt.meta.template, prompt.meta.label_words = template, list(verbalizer.values())
        prompt.meta.verbalizer = verbalizer
    return prompt


def run_server(args) -> None:
    """Child process: write every version of every prompt, load version 0 and serve until killed."""
    import torch
    import uvicorn

    from softprompt import save_prompt
    from softprompt.serving.registry import PromptStore
    from softprompt.serving.server import ServeLimits, create_app, one_torch_thread

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    with one_torch_thread():
        model, tokenizer = load_base(args)
        for name, task in prompt_names(args.smoke):
            for v in range(VERSIONS):
                save_prompt(make_prompt(task, v, model, tokenizer, args.smoke), work / "versions" / f"{name}_v{v}",
                            model)  # fmt: skip
            shutil.copytree(work / "versions" / f"{name}_v0", work / "store" / name)
        store = PromptStore(work / "store", model, tokenizer)
    app = create_app(store, ServeLimits(max_batch_size=32, max_queue=1024), api_key=API_KEY)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def prompt_names(smoke: bool) -> list[tuple[str, int | None]]:
    tasks = SMOKE_TASKS if smoke else TASKS
    return [(f"task{i}", i) for i in range(len(tasks))] + [(GEN, None)]


# ---------------------------------------------------------------------------- the client side
def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Churn:
    """Swaps prompt versions over HTTP and records when each version could have been live."""

    def __init__(self, http, work: Path, names: list[str]):
        self.http, self.work, self.names = http, work, names
        self.current = {n: 0 for n in names}
        # name -> [(t_begin, t_end, version or None when deleted)]; version 0 live from the start.
        self.events = {n: [(-math.inf, -math.inf, 0)] for n in names}
        self.counts: Counter = Counter()
        self.latencies_ms: dict[str, list[float]] = {"load": [], "delete": []}
        self.stop = threading.Event()

    def activate(self, name: str, version: int) -> int:
        """Write ``version``'s files into the store and load them; the HTTP status."""
        shutil.copytree(
            self.work / "versions" / f"{name}_v{version}", self.work / "store" / name, dirs_exist_ok=True
        )
        return self.http.post(f"/v1/prompts/{name}/load").status_code

    def _record(self, name: str, begin: float, version: int | None, status: int, action: str) -> None:
        self.events[name].append((begin, time.monotonic(), version))
        route = "delete" if action == "delete" else "load"  # DELETE /v1/prompts/NAME, POST .../load
        self.latencies_ms[route].append((time.monotonic() - begin) * 1000)
        self.counts[action] += 1
        if status != 200:
            self.counts[f"{action}_failed_{status}"] += 1

    def run(self, every_s: float) -> None:
        step = 0
        while not self.stop.wait(every_s):
            name = self.names[step % len(self.names)]
            nxt = (self.current[name] + 1) % VERSIONS
            if step % 3 == 2:  # delete, then add back (the next version) a moment later
                begin = time.monotonic()
                self._record(name, begin, None, self.http.delete(f"/v1/prompts/{name}").status_code, "delete")
                time.sleep(min(0.3, every_s / 3))
                begin = time.monotonic()
                self._record(name, begin, nxt, self.activate(name, nxt), "readd")
            else:
                begin = time.monotonic()
                self._record(name, begin, nxt, self.activate(name, nxt), "replace")
            self.current[name] = nxt
            step += 1

    def live(self, name: str, sent: float, done: float) -> set:
        """Versions (None: deleted) that may have answered a request sent at ``sent``, done at ``done``.

        A version is possibly live from the start of the swap that brings it in until the end of
        the next swap."""
        events, out = self.events[name], set()
        for k, (begin, _, version) in enumerate(events):
            until = events[k + 1][1] if k + 1 < len(events) else math.inf
            if begin <= done and until >= sent:
                out.add(version)
        return out


def references(http, churn: Churn, names: list[tuple[str, int | None]]) -> dict:
    """Each version's answers to the probe texts: ``{(name, version): [scores or text per probe]}``."""
    refs = {}
    for name, task in names:
        for v in range(VERSIONS):
            assert churn.activate(name, v) == 200, f"could not load {name} version {v}"
            if task is None:
                r = http.post("/v1/completions", json={"model": name, "prompt": PROBES, "max_tokens": 4,
                                                       "temperature": 0})  # fmt: skip
                refs[name, v] = [c["text"] for c in r.json()["choices"]]
            else:
                r = http.post("/v1/classify", json={"model": name, "input": TEXTS})
                refs[name, v] = [d["scores"] for d in r.json()["data"]]
        assert churn.activate(name, 0) == 200
    return refs


def separation(refs: dict, names: list[tuple[str, int | None]]) -> float:
    """The smallest difference between two versions of one classification task on one text."""
    gaps = []
    for name, task in names:
        if task is None:
            continue
        for i in range(len(TEXTS)):
            for a in range(VERSIONS):
                for b in range(a + 1, VERSIONS):
                    sa, sb = refs[name, a][i], refs[name, b][i]
                    gaps.append(max(abs(sa[k] - sb[k]) for k in sa))
    return min(gaps)


def matches(answer, reference, tolerance: float) -> bool:
    if isinstance(reference, str):
        return answer == reference
    return answer.keys() == reference.keys() and all(
        abs(answer[k] - reference[k]) <= tolerance for k in answer
    )


async def clients(url: str, names: list[tuple[str, int | None]], n: int, until: float, seed: int) -> list:
    """``n`` clients sending requests until ``until``; one record per request."""
    import httpx

    records: list = []
    classify_names = [name for name, task in names if task is not None]

    async def client(http: httpx.AsyncClient, rng: random.Random) -> None:
        while time.monotonic() < until:
            if rng.random() < 0.25:
                name, i = GEN, rng.randrange(len(PROBES))
                path, body = (
                    "/v1/completions",
                    {"model": GEN, "prompt": PROBES[i], "max_tokens": 4, "temperature": 0},
                )
            else:
                name, i = rng.choice(classify_names), rng.randrange(len(TEXTS))
                path, body = "/v1/classify", {"model": name, "input": TEXTS[i]}
            sent = time.monotonic()
            try:
                r = await http.post(url + path, json=body)
                status, answer = r.status_code, None
                if status == 200:
                    data = r.json()
                    answer = data["choices"][0]["text"] if name == GEN else data["data"][0]["scores"]
            except httpx.HTTPError as e:
                status, answer = type(e).__name__, None
            records.append((name, i, sent, time.monotonic(), status, answer))

    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as http:
        await asyncio.gather(*(client(http, random.Random(seed + k)) for k in range(n)))
    return records


def start_server(args, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--workdir", str(work), "--port", str(port), "--model", args.model,
           "--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
    return launch(cmd + (["--smoke"] if args.smoke else []), port)


def evaluate(records: list, refs: dict, churn: Churn, tolerance: float) -> dict:
    statuses: Counter = Counter()
    expected_404 = unexpected = wrong = distinct = 0
    latencies = []
    for name, i, sent, done, status, answer in records:
        statuses[str(status)] += 1
        latencies.append((done - sent) * 1000)
        live = churn.live(name, sent, done)
        if status == 200:
            if not any(v is not None and matches(answer, refs[name, v][i], tolerance) for v in live):
                wrong += 1
            # Would an answer from a version that was not live have been caught? (the check's power)
            others = [v for v in range(VERSIONS) if v not in live]
            distinct += bool(others) and not any(matches(answer, refs[name, v][i], tolerance) for v in others)
        elif status == 404 and None in live:
            expected_404 += 1
        else:
            unexpected += 1
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [math.nan] * 99
    out = {"requests": len(records), "ok_requests": statuses.get("200", 0), "expected_404": expected_404,
           "unexpected_errors": unexpected, "wrong_prompt_answers": wrong,
           "p50_ms": statistics.median(latencies) if latencies else math.nan, "p99_ms": q[98],
           "classify_requests": sum(r[0] != GEN for r in records),
           "completion_requests": sum(r[0] == GEN for r in records)}  # fmt: skip
    ok_with_others = sum(
        1 for r in records if r[4] == 200 and len(churn.live(r[0], r[2], r[3]) - {None}) < VERSIONS
    )
    out["stale_version_detectable_frac"] = distinct / max(ok_with_others, 1)
    out["errors_by_status"] = {k: v for k, v in sorted(statuses.items()) if k != "200"}
    out |= {f"errors_status_{k}": v for k, v in out["errors_by_status"].items()}
    for route, mine in (("classify", lambda r: r[0] != GEN), ("completions", lambda r: r[0] == GEN)):
        part = [r for r in records if mine(r)]
        per = evaluate_route(part, refs, churn, tolerance)
        out |= {f"{route}_{k}": v for k, v in per.items()}
    for route, ms in churn.latencies_ms.items():  # the management routes the churn thread calls
        out |= {f"{route}_requests": len(ms), **percentiles(ms, f"{route}_")}
        out[f"{route}_unexpected_errors"] = sum(v for k, v in churn.counts.items() if "_failed_" in k and
                                                (k.startswith("delete") == (route == "delete")))  # fmt: skip
    return out


def percentiles(ms: list[float], prefix: str = "") -> dict:
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else [math.nan] * 99
    return {f"{prefix}p50_ms": statistics.median(ms) if ms else math.nan, f"{prefix}p99_ms": q[98]}


def evaluate_route(records: list, refs: dict, churn: Churn, tolerance: float) -> dict:
    """One route's figures: requests, p50/p99 latency, unexpected errors and wrong-prompt answers."""
    unexpected = wrong = 0
    for name, i, sent, done, status, answer in records:
        live = churn.live(name, sent, done)
        if status == 200:
            wrong += not any(v is not None and matches(answer, refs[name, v][i], tolerance) for v in live)
        elif not (status == 404 and None in live):
            unexpected += 1
    latencies = [(done - sent) * 1000 for _, _, sent, done, _, _ in records]
    return {"requests": len(records), "unexpected_errors": unexpected, "wrong_prompt_answers": wrong,
            **percentiles(latencies)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=300.0, help="Seconds of load.")
    ap.add_argument("--churn-s", type=float, default=1.0, help="Seconds between two store changes.")
    ap.add_argument("--tolerance", type=float, default=1e-4,
                    help="Largest score difference between two answers of one version (batching noise in float32 "
                    "is below 1e-4; use ~1e-2 for bfloat16).")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server.")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="A tiny random model for ~10 s (temporary output).")
    ap.add_argument("--output", default=None, help=f"JSON results (default {RESULTS}; --smoke: a temp file).")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # child process: the server
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args)
        return
    import httpx

    if args.smoke and "--duration" not in sys.argv:
        args.duration = 10.0
    output = args.output or (
        str(Path(tempfile.gettempdir()) / "soak_smoke.json") if args.smoke else str(RESULTS)
    )
    names = prompt_names(args.smoke)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    proc, url = start_server(args, work)
    try:
        # POST .../load and DELETE have no body but, like every POST and DELETE, need a JSON content type
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        http = httpx.Client(base_url=url, timeout=120, headers=headers)
        churn = Churn(http, work, [n for n, _ in names])
        refs = references(http, churn, names)
        gap = separation(refs, names)
        print(f"server up; references recorded; smallest score gap between two versions {gap:.2e} "
              f"(tolerance {args.tolerance:.0e})", flush=True)  # fmt: skip
        rss: list[tuple[float, float]] = []
        stop_rss = threading.Event()

        def sample() -> None:
            while not stop_rss.is_set():
                rss.append((time.monotonic(), rss_mb(proc.pid)))
                stop_rss.wait(2.0)

        sampler, churner = (
            threading.Thread(target=sample),
            threading.Thread(target=churn.run, args=(args.churn_s,)),
        )
        start = time.monotonic()
        sampler.start()
        churner.start()
        records = asyncio.run(clients(url, names, args.clients, start + args.duration, args.seed))
        wall = time.monotonic() - start
        churn.stop.set()
        churner.join()
        stop_rss.set()
        sampler.join()
        health = http.get("/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    out: dict = {"model": "tiny-random-llama" if args.smoke else args.model, "dtype": args.dtype,
                 "device": args.device, "clients": args.clients, "duration_s": round(wall, 1),
                 "churn_every_s": args.churn_s, "versions_per_prompt": VERSIONS, "prompts": len(names)}  # fmt: skip
    out |= evaluate(records, refs, churn, args.tolerance)
    out["requests_per_s"] = out["requests"] / wall
    out |= {f"swaps_{k}": v for k, v in sorted(churn.counts.items())}
    half = [(t, m) for t, m in rss if t >= start + wall / 2]  # after warm-up: a leak shows as a steady climb
    fit = statistics.linear_regression([t for t, _ in half], [m for _, m in half]) if len(half) > 2 else None
    slope = fit.slope * 60 if fit is not None else math.nan
    out |= {"rss_start_mb": rss[0][1], "rss_end_mb": rss[-1][1], "rss_max_mb": max(m for _, m in rss),
            "rss_growth_mb": rss[-1][1] - rss[0][1], "rss_slope_second_half_mb_per_min": slope,
            "score_gap_min": gap, "tolerance": args.tolerance, "failed_prompts_after": len(health["failed"]),
            "server_batches": health["batches"], "command": run_command(), "date": utc_now()}  # fmt: skip
    print(f"{out['requests']} requests in {wall:.0f} s ({out['requests_per_s']:.1f}/s, p50 {out['p50_ms']:.0f} ms, "
          f"p99 {out['p99_ms']:.0f} ms) from {args.clients} clients; swaps: {dict(churn.counts)}")  # fmt: skip
    print(f"errors by status: {out['errors_by_status'] or 'none'} ({out['expected_404']} expected 404s while "
          f"deleted, {out['unexpected_errors']} unexpected); wrong-prompt answers: {out['wrong_prompt_answers']} "
          f"(expected 0; a stale version would have been caught in {out['stale_version_detectable_frac']:.0%} of "
          "answers)")  # fmt: skip
    print(f"server RSS {out['rss_start_mb']:.0f} -> {out['rss_end_mb']:.0f} MiB (max {out['rss_max_mb']:.0f}; "
          f"growth {out['rss_growth_mb']:+.1f} MiB, second half {slope:+.1f} MiB/min)")  # fmt: skip
    for route in ("classify", "completions", "load", "delete"):
        print(f"  {route:<12} {out[f'{route}_requests']:>6} requests, p50 {out[f'{route}_p50_ms']:.0f} ms, "
              f"p99 {out[f'{route}_p99_ms']:.0f} ms, {out[f'{route}_unexpected_errors']} unexpected errors"
              + (f", {out[f'{route}_wrong_prompt_answers']} wrong-prompt answers" if route in ("classify", "completions") else ""))  # fmt: skip
    write_results(output, out)
    if out["wrong_prompt_answers"] or out["unexpected_errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
