"""An OpenAI-compatible HTTP server for a trained decoder.

    python -m lm.serve --workdir=runs/shakespeare_char --port=8000 [--api_key=secret]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` (a plain "User: ... / Assistant:" template), each with
`"stream": true` for server-sent events. Requests that arrive within `--batch_window_ms`
of an idle server start together; later ones join the running batch between steps
(continuous batching over a KV cache, lm.slots).
Bad requests get a 4xx with OpenAI's error body; the server keeps serving the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import secrets
import threading
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lm import decode, slots
from lm.data import tokenizers
from lm.runs import Loaded


@dataclasses.dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_tokens: int
    max_concurrent: int = 64
    max_batch: int = 32
    batch_window_ms: float = 10.0


class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending parameter."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Job:
    """One prompt to decode; tokens go to `out` (an asyncio queue) as they are made, then None."""

    prompt_ids: np.ndarray
    max_tokens: int
    sampling: decode.Sampling
    stop: tuple[str, ...]
    seed: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    finished: bool = False  # set by the request's side (a stop sequence, <eos>, enough tokens)
    made: int = 0  # tokens sent so far

    def send(self, item: int | RequestError | None) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for out, item in items:
        out.put_nowait(item)


class Batcher:
    """A thread that decodes with continuous batching (lm.slots): between steps, waiting
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
        with self.lock:
            for length in buckets:
                self.slots = slots.admit(self.loaded.model, self.loaded.params, self.slots, 0,
                                         np.zeros((1, length), np.int32), 1, 0, decode.Sampling())
            _, self.slots = slots.step(self.loaded.model, self.loaded.params, self.slots,
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
            self.slots = slots.admit(loaded.model, loaded.params, self.slots, slot, tokens_1P, len(job.prompt_ids),
                                     job.seed % 2**31, job.sampling)
        self.running[slot] = job

    def _step(self) -> None:
        with self.lock:
            token_S, self.slots = slots.step(self.loaded.model, self.loaded.params, self.slots,
                                             self.loaded.tokenizer.vocab_size)
        token_S = np.asarray(token_S)
        self.steps_run += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for slot, job in list(self.running.items()):
            token = int(token_S[slot])
            items = by_loop.setdefault(job.loop, [])
            if not job.finished:
                items.append((job.out, token))
            job.made += 1
            if job.finished or job.made >= job.max_tokens or token == self.loaded.tokenizer.eos_id:
                items.append((job.out, None))
                del self.running[slot]
        for loop, items in by_loop.items():  # one wake-up of each event loop per step
            loop.call_soon_threadsafe(_deliver, items)


class Engine:
    """Turns a request's prompt and settings into text, through the batcher."""

    def __init__(self, loaded: Loaded, limits: Limits):
        self.loaded, self.limits = loaded, limits
        self.batcher = Batcher(loaded, limits)

    def encode(self, prompt: str, max_tokens: int) -> np.ndarray:
        ids = self.loaded.tokenizer.encode(prompt) if prompt else np.array([self.loaded.tokenizer.eos_id], np.int32)
        if len(ids) > self.limits.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                    f"{self.limits.max_prompt_tokens}.", param="prompt", code="context_length_exceeded")
        if len(ids) + max_tokens > self.loaded.model_cfg.max_len:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) plus max_tokens={max_tokens} exceeds the "
                                    f"model's context of {self.loaded.model_cfg.max_len} tokens.", param="max_tokens",
                               code="context_length_exceeded")
        return ids

    async def stream(self, ids: np.ndarray, max_tokens: int, sampling: decode.Sampling, stop: tuple[str, ...],
                     seed: int):
        """Yields (text delta, None) as text is made, then ("", finish_reason)."""
        loop = asyncio.get_running_loop()
        job = Job(ids, max_tokens, sampling, stop, seed, loop, asyncio.Queue())
        self.batcher.submit(job)
        decoder = tokenizers.IncrementalDecoder(self.loaded.tokenizer)
        text, sent, finish = "", "", "length"
        hold = max((len(s) for s in stop), default=1) - 1  # a stop sequence may still be forming
        while True:
            item = await job.out.get()
            if isinstance(item, RequestError):
                raise item
            if item is None:
                break
            if job.finished:
                continue
            if item == self.loaded.tokenizer.eos_id:
                job.finished, finish = True, "stop"
                continue
            searched = max(len(text) - hold, 0)  # earlier text was searched for stop sequences already
            text += decoder.push(item)
            if len(decoder.ids) >= max_tokens:
                text, job.finished = text + decoder.flush(), True
            cuts = [i for i in (text.find(s, searched) for s in stop if s) if i >= 0]
            if cuts:
                text, job.finished, finish = text[:min(cuts)], True, "stop"
            ready = text if job.finished else text[:max(len(sent), len(text) - hold)]
            if len(ready) > len(sent):
                yield ready[len(sent):], None
                sent = ready
        if not job.finished:
            text += decoder.flush()
            if len(text) > len(sent):
                yield text[len(sent):], None
        yield "", finish


def _number(body: dict, name: str, default, kind: type, low: float | None = None, high: float | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'}; got {value!r}.",
                           param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"{name}={value} is out of range [{low}, {high}].", param=name)
    return kind(value)


def parse_settings(body: dict, limits: Limits) -> dict:
    """The sampling and length settings of a request body, checked."""
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "stop must be a string or a list of at most 4 strings.", param="stop")
    if _number(body, "n", 1, int, 1, 1) != 1:
        raise RequestError(400, "n must be 1.", param="n")
    temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
    return dict(max_tokens=_number(body, "max_tokens", 16, int, 1, limits.max_tokens),
                sampling=decode.Sampling(
                    temperature=temperature, top_p=_number(body, "top_p", 1.0, float, 1e-9, 1.0),
                    repetition_penalty=1.0 + _number(body, "presence_penalty", 0.0, float, 0.0, 2.0)),
                stop=stop, seed=_number(body, "seed", secrets.randbits(31), int),  # no seed: a fresh draw
                stream=bool(body.get("stream", False)))


def chat_prompt(messages: Any) -> str:
    """A plain template: one "Role: content" line per message, then "Assistant:"."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                            "assistant")
            for m in messages):
        raise RequestError(400, "messages must be a non-empty list of {role: system|user|assistant, content: str}.",
                           param="messages")
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


class Guard:
    """ASGI middleware on /v1/: the API key, and at most `max_concurrent` requests in
    flight (a streaming one counts until its last event). Plain ASGI rather than
    `@app.middleware`, which costs several milliseconds of event-loop time per request."""

    def __init__(self, app, api_key: str | None, max_concurrent: int):
        self.app, self.api_key, self.max_concurrent, self.active = app, api_key, max_concurrent, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        error = None
        if self.api_key and dict(scope["headers"]).get(b"authorization") != f"Bearer {self.api_key}".encode():
            error = RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
        elif self.active >= self.max_concurrent:
            error = RequestError(429, f"more than {self.max_concurrent} requests at once; retry shortly.",
                                 "rate_limit_error")
        if error:
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def make_app(loaded: Loaded, limits: Limits, model_name: str, api_key: str | None = None):
    """The FastAPI application serving `loaded` as `model_name`."""
    app = FastAPI(title="lm", docs_url=None, redoc_url=None)
    engine = Engine(loaded, limits)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key, max_concurrent=limits.max_concurrent)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e}).")
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object.")
        if body.get("model") != model_name:
            raise RequestError(404, f"The model {body.get('model')!r} does not exist; this server has "
                                    f"{model_name!r}.", param="model", code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "steps_run": engine.batcher.steps_run}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lm"}]}

    async def respond(prompt: str, settings: dict, chat: bool):
        ids = engine.encode(prompt, settings["max_tokens"])
        stream = engine.stream(ids, settings["max_tokens"], settings["sampling"], settings["stop"], settings["seed"])
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            if settings["stream"]:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        if not settings["stream"]:
            pieces, finish = [], "length"
            async for delta, reason in stream:
                pieces.append(delta)
                finish = reason or finish
            text = "".join(pieces)
            completion_tokens = len(loaded.tokenizer.encode(text))
            return {"id": ident, "object": kind, "created": created, "model": model_name,
                    "choices": [choice(text, finish)],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                              "total_tokens": len(ids) + completion_tokens}}

        async def events():
            first = True
            async for delta, reason in stream:
                chunk = {"id": ident, "object": kind + (".chunk" if chat else ""), "created": created,
                         "model": model_name, "choices": [choice(delta, reason, first)]}
                first = False
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt must be a string (or a list of one string).", param="prompt")
        return await respond(prompt, parse_settings(body, limits), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        return await respond(chat_prompt(body.get("messages")), parse_settings(body, limits), chat=True)

    return app


def main(argv: list[str]) -> None:
    import os

    import uvicorn
    from absl import flags

    from lm import runs, runtime
    from lm.cli import exit_with_error, quiet_logging, reject_positional
    from lm.config import ConfigError

    reject_positional(argv)
    quiet_logging()
    f = flags.FLAGS
    if not f.workdir:
        exit_with_error("--workdir is required, e.g. --workdir=runs/shakespeare_char")
    runtime.enable_compilation_cache()
    try:
        loaded = runs.load(f.workdir)
    except ConfigError as e:
        exit_with_error(str(e))
    if loaded.model_cfg.family != "decoder":
        exit_with_error(f"{f.workdir} holds a {loaded.model_cfg.family!r} model; the server decodes with a decoder.")
    context = loaded.model_cfg.max_len
    limits = Limits(max_prompt_tokens=min(f.max_prompt_tokens or context - 1, context - 1),
                    max_tokens=min(f.max_tokens_limit, context - 1), max_concurrent=f.max_concurrent,
                    max_batch=f.max_batch, batch_window_ms=f.batch_window_ms)
    name = f.model_name or os.path.basename(os.path.normpath(f.workdir))
    app = make_app(loaded, limits, name, f.api_key or os.environ.get("LM_API_KEY"))
    start = time.monotonic()
    app.state.engine.batcher.warm_up()
    print(f"compiled the decoding programs in {time.monotonic() - start:.1f} s", flush=True)
    print(f"serving {name} on http://{f.host}:{f.port}/v1 (context {context} tokens)", flush=True)
    uvicorn.run(app, host=f.host, port=f.port, log_level="warning")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "A run's workdir or an export.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("model_name", None, "The model id clients ask for; default the workdir's name.")
    flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer <key>` (or set LM_API_KEY).")
    flags.DEFINE_integer("max_prompt_tokens", 0, "Longest prompt accepted; 0: the context minus one.")
    flags.DEFINE_integer("max_tokens_limit", 256, "Largest max_tokens accepted.")
    flags.DEFINE_integer("max_concurrent", 64, "Requests in flight before 429s.")
    flags.DEFINE_integer("max_batch", 32, "Most requests decoded together.")
    flags.DEFINE_float("batch_window_ms", 10.0, "How long the first request waits for others to batch with.")


if __name__ == "__main__":
    from absl import app as absl_app

    _define_flags()
    absl_app.run(main)
