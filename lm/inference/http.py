"""The OpenAI-compatible HTTP application (FastAPI) that `lm.serve` runs.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` (a plain "User: ... / Assistant:" template), each with
`"stream": true` for server-sent events; and vLLM's tokenizer endpoints at the root
(`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`), with which the
lm-evaluation-harness (`local-completions`) needs no Hugging Face tokenizer.

Bodies are validated by lm.inference.protocol's models; every failure is a 400 with
OpenAI's error body naming the field, and the server keeps serving the others; a fault of
the server's own is a 500 with the same body, `server_error`. `Guard` checks the API key,
caps requests in flight and body sizes (413); encoding text runs in the threadpool, off
the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lm.errors import UsageError
from lm.inference.engine import Engine, Generation, Limits
from lm.inference.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    RequestError,
    TokenizeRequest,
    unexpected_error,
    validation_error,
)
from lm.inference.responses import Chat, Completion
from lm.inference.sampling import Sampling
from lm.runs.artifacts import Loaded


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The start-up warning for a server anyone on the network may use: `host` not a
    loopback address and no API key. None when there is nothing to warn about."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        loopback = False
    if loopback:
        return None
    return (f"WARNING: serving on {host} with no API key: anyone who can reach this address can use the model. "
            "Fix: pass --api_key=<secret> (or set LM_API_KEY), or listen on --host=127.0.0.1.")


class ListenError(UsageError):
    """A --host and --port the server cannot listen on."""


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to `port` on every address `host` resolves to, as asyncio's
    `create_server` (and so uvicorn) binds them, for `uvicorn.Server.run(sockets=...)`.
    Taken before the model loads, so that a host that does not resolve or a port in use
    fails in a second, not after loading and compiling. Raises ListenError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ListenError(f"--host={host} does not resolve to an address ({reason}). Fix: give an address or name "
                          "of this machine, e.g. --host=127.0.0.1 (this machine only) or --host=0.0.0.0 (every "
                          "interface).") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # a host may list an address twice
            sockets.append(socket.socket(family, kind, proto))
            sockets[-1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio: restart at once
            if family == socket.AF_INET6:
                sockets[-1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sockets[-1].bind(address)
    except OSError as e:
        for s in sockets:
            s.close()
        raise ListenError(f"cannot listen on {host} port {port}: {e.strerror or e}. Fix: choose another --port "
                          "(another server may hold this one), or a --host address of this machine.") from None
    return sockets


class Guard:
    """ASGI middleware on every path but /health: the API key, at most `max_concurrent`
    requests in flight (a streaming one counts until its last event), and request bodies
    of at most `max_request_bytes` (413 otherwise: refused from Content-Length before the
    body is read, or, sent chunked, once more than that has arrived).

    The key is compared in constant time: both sides are hashed to SHA-256 digests and
    compared with `hmac.compare_digest`, so neither how much of a guess matches nor its
    length shows in the time taken. The scheme `Bearer` is matched in any case (RFC 7235,
    2.1); a request with more than one Authorization header is refused. Plain ASGI rather
    than `@app.middleware`, which costs several milliseconds of event-loop time per request."""

    def __init__(self, app, api_key: str | None, max_concurrent: int, max_request_bytes: int = 4 * 2**20):
        self.app, self.max_concurrent, self.max_request_bytes, self.active = app, max_concurrent, max_request_bytes, 0
        self.expected = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether `headers` (ASGI's, names lower-case) carry exactly one `Authorization:
        Bearer <key>` with the server's key."""
        given = [value for name, value in headers if name == b"authorization"]
        scheme, _, token = given[0].strip().partition(b" ") if len(given) == 1 else (b"", b"", b"")
        matches = hmac.compare_digest(hashlib.sha256(token.lstrip(b" ")).digest(), self.expected)
        return matches and scheme.lower() == b"bearer"

    def _too_large(self, size: int | str) -> RequestError:
        return RequestError(413, f"the request body is {size} bytes; this server takes at most "
                                 f"{self.max_request_bytes} (--max_request_bytes).", code="request_too_large")

    async def _capped(self, scope, receive):
        """`receive` for the app, or a RequestError: from Content-Length when given (the
        body unread); a chunked body is read here up to the cap and replayed."""
        headers = dict(scope["headers"])
        if b"content-length" in headers:
            length = headers[b"content-length"]
            if not length.isdigit() or int(length) > self.max_request_bytes:
                return self._too_large(length.decode("latin-1")[:30] if not length.isdigit() else int(length))
            return receive
        if b"transfer-encoding" not in headers:
            return receive  # no body
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return receive  # the client left: the app sees the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_request_bytes:
                return self._too_large(f"more than {self.max_request_bytes}")
        replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replayed():
            nonlocal replay
            if replay is None:
                return await receive()
            message, replay = replay, None
            return message

        return replayed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        error = None
        if self.expected is not None and not self.authorized(scope["headers"]):
            error = RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
        elif self.active >= self.max_concurrent:
            error = RequestError(429, f"more than {self.max_concurrent} requests at once; retry shortly.",
                                 "rate_limit_error")
        if error:
            return await error_response(error)(scope, receive, send)
        self.active += 1  # from here: a chunked body being read counts too
        try:
            capped = await self._capped(scope, receive)
            if isinstance(capped, RequestError):
                return await error_response(capped)(scope, receive, send)
            await self.app(scope, capped, send)
        finally:
            self.active -= 1


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: any str serializes, even one holding a lone
    surrogate (an unknown key named in an error message), which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: RequestError) -> AsciiJSONResponse:
    return AsciiJSONResponse(error.body(), status_code=error.status)


def chat_prompt(messages: list[Message]) -> str:
    """A plain template: one "Role: content" line per message, then "Assistant:" (a
    developer message is a system one)."""
    lines = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        role = "system" if m.role == "developer" else m.role
        lines.append(f"{role.capitalize()}: {content}\n")
    return "".join(lines) + "Assistant:"


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of prompts: a string or a list of ids is one."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise RequestError(400, "prompt is an empty list; give a string, a list of strings, a list of token ids "
                                "or a list of token-id lists.", param="prompt")
    return list(prompt)


def _sampling(body: CompletionRequest | ChatRequest) -> Sampling:
    return Sampling(temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=max(1e-9, 1.0 if body.top_p is None else body.top_p),  # 0: the top token only
                           presence_penalty=body.presence_penalty or 0.0,
                           frequency_penalty=body.frequency_penalty or 0.0)


def _stop(body: CompletionRequest | ChatRequest) -> tuple[str, ...]:
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())


def _seed(body: CompletionRequest | ChatRequest) -> int:
    return secrets.randbits(31) if body.seed is None else body.seed  # no seed: a fresh draw


def _include_usage(body: CompletionRequest | ChatRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


class Handlers:
    """The endpoints of one served model: each method is a FastAPI route (see `make_app`)."""

    def __init__(self, engine: Engine, limits: Limits, model_name: str):
        self.engine, self.limits, self.model_name = engine, limits, model_name
        self.tokenizer = engine.loaded.tokenizer

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(404, f"The model {model!r} does not exist; this server has {self.model_name!r}.",
                               param="model", code="model_not_found")

    async def health(self):
        return {"status": "ok", "model": self.model_name, "steps_run": self.engine.batcher.steps_run}

    async def models(self):
        return {"object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "lm"}]}

    async def tokenizer_info(self):
        # lm-eval reads eos_token and encodes it to find the id; text never encodes to a
        # control id here, so the token has no spelling (null) and its id is given instead.
        tokenizer, context = self.tokenizer, self.engine.context
        return {"eos_token": None, "bos_token": None, "pad_token": None, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id, "bos_token_id": None, "tokenizer_class": f"lm.{tokenizer.kind}",
                "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "model_max_length": context,
                "max_model_len": context}

    # Plain `def`: FastAPI runs these in its threadpool, so a long text does not hold up the
    # event loop (and every other request) while it is encoded or decoded.
    def tokenize(self, body: TokenizeRequest):
        self.check_model(body.model)
        try:
            tokens = self.tokenizer.encode(body.prompt).tolist()
        except ValueError as e:
            raise RequestError(400, f"prompt cannot be encoded by this model's tokenizer: {e}", param="prompt",
                               code="invalid_value") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.engine.context}

    def detokenize(self, body: DetokenizeRequest):
        self.check_model(body.model)
        bad = [i for i in body.tokens if i >= self.tokenizer.vocab_size]
        if bad:
            raise RequestError(400, f"tokens holds token id {bad[0]}, outside the vocabulary "
                                    f"[0, {self.tokenizer.vocab_size}).", param="tokens", code="invalid_value")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def completions(self, body: CompletionRequest):
        self.check_model(body.model)
        engine, prompts = self.engine, _prompts(body.prompt)
        if len(prompts) > self.limits.max_prompts:
            raise RequestError(400, f"the request holds {len(prompts)} prompts; this server takes at most "
                                    f"{self.limits.max_prompts} (--max_prompts).", param="prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        ids = [await run_in_threadpool(engine.prompt_ids, p) for p in prompts]  # encoding is CPU work
        for prompt_ids in ids:
            engine.check_length(prompt_ids, max_tokens)
        bias_V, sampling, stop, seed = engine.bias(body.logit_bias), _sampling(body), _stop(body), _seed(body)
        wants_logprobs = body.logprobs is not None
        runs = [engine.run(Generation(prompt_ids, max_tokens, sampling, bias_V, stop, seed,
                                      score_prompt=bool(body.echo) and wants_logprobs, want_scores=wants_logprobs))
                for prompt_ids in ids]
        echoed = [(p if isinstance(p, str) else self.tokenizer.decode(p)) if body.echo else "" for p in prompts]
        completion = Completion(runs, self.model_name, sum(len(i) for i in ids), echoed, body.logprobs,
                                engine.token_text, _include_usage(body))
        if not body.stream:
            return await completion.body()
        return StreamingResponse(completion.events(), media_type="text/event-stream")

    async def chat_completions(self, body: ChatRequest):
        self.check_model(body.model)
        engine = self.engine
        ids = await run_in_threadpool(engine.prompt_ids, chat_prompt(body.messages), "messages")
        limit = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = limit or min(self.limits.max_tokens, engine.context - len(ids))
        if max_tokens < 1:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) fills the model's context of {engine.context} "
                                    "tokens.", param="messages", code="context_length_exceeded")
        engine.check_length(ids, max_tokens, param)
        run = engine.run(Generation(ids, max_tokens, _sampling(body), engine.bias(body.logit_bias), _stop(body),
                                    _seed(body), score_prompt=False, want_scores=bool(body.logprobs)))
        chat = Chat(run, self.model_name, len(ids), (body.top_logprobs or 0) if body.logprobs else None,
                    engine.token_text, _include_usage(body))
        if not body.stream:
            return await chat.body()
        return StreamingResponse(chat.events(), media_type="text/event-stream")


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error body: a RequestError as it is; pydantic's refusals
    as the 400 `validation_error` makes, naming the field; Starlette's own (404, 405) with
    their status; anything else as a 500 `server_error`."""
    fields_of = {"/v1/completions": COMPLETION_FIELDS, "/v1/chat/completions": CHAT_FIELDS}

    async def request_error(_: Request, e: RequestError):
        return error_response(e)

    async def invalid_request(request: Request, e: RequestValidationError):
        return error_response(validation_error(list(e.errors()), fields_of.get(request.url.path, {}),
                                               getattr(e, "body", None)))

    async def http_error(_: Request, e: HTTPException):
        return error_response(RequestError(e.status_code, str(e.detail), "invalid_request_error"
                                           if e.status_code < 500 else "server_error"))

    async def server_error(_: Request, e: Exception):
        # The safety net: a fault of the server's is a 500 with OpenAI's body, not plain text
        # (Starlette still re-raises it afterwards, so the server's log shows the traceback).
        return error_response(unexpected_error(e))

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


def make_app(loaded: Loaded, limits: Limits, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving `loaded` as `model_name`; `app.state.engine` is its Engine."""
    app = FastAPI(title="lm", docs_url=None, redoc_url=None, default_response_class=AsciiJSONResponse)
    engine = Engine(loaded, limits)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key, max_concurrent=limits.max_concurrent,
                       max_request_bytes=limits.max_request_bytes)
    _add_error_handlers(app)
    handlers = Handlers(engine, limits, model_name)
    app.get("/health")(handlers.health)
    app.get("/v1/models")(handlers.models)
    app.get("/tokenizer_info")(handlers.tokenizer_info)
    app.post("/tokenize")(handlers.tokenize)
    app.post("/detokenize")(handlers.detokenize)
    app.post("/v1/completions")(handlers.completions)
    app.post("/v1/chat/completions")(handlers.chat_completions)
    return app
