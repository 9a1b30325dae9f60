"""An OpenAI-compatible HTTP server for a trained decoder.

    python -m lm.serve --workdir=runs/shakespeare_char --port=8000 [--api_key=secret]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` (a plain "User: ... / Assistant:" template), each with
`"stream": true` for server-sent events. Requests that arrive within `--batch_window_ms`
of each other (and sample alike) are decoded together in one batch with a KV cache.
Bad requests get a 4xx with OpenAI's error body; the server keeps serving the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import threading
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lm import decode
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


class Batcher:
    """A thread that decodes jobs in batches: the first waiting job, plus every job with the
    same sampling settings that arrives within the batch window (up to max_batch)."""

    def __init__(self, loaded: Loaded, limits: Limits):
        self.loaded, self.limits = loaded, limits
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.batches_run = 0
        threading.Thread(target=self._run, daemon=True, name="lm-batcher").start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _gather(self) -> list[Job]:
        batch = [self.jobs.get()]
        deadline = time.monotonic() + self.limits.batch_window_ms / 1000
        held: list[Job] = []
        while len(batch) < self.limits.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                job = self.jobs.get(timeout=timeout)
            except queue.Empty:
                break
            (batch if job.sampling == batch[0].sampling else held).append(job)
        for job in held:  # another sampling setting: the next batch
            self.jobs.put(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            try:
                self._decode(batch)
            except Exception as e:  # noqa: BLE001 (a failed batch must not stop the server)
                for job in batch:
                    job.loop.call_soon_threadsafe(job.out.put_nowait, RequestError(500, f"decoding failed: {e}",
                                                                                   "server_error"))

    def _decode(self, batch: list[Job]) -> None:
        self.batches_run += 1
        loaded = self.loaded
        steps = max(job.max_tokens for job in batch)
        tokens = decode.stream_tokens(loaded.model, loaded.params, [job.prompt_ids for job in batch],
                                      loaded.tokenizer.pad_id, max_new_tokens=steps, sampling=batch[0].sampling,
                                      seed=batch[0].seed, text_vocab_size=loaded.tokenizer.vocab_size)
        for i, token_B in enumerate(tokens):
            for row, job in enumerate(batch):
                if not job.finished and i < job.max_tokens:
                    job.loop.call_soon_threadsafe(job.out.put_nowait, int(token_B[row]))
            if all(job.finished or i + 1 >= job.max_tokens for job in batch):
                break
        for job in batch:
            job.loop.call_soon_threadsafe(job.out.put_nowait, None)


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
        tokenizer, generated, sent, finish = self.loaded.tokenizer, [], "", "length"
        hold = max((len(s) for s in stop), default=1) - 1  # a stop sequence may still be forming
        while True:
            item = await job.out.get()
            if isinstance(item, RequestError):
                raise item
            if item is None:
                break
            if job.finished:
                continue
            if item == tokenizer.eos_id:
                job.finished, finish = True, "stop"
                continue
            generated.append(item)
            text = tokenizer.decode(generated)
            cuts = [text.find(s) for s in stop if s and s in text]
            if cuts:
                text, job.finished, finish = text[:min(cuts)], True, "stop"
            elif len(generated) >= max_tokens:
                job.finished = True
            ready = text if job.finished else text[:max(len(sent), len(text) - hold)]
            if len(ready) > len(sent):
                yield ready[len(sent):], None
                sent = ready
        if len(generated) and not job.finished:
            text = tokenizer.decode(generated)
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
                stop=stop, seed=_number(body, "seed", 0, int), stream=bool(body.get("stream", False)))


def chat_prompt(messages: Any) -> str:
    """A plain template: one "Role: content" line per message, then "Assistant:"."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                            "assistant")
            for m in messages):
        raise RequestError(400, "messages must be a non-empty list of {role: system|user|assistant, content: str}.",
                           param="messages")
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def make_app(loaded: Loaded, limits: Limits, model_name: str, api_key: str | None = None):
    """The FastAPI application serving `loaded` as `model_name`."""
    app = FastAPI(title="lm", docs_url=None, redoc_url=None)
    engine = Engine(loaded, limits)
    app.state.engine = engine
    active = {"requests": 0}

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse(RequestError(401, "Incorrect API key provided.", code="invalid_api_key").body(),
                                    status_code=401)
            if active["requests"] >= limits.max_concurrent:
                return JSONResponse(RequestError(429, f"more than {limits.max_concurrent} requests at once; retry "
                                                      "shortly.", "rate_limit_error").body(), status_code=429)
        active["requests"] += 1
        try:
            return await call_next(request)
        finally:
            active["requests"] -= 1

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
        return {"status": "ok", "model": model_name, "batches_run": engine.batcher.batches_run}

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
