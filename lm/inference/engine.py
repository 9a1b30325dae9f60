"""Decoding through the continuous batcher: `Batcher`, a thread that runs `lm.inference.slots` steps
(waiting jobs take free KV-cache rows between steps, finished ones leave theirs; when idle,
the first job waits `batch_window_ms` for others), and `Engine`, which turns a checked
`Generation` into `Piece`s of text with their `Token`s and log-probabilities, holding back
text while a stop sequence may be forming.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from lm.data import tokenizers
from lm.inference import slots
from lm.inference.protocol import RequestError
from lm.inference.sampling import Sampling
from lm.inference.text import encode_prompt
from lm.runs.artifacts import Loaded


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts and how it batches (lm.serve's flags of the same names)."""

    max_prompt_tokens: int
    max_tokens: int
    max_concurrent: int = 64
    max_batch: int = 32
    batch_window_ms: float = 10.0
    max_prompts: int = 32  # prompts one /v1/completions request may carry
    max_request_bytes: int = 4 * 2**20  # a request body's size cap (--max_request_bytes)
    max_tokens_limit: int | None = None  # --max_tokens_limit as given (max_tokens is it capped by the context)


@dataclasses.dataclass
class Job:
    """One prompt to decode. Its `out` queue (asyncio, of the request's event loop) gets
    the prompt's Scores first when `score_prompt`, then one (token, Scores row or None)
    per step, then None (or a RequestError)."""

    prompt_ids: np.ndarray
    max_tokens: int
    sampling: Sampling
    bias_V: np.ndarray
    seed: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    score_prompt: bool = False  # send the prompt tokens' Scores (echo with logprobs)
    want_scores: bool = False  # send each generated token's Scores (logprobs)
    finished: bool = False  # set by the request's side (a stop sequence, <eos>, enough tokens)
    made: int = 0  # tokens sent so far

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for out, item in items:
        out.put_nowait(item)


def _row(scores: slots.Scores, i: int) -> tuple[float, list[int], list[float]]:
    return float(scores.logprob_N[i]), scores.top_ids_NA[i].tolist(), scores.top_logprobs_NA[i].tolist()


class Batcher:
    """A thread that decodes with continuous batching (lm.inference.slots): between steps, waiting
    jobs take free slots and finished jobs leave theirs. When idle, the first job waits
    the batch window for others to start with it."""

    def __init__(self, loaded: Loaded, limits: Limits):
        self.loaded, self.limits = loaded, limits
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.steps_run = 0
        self.running: dict[int, Job] = {}  # slot -> job
        self.slots = slots.empty(loaded.model, limits.max_batch)
        self.lock = threading.Lock()  # the slots are donated to each call: one caller at a time
        threading.Thread(target=self._run, daemon=True, name="lm-batcher").start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def warm_up(self) -> None:
        """Compiles the step and every prompt bucket's prefill before the first request."""
        cfg = self.loaded.model_cfg
        buckets = sorted({slots.bucket(n, cfg.max_len) for n in range(1, cfg.max_len + 1)})
        bias_V = np.zeros((cfg.vocab_size,), np.float32)
        with self.lock:
            for length in buckets:
                self.slots, _ = slots.admit(self.loaded.model, self.loaded.params, self.slots, 0,
                                            np.zeros((1, length), np.int32), 1, 0, Sampling(), bias_V,
                                            self.loaded.tokenizer.vocab_size)
            _, _, self.slots = slots.step(self.loaded.model, self.loaded.params, self.slots,
                                          self.loaded.tokenizer.vocab_size)

    def _take_waiting(self) -> list[Job]:
        """Jobs to start now: all waiting ones (up to the free slots); if nothing runs, the
        first blocks and the batch window collects the rest."""
        free = self.limits.max_batch - len(self.running)
        taken: list[Job] = []
        if not self.running:
            taken.append(self.jobs.get())
            deadline = time.monotonic() + self.limits.batch_window_ms / 1000
            while len(taken) < free and (timeout := deadline - time.monotonic()) > 0:
                try:
                    taken.append(self.jobs.get(timeout=timeout))
                except queue.Empty:
                    break
        while len(taken) < free:
            try:
                taken.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return taken

    def _run(self) -> None:
        while True:
            for job in self._take_waiting():
                self._guarded([job], self._admit, job)
            if self.running:
                self._guarded(list(self.running.values()), self._step)

    def _guarded(self, jobs: list[Job], fn, *args) -> None:
        """Runs fn; if it fails, its jobs get a 500 and leave (the server goes on)."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 (a failed request must not stop the server)
            for job in jobs:
                job.send(RequestError(500, f"decoding failed: {e}", "server_error"))
                self.running = {s: j for s, j in self.running.items() if j is not job}

    def _admit(self, job: Job) -> None:
        slot = min(set(range(self.limits.max_batch)) - set(self.running))
        loaded = self.loaded
        tokens_1P = slots.padded_prompt(job.prompt_ids, loaded.model_cfg.max_len, loaded.tokenizer.pad_id)
        with self.lock:
            self.slots, scores = slots.admit(loaded.model, loaded.params, self.slots, slot, tokens_1P,
                                             len(job.prompt_ids), job.seed % 2**31, job.sampling, job.bias_V,
                                             loaded.tokenizer.vocab_size)
        if job.score_prompt:
            job.send(slots.Scores(*(np.asarray(x)[:len(job.prompt_ids)] for x in scores)))
        if job.max_tokens == 0:  # prompt scoring only: the slot stays free
            job.send(None)
            return
        self.running[slot] = job

    def _step(self) -> None:
        with self.lock:
            token_B, scores, self.slots = slots.step(self.loaded.model, self.loaded.params, self.slots,
                                                     self.loaded.tokenizer.vocab_size)
        token_B = np.asarray(token_B)
        if any(job.want_scores for job in self.running.values()):
            scores = slots.Scores(*(np.asarray(x) for x in scores))
        self.steps_run += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for slot, job in list(self.running.items()):
            token = int(token_B[slot])
            items = by_loop.setdefault(job.loop, [])
            if not job.finished:
                items.append((job.out, (token, _row(scores, slot) if job.want_scores else None)))
            job.made += 1
            if job.finished or job.made >= job.max_tokens or token == self.loaded.tokenizer.eos_id:
                items.append((job.out, None))
                del self.running[slot]
        for loop, items in by_loop.items():  # one wake-up of each event loop per step
            loop.call_soon_threadsafe(_deliver, items)


@dataclasses.dataclass(frozen=True)
class Token:
    """A token of a choice: its id, the model's log-probability of it (None for a prompt's
    first token, which nothing predicts), the TOP_K most likely (id, log p) there, and the
    character offset of its text in the choice's text."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    offset: int


@dataclasses.dataclass(frozen=True)
class Piece:
    """What a choice adds at once: text, the tokens it came from, and at the end a finish reason."""

    text: str
    tokens: list[Token]
    finish: str | None = None
    prompt: bool = False  # the prompt's own tokens (echo with logprobs); text empty


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's decoding settings, checked."""

    ids: np.ndarray
    max_tokens: int
    sampling: Sampling
    bias_V: np.ndarray
    stop: tuple[str, ...]
    seed: int
    score_prompt: bool
    want_scores: bool


class Engine:
    """Turns prompts and settings into text, tokens and log-probabilities, through the batcher."""

    def __init__(self, loaded: Loaded, limits: Limits):
        self.loaded, self.limits = loaded, limits
        self.batcher = Batcher(loaded, limits)
        self._token_text: dict[int, tuple[str, bytes | None]] = {}

    @property
    def context(self) -> int:
        return self.loaded.model_cfg.max_len

    def prompt_ids(self, prompt: str | list[int], param: str = "prompt") -> np.ndarray:
        """A prompt's ids: text encoded (an empty text starts a document: <eos>), or ids
        checked to lie in the vocabulary. CPU work on long text: call it off the event loop.
        Raises RequestError naming `param` (the request field the prompt came from) for
        text the tokenizer cannot encode (its ValueError), ids outside the vocabulary and
        prompts longer than the limit."""
        tokenizer = self.loaded.tokenizer
        if isinstance(prompt, str):
            try:
                ids = encode_prompt(tokenizer, prompt)
            except ValueError as e:  # e.g. a character the vocabulary spells only as a control token
                raise RequestError(400, f"{param} cannot be encoded by this model's tokenizer: {e}", param=param,
                                   code="invalid_value") from None
        else:
            if not prompt:
                raise RequestError(400, f"a token-id {param} must hold at least one id.", param=param)
            bad = [i for i in prompt if not 0 <= i < tokenizer.vocab_size]
            if bad:
                raise RequestError(400, f"{param} holds token id {bad[0]}, outside the vocabulary "
                                        f"[0, {tokenizer.vocab_size}).", param=param, code="invalid_value")
            ids = np.asarray(prompt, np.int32)
        if len(ids) > self.limits.max_prompt_tokens:
            what = "the prompt" if param == "prompt" else f"the prompt rendered from {param}"
            raise RequestError(400, f"{what} has {len(ids)} tokens; this server takes at most "
                                    f"{self.limits.max_prompt_tokens}.", param=param, code="context_length_exceeded")
        return ids

    def check_length(self, ids: np.ndarray, max_tokens: int, param: str = "max_tokens") -> None:
        """Refuses (RequestError naming `param`) a prompt plus max_tokens past the context
        (checked first: it is the cause whatever the server's limit), then max_tokens past
        the server's limit, saying where that limit comes from."""
        if len(ids) + max_tokens > self.context:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) plus {param}={max_tokens} exceeds the "
                                    f"model's context of {self.context} tokens; ask for at most "
                                    f"{max(self.context - len(ids), 0)}.", param=param,
                               code="context_length_exceeded")
        if max_tokens > self.limits.max_tokens:
            flag = "" if self.limits.max_tokens_limit is None else f"={self.limits.max_tokens_limit}"
            raise RequestError(400, f"{param}={max_tokens} is more than this server's limit of "
                                    f"{self.limits.max_tokens}: the smaller of --max_tokens_limit{flag} and the "
                                    f"model's context of {self.context} tokens less one.", param=param,
                               code="invalid_value")

    def bias(self, logit_bias: dict[str, float] | None) -> np.ndarray:
        """OpenAI's logit_bias as float32 [V]. Raises RequestError for ids outside the vocabulary."""
        bias_V = np.zeros((self.loaded.model_cfg.vocab_size,), np.float32)
        for key, value in (logit_bias or {}).items():
            if int(key) >= self.loaded.tokenizer.vocab_size:
                raise RequestError(400, f"logit_bias names token id {key}, outside the vocabulary "
                                        f"[0, {self.loaded.tokenizer.vocab_size}).", param="logit_bias")
            bias_V[int(key)] = value
        return bias_V

    def token_text(self, token: int) -> tuple[str, bytes | None]:
        """How logprobs show a token: (its text, its UTF-8 bytes). A token that is a whole
        text decodes to it; control tokens show as <pad>, <eos>, <unk>; a token that is
        part of a character (a byte) shows as OpenAI does, `bytes:\\xe2`; others as <id:N>."""
        if token not in self._token_text:
            self._token_text[token] = _token_text(self.loaded.tokenizer, token)
        return self._token_text[token]

    async def run(self, generation: Generation) -> AsyncIterator[Piece]:
        """Yields Pieces as text is made (the first one holds the prompt's scored tokens
        when `score_prompt`), the last one with the finish reason ("stop": <eos> or a stop
        sequence; "length"). Text held back while a stop sequence may be forming is sent
        with its tokens once it cannot be; after a stop sequence, the tokens whose text
        starts at or after it are dropped (they are neither returned nor counted)."""
        job = Job(generation.ids, generation.max_tokens, generation.sampling, generation.bias_V, generation.seed,
                  asyncio.get_running_loop(), asyncio.Queue(), generation.score_prompt, generation.want_scores)
        self.batcher.submit(job)
        try:
            async for piece in self._pieces(job, generation):
                yield piece
        finally:  # also when the client goes away: the batcher frees the slot at its next step
            job.finished = True

    async def _pieces(self, job: Job, generation: Generation) -> AsyncIterator[Piece]:
        tokenizer = self.loaded.tokenizer
        stop = generation.stop
        decoder = tokenizers.IncrementalDecoder(tokenizer)
        text, sent, finish, pending = "", 0, "length", []
        hold = max([len(s) - 1 for s in stop if s], default=0)  # a stop sequence may still be forming
        while True:
            item = await job.out.get()
            if isinstance(item, RequestError):
                raise item
            if item is None:
                break
            if isinstance(item, slots.Scores):
                yield Piece("", self._prompt_tokens(generation.ids, item), prompt=True)
                continue
            if job.finished:
                continue
            token, row = item
            logprob, top = (row[0], list(zip(row[1], row[2]))) if row else (None, None)
            pending.append(Token(token, logprob, top, len(text)))
            if token == tokenizer.eos_id:
                job.finished, finish = True, "stop"
            else:
                searched = max(len(text) - hold, 0)  # earlier text was searched for stop sequences already
                text += decoder.push(token)
                if len(decoder.ids) >= generation.max_tokens:
                    text, job.finished = text + decoder.flush(), True
                cuts = [i for i in (text.find(s, searched) for s in stop if s) if i >= 0]
                if cuts:
                    text, job.finished, finish = text[:min(cuts)], True, "stop"
                    pending = [t for t in pending if t.offset < len(text)]
            ready = len(text) if job.finished else max(sent, len(text) - hold)
            tokens = pending if job.finished else [t for t in pending if t.offset < ready]
            if ready > sent or tokens:
                yield Piece(text[sent:ready], tokens)
                sent, pending = ready, pending[len(tokens):]
        if not job.finished:
            text += decoder.flush()
        if len(text) > sent or pending:
            yield Piece(text[sent:], pending)
        yield Piece("", [], finish)

    def _prompt_tokens(self, ids: np.ndarray, scores: slots.Scores) -> list[Token]:
        decoder, offset, out = tokenizers.IncrementalDecoder(self.loaded.tokenizer), 0, []
        for p, token in enumerate(ids.tolist()):
            if p == 0:
                out.append(Token(token, None, None, 0))
            else:
                logprob, top_ids, top_logprobs = _row(scores, p)
                out.append(Token(token, logprob, list(zip(top_ids, top_logprobs)), offset))
            offset += len(decoder.push(token))
        return out


_CONTROL_NAMES = {"eos_id": "<eos>", "pad_id": "<pad>", "unk_id": "<unk>"}  # eos first: pad may share its id


def _token_text(tokenizer, token: int) -> tuple[str, bytes | None]:
    for attribute, name in _CONTROL_NAMES.items():
        if getattr(tokenizer, attribute, None) == token:
            return name, None
    text = tokenizer.decode([token])
    if text and "\ufffd" not in text:
        return text, text.encode("utf-8")
    raw = None
    if tokenizer.kind == "byte":
        raw = bytes([token - tokenizers.NUM_SPECIAL])
    elif tokenizer.kind == "sentencepiece":
        match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", tokenizer.processor.id_to_piece(token))
        raw = bytes([int(match[1], 16)]) if match else None
    if raw is None:
        return f"<id:{token}>", None
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

