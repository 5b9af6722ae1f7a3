"""The batcher: gathers queued requests into shared batches and runs them in one worker thread.

It waits a few milliseconds after the first request for others to arrive, then runs them together
(torch releases the GIL while it computes, so the event loop keeps accepting requests meanwhile).
Classification requests are scored in one pass per batch. Generation runs step by step
(:func:`softprompt.serving.mixed.generate_mixed_steps`): between two decoding steps of the batches in
progress the worker takes the requests that arrived, so a long or streamed generation does not hold
up the others. A classification is answered within about one decoding step, and a new generation
starts its own batch beside the running ones (their steps alternate), up to
``ServeLimits.max_running_batches``; beyond that, generation requests wait and start together as one
batch when a running one ends. A streamed request receives each row's new text after every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from softprompt.decoding import DecodeStep
from softprompt.errors import UsageError
from softprompt.serving.mixed import Completion, generate_mixed_steps, score_mixed
from softprompt.serving.registry import PromptEntry, PromptStore
from softprompt.serving.settings import ServeLimits

log = logging.getLogger(__name__)

RECENT_S = 1.0  # a batch that ended this recently predicts how many requests come back


# ---------------------------------------------------------------------------- what a request can fail with
# Plain exceptions: the batcher knows nothing of HTTP (serving.http_errors maps them to answers). A
# request also fails with the UsageError of a bad value the model refused (e.g. a logit_bias token).
class QueueFullError(Exception):
    """The queue holds ``ServeLimits.max_queue`` requests; the client should retry shortly."""


class ShuttingDownError(Exception):
    """The batcher stopped (the server is shutting down) before the request was answered."""


class ComputeError(Exception):
    """The model failed on this request (the cause is logged with its traceback, not shown)."""


@dataclass
class Job:
    """One request's rows, waiting for the worker. ``key`` groups jobs that can share a batch.

    A row is a text (its prompt's template is applied) or a list of token ids (used as they are).
    With ``stream``, the worker puts a :class:`StreamText` there for each row's new text, then the
    list of :class:`Completion` (or the exception it failed with) when the request is done.
    """

    key: tuple
    entries: list[PromptEntry]
    texts: list[str | list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    params: dict = field(default_factory=dict)
    stream: asyncio.Queue | None = None
    ids: list[list[int]] | None = None
    """The texts' token ids in their prompts' templates, when the caller already encoded them."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when the client went away: the worker stops generating for it."""
    results: list = field(default_factory=list, repr=False)  # the worker's, while generating
    pending: int = 0
    settled: bool = False


@dataclass
class StreamText:
    """New text of row ``index`` of a streamed request; ``completion`` when the row has ended."""

    index: int
    text: str
    completion: Completion | None = None


class RowText:
    """The text of one streamed row, sent in pieces that never have to be taken back.

    Each piece is the new part of the decoded tokens, less the last ``len(longest stop) - 1``
    characters (they might begin a stop string) and a trailing incomplete character; at the end
    the rest of the row's final text. The pieces add up to the text a request without streaming gets.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        safe = (text[: len(text) - self.hold] if self.hold else text).rstrip("\ufffd")
        return self._send(safe)

    def finish(self, text: str) -> str:
        piece = self._send(text)
        if self.sent != text:  # a tokenizer whose text changed behind what was sent
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent, text)
        return piece

    def _send(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


@dataclass
class Running:
    """A generation batch in progress: its steps, and which request row each batch row is."""

    steps: Iterator[DecodeStep]
    rows: list[tuple[Job, int]]
    prompt_tokens: list[int]
    streams: list[RowText | None]
    logprobs: list[list] | None
    left: int
    started: bool = False


class Batcher:
    """Gathers queued jobs into shared batches and runs them in one worker thread."""

    def __init__(self, store: PromptStore, limits: ServeLimits):
        self.store, self.limits = store, limits
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=limits.max_queue)
        self.stats = {"batches": 0, "rows": 0, "requests": 0}
        self._running: list[Running] = []  # the worker's own: generation batches in progress
        self._waiting: dict[tuple, list[Job]] = {}  # generation jobs waiting for a batch slot, by key
        self._outbox: list[tuple[Job, object]] = []  # stream items of this round, sent together
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        self._stopping.clear()
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is queued or running with :class:`ShuttingDownError` and end the worker after its
        current step; wait at most ``timeout`` seconds for that (the thread is a daemon: it cannot hold
        the process)."""
        self._stopping.set()
        if self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(queue.Full):  # a full queue: the busy worker sees _stopping
                self.queue.put_nowait(None)
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                log.warning("the batcher did not finish its current step within %.1f s; leaving it", timeout)

    def queued(self) -> int:
        """Requests waiting for the worker."""
        return self.queue.qsize()

    def submit(self, key: tuple, entries: list[PromptEntry], texts: list, *, stream: bool = False,
               ids: list[list[int]] | None = None, **params) -> Job:  # fmt: skip
        """Queue a request (:class:`QueueFullError` when the queue is full); with ``stream``, read
        ``job.stream``.
        ``ids``: the texts already encoded, so the worker does not tokenise them again."""
        self.start()
        loop = asyncio.get_running_loop()
        queue_ = asyncio.Queue() if stream else None
        job = Job(key, entries, texts, loop, loop.create_future(), params, queue_, ids)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"the server is busy ({self.limits.max_queue} requests queued); retry shortly"
            ) from None
        return job

    async def run(self, key: tuple, entries: list[PromptEntry], texts: list, **params):
        """Queue a request and wait for its results (one per row)."""
        job = self.submit(key, entries, texts, **params)
        try:
            return await job.future
        except asyncio.CancelledError:  # the client went away: stop working for it
            job.cancelled.set()
            raise

    # ------------------------------------------------------------------ the worker thread
    def _work(self) -> None:
        last_jobs, last_end = 0, float("-inf")
        while True:
            if self._running or self._waiting:  # generations to run: take what has arrived, without waiting
                jobs, stop = self._take_arrived()
            else:
                first = self.queue.get()
                if first is None:
                    return
                jobs, stop = self._gather(first, last_jobs, last_end)
            if jobs:
                groups: dict[tuple, list[Job]] = defaultdict(list)
                for job in jobs:
                    groups[job.key].append(job)
                for key, group in groups.items():
                    if key[0] == "classify":
                        self._run_group(key, group)
                    else:
                        self._waiting.setdefault(key, []).extend(group)
                last_jobs, last_end = len(jobs), time.monotonic()
            self._start_waiting()
            for run in list(self._running):  # one step of each generation batch, in turn
                self._step(run)
            self._flush()
            if stop or self._stopping.is_set():
                gone = ShuttingDownError("the server is shutting down")
                for run in self._running:
                    self._fail(run.rows, gone)
                for group in self._waiting.values():
                    self._fail([(job, 0) for job in group], gone)
                while True:  # and what is still queued
                    try:
                        job = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        self._fail([(job, 0)], gone)
                self._running.clear()
                self._waiting.clear()
                self._flush()
                return

    def _gather(self, first: Job, last_jobs: int, last_end: float) -> tuple[list[Job], bool]:
        """``first`` and the jobs that arrive within the batch window (see :class:`ServeLimits`)."""
        jobs, rows = [first], len(first.texts)
        start = time.monotonic()
        deadline = start + self.limits.batch_window_ms / 1000
        gap = self.limits.batch_gap_ms
        # Clients answered by the last batch (if it just ended) usually send their next request
        # now: keep the batch open for as many, so a late one does not run alone in a batch of 1.
        expect = last_jobs if start - last_end < RECENT_S else 1

        def wait(n_jobs: int) -> float:
            left = deadline - time.monotonic()
            return min(left, gap / 1000) if gap is not None and n_jobs >= expect else left

        return self._fill(jobs, rows, wait)

    def _take_arrived(self) -> tuple[list[Job], bool]:
        """The jobs already queued, without waiting."""
        return self._fill([], 0, lambda n_jobs: 0.0)

    def _fill(self, jobs: list[Job], rows: int, wait) -> tuple[list[Job], bool]:
        """Add queued jobs to ``jobs`` until the batch is full or ``wait(len(jobs))`` seconds pass
        without one; also says whether the queue was closed (a ``None``)."""
        while rows < self.limits.max_batch_size:
            try:
                job = self.queue.get(timeout=max(0.0, wait(len(jobs))))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.texts)
        return jobs, False

    # ------------------------------------------------------------------ classification
    def _run_group(self, key: tuple, jobs: list[Job]) -> None:
        try:
            results = self._compute(key, jobs)
        except Exception as e:
            if len(jobs) == 1:
                _deliver(jobs[0], None, _request_error(e))
                return
            # One bad request must not fail the others: run each alone to find it.
            for job in jobs:
                self._run_group(key, [job])
            return
        self.stats["batches"] += 1
        self.stats["rows"] += sum(len(j.texts) for j in jobs)
        self.stats["requests"] += len(jobs)
        for job, result in zip(jobs, results, strict=True):
            _deliver(job, result, None)

    def _compute(self, key: tuple, jobs: list[Job]) -> list:
        """Class log-scores for every row of ``jobs``, one list per job."""
        entries = [e for j in jobs for e in j.entries]
        texts = [t for j in jobs for t in j.texts]
        ids = [_ids(job, i) for job in jobs for i in range(len(job.texts))]
        flat = score_mixed(self.store, entries, texts, encoded=ids, batch_size=self.limits.max_batch_size)
        out, start = [], 0
        for job in jobs:
            out.append(flat[start : start + len(job.texts)])
            start += len(job.texts)
        return out

    # ------------------------------------------------------------------ generation
    def _start_waiting(self) -> None:
        """Start waiting generation requests (oldest first, one batch per kind) while slots are free."""
        while self._waiting and len(self._running) < self.limits.max_running_batches:
            key = next(iter(self._waiting))
            jobs = [job for job in self._waiting.pop(key) if not job.cancelled.is_set()]
            if jobs:
                self._start_generation(jobs)

    def _start_generation(self, jobs: list[Job]) -> None:
        self.stats["requests"] += len(jobs)
        for job in jobs:
            job.results, job.pending = [None] * len(job.texts), len(job.texts)
        rows = [(job, i) for job in jobs for i in range(len(job.texts))]
        size = self.limits.max_batch_size
        for s in range(0, len(rows), size):
            self._launch(rows[s : s + size])

    def _launch(self, rows: list[tuple[Job, int]]) -> None:
        p = rows[0][0].params  # the same for every job of a batch (its key); the penalties are per row
        try:
            prompt_rows, steps = generate_mixed_steps(
                self.store, [job.entries[i] for job, i in rows], [job.texts[i] for job, i in rows],
                max_new_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                stop=p["stop"], logprobs=p.get("logprobs"), encoded=[_ids(job, i) for job, i in rows],
                logit_bias=[job.params.get("logit_bias") for job, _ in rows],
                presence_penalty=[job.params.get("presence_penalty", 0.0) for job, _ in rows],
                frequency_penalty=[job.params.get("frequency_penalty", 0.0) for job, _ in rows],
            )  # fmt: skip
        except Exception as e:
            self._failed(rows, e, started=False)
            return
        tokenizer = self.store.tokenizer
        streams = [RowText(tokenizer, p["stop"]) if job.stream is not None else None for job, _ in rows]
        logprobs = [[] for _ in rows] if p.get("logprobs") is not None else None
        self._running.append(
            Running(steps, rows, [len(r) for r in prompt_rows], streams, logprobs, len(rows))
        )
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)

    def _step(self, run: Running) -> None:
        if all(job.cancelled.is_set() or job.settled for job, _ in run.rows):
            run.steps.close()  # nobody is waiting for these rows any more
            self._running.remove(run)
            return
        try:
            step = next(run.steps)
        except Exception as e:  # StopIteration cannot happen: the last step ends every row
            self._running.remove(run)
            self._failed(run.rows, e, started=run.started)
            return
        run.started = True
        for b, token in enumerate(step.tokens):
            if token is None:
                continue
            if run.logprobs is not None:
                run.logprobs[b].append(step.logprobs[b])
            job, i = run.rows[b]
            if run.streams[b] is not None and b not in step.ended:
                piece = run.streams[b].add(token)
                if piece:
                    self._outbox.append((job, StreamText(i, piece)))
        for b, end in step.ended.items():
            job, i = run.rows[b]
            scored = None if run.logprobs is None else run.logprobs[b][: len(end.tokens)]
            done = Completion(end.text, end.tokens, end.reason, run.prompt_tokens[b], scored)
            job.results[i] = done
            job.pending -= 1
            if run.streams[b] is not None:
                self._outbox.append((job, StreamText(i, run.streams[b].finish(end.text), done)))
            if job.pending == 0:
                self._settle(job, job.results, None)
            run.left -= 1
        if run.left == 0:
            self._running.remove(run)

    def _failed(self, rows: list[tuple[Job, int]], error: Exception, started: bool) -> None:
        jobs = list({id(job): job for job, _ in rows}.values())
        if not started and len(jobs) > 1:
            # One bad request must not fail the others: start each alone to find it.
            for job in jobs:
                self._launch([(j, i) for j, i in rows if j is job])
            return
        self._fail(rows, _request_error(error))

    def _fail(self, rows: list[tuple[Job, int]], error: Exception) -> None:
        for job, _ in rows:
            self._settle(job, None, error)

    def _settle(self, job: Job, result, error: Exception | None) -> None:
        """Answer a generation job once: its completions, or the error."""
        if job.settled:
            return
        job.settled = True
        if job.stream is not None:
            self._outbox.append((job, error if error is not None else result))
        else:
            _deliver(job, result, error)

    def _flush(self) -> None:
        """Hand this round's stream items to the event loop in one call (one wake-up, not one per row)."""
        if not self._outbox:
            return
        by_loop: dict[int, list[tuple[Job, object]]] = defaultdict(list)
        for job, item in self._outbox:
            by_loop[id(job.loop)].append((job, item))
        self._outbox = []
        for items in by_loop.values():
            with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is gone
                items[0][0].loop.call_soon_threadsafe(_put_all, items)


def _request_error(error: Exception) -> Exception:
    """What a request that raised ``error`` fails with: a :class:`UsageError` (a value the model
    refused) as it is, anything else as a :class:`ComputeError`, logged with its traceback."""
    if isinstance(error, UsageError):
        return error
    log.error("the model failed on a request", exc_info=error)
    return ComputeError("the model failed on this request")


def _ids(job: Job, i: int) -> list[int] | None:
    """Row ``i`` of ``job`` as token ids when the caller encoded it, else None."""
    return None if job.ids is None else job.ids[i]


def _put_all(items: list[tuple[Job, object]]) -> None:
    for job, item in items:
        job.stream.put_nowait(item)


def _deliver(job: Job, result, error: Exception | None) -> None:
    def settle() -> None:
        if job.future.done():  # the client went away and the request was cancelled
            return
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is gone
        job.loop.call_soon_threadsafe(settle)
