"""An OpenAI-compatible HTTP server for a trained decoder.

    python -m lm.serve --workdir=runs/shakespeare_char --port=8000 [--api_key=secret]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions` (a plain "User: ... / Assistant:" template), each with
`"stream": true` for server-sent events; and vLLM's tokenizer endpoints at the root
(`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`), with which the
lm-evaluation-harness (`local-completions`) needs no Hugging Face tokenizer.

Every request field of the `openai` client's request types is in `COMPLETION_FIELDS` or
`CHAT_FIELDS`: implemented with OpenAI's semantics, accepted where its value changes
nothing (n=1, store=false, ...) or by OpenAI's own definition does not change the output
(user, metadata, ...), or refused. Bodies are validated by the pydantic models below
(unknown keys and wrong types refused); every failure is a 400 with OpenAI's error body
naming the field (`param`; the message names the key path inside it), and the server
keeps serving the others. Every text field is a `Text` (valid Unicode: no lone
surrogates); a fault of the server's own is a 500 with the same body, `server_error`.
Request bodies are capped (--max_request_bytes, 413), and encoding text runs in the
threadpool, off the event loop.

Requests that arrive within `--batch_window_ms` of an idle server start together; later
ones join the running batch between steps (continuous batching over a KV cache, lm.slots).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import queue
import re
import secrets
import threading
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

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
    max_prompts: int = 32  # prompts one /v1/completions request may carry
    max_request_bytes: int = 4 * 2**20  # a request body's size cap (--max_request_bytes)
    max_tokens_limit: int | None = None  # --max_tokens_limit as given (max_tokens is it capped by the context)


class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending parameter."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- The request schema ---------------------------------------------------------------
#
# One table per endpoint: every key of the pinned `openai` client's request TypedDict
# (plus `stream`), its status here and what it accepts. A test checks that the tables
# cover the installed client's keys and match the pydantic models field for field.

IMPLEMENTED = "implemented"  # OpenAI's semantics
NO_OP = "no-op values accepted"  # the values that change nothing; others refused
NEUTRAL = "accepted, does not change the output"  # by OpenAI's own definition; ignored
REFUSED = "refused"  # only null (or absent) accepted

_SHARED_FIELDS = {
    "model": (IMPLEMENTED, "the served model's id (another id: 404 model_not_found)"),
    "frequency_penalty": (IMPLEMENTED, "a number in [-2, 2], subtracted from a token's logit once per time it "
                                       "was generated (prompt tokens do not count)"),
    "presence_penalty": (IMPLEMENTED, "a number in [-2, 2], subtracted from the logit of every token generated "
                                      "at least once (prompt tokens do not count)"),
    "logit_bias": (IMPLEMENTED, "an object {token id: bias in [-100, 100]}, added to those logits before "
                                "sampling (not to the reported logprobs)"),
    "n": (NO_OP, "1 (one choice per prompt)"),
    "seed": (IMPLEMENTED, "an integer; the same seed gives the same text however requests are batched"),
    "stop": (IMPLEMENTED, "a non-empty string or a list of at most 4 non-empty strings; the text ends before the "
                          "first match (an empty string would match everywhere: refused)"),
    "stream": (IMPLEMENTED, "a boolean: server-sent events"),
    "stream_options": (IMPLEMENTED, "with stream only: {include_usage: bool (a last chunk with usage and no "
                                    "choices), include_obfuscation: bool (no-op: no padding field is sent)}"),
    "temperature": (IMPLEMENTED, "a number in [0, 2]; 0 is greedy"),
    "top_p": (IMPLEMENTED, "a number in [0, 1] (nucleus sampling; 0 keeps the most likely token)"),
    "user": (NEUTRAL, "a string (an end-user id for abuse monitoring)"),
}

COMPLETION_FIELDS: dict[str, tuple[str, str]] = {
    **_SHARED_FIELDS,
    "prompt": (IMPLEMENTED, "a string, a list of strings, a list of token ids, or a list of token-id lists; "
                            "one choice per prompt, `index` its position"),
    "best_of": (NO_OP, "1 (one candidate per prompt)"),
    "echo": (IMPLEMENTED, "a boolean: the prompt's text (and with logprobs its tokens) precede the completion"),
    "logprobs": (IMPLEMENTED, "an integer in [0, 5]: per token its text, log-probability, that many most likely "
                              "alternatives and its text offset"),
    "max_tokens": (IMPLEMENTED, "an integer from 1 (0 with echo: score the prompt only) to --max_tokens_limit; "
                                "prompt plus max_tokens must fit the context. Default 16"),
    "suffix": (REFUSED, "null: inserting between a prompt and a suffix is not supported"),
}

CHAT_FIELDS: dict[str, tuple[str, str]] = {
    **_SHARED_FIELDS,
    "messages": (IMPLEMENTED, "a non-empty list of {role: system|developer|user|assistant, content: a string or "
                              "a list of {type: text, text}}, rendered one 'Role: content' line each, then "
                              "'Assistant:'"),
    "logprobs": (IMPLEMENTED, "a boolean: each output token's log-probability, bytes and top_logprobs"),
    "top_logprobs": (IMPLEMENTED, "an integer in [0, 20], with logprobs: true"),
    "max_completion_tokens": (IMPLEMENTED, "an integer from 1 to --max_tokens_limit (wins over max_tokens)"),
    "max_tokens": (IMPLEMENTED, "an integer from 1 to --max_tokens_limit. Default: as many as fit the context, "
                                "at most --max_tokens_limit"),
    "audio": (REFUSED, "null: no audio output"),
    "function_call": (NO_OP, "'none' (no functions)"),
    "functions": (REFUSED, "null: no function calling"),
    "metadata": (NEUTRAL, "an object of strings (stored-completion tags)"),
    "modalities": (NO_OP, "['text']"),
    "moderation": (REFUSED, "null: no moderation model"),
    "parallel_tool_calls": (REFUSED, "null: no tools"),
    "prediction": (REFUSED, "null: no predicted outputs"),
    "prompt_cache_key": (NEUTRAL, "a string (a cache-routing hint)"),
    "prompt_cache_options": (NEUTRAL, "{mode: implicit|explicit, ttl: 30m} (a caching hint)"),
    "prompt_cache_retention": (NEUTRAL, "'in_memory' or '24h' (a caching hint)"),
    "reasoning_effort": (REFUSED, "null: not a reasoning model"),
    "response_format": (NO_OP, "{type: text}; JSON modes are not supported"),
    "safety_identifier": (NEUTRAL, "a string (an end-user id for abuse monitoring)"),
    "service_tier": (NEUTRAL, "auto|default|flex|scale|priority|fast (a processing tier)"),
    "store": (NO_OP, "false (completions are not stored)"),
    "tool_choice": (NO_OP, "'none' (no tools)"),
    "tools": (REFUSED, "null: no tool calling"),
    "verbosity": (REFUSED, "null: no verbosity control"),
    "web_search_options": (REFUSED, "null: no web search"),
}


def _only(value: Any):
    """A validator accepting just `value` (strict types rule out 0 for false and the like)."""

    def check(given):
        if given != value:
            raise PydanticCustomError("unsupported_value", f"only {json.dumps(value)} is supported")
        return given

    return AfterValidator(check)


def _valid_unicode(text: str) -> str:
    """`text` if it is valid Unicode. JSON's `\\ud800` escapes can spell lone surrogates,
    which no tokenizer can encode (UTF-8 has no form for them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "invalid_unicode", f"text must be valid Unicode: character {e.start} is a lone surrogate "
                               f"(\\u{ord(text[e.start]):04x}); a character outside the Basic Multilingual Plane is "
                               "sent as a high-low surrogate pair or as itself") from None
    return text


# Every text a request carries is this type (a test checks that no model has a bare str).
Text = Annotated[str, AfterValidator(_valid_unicode)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_valid_unicode)]


def _needs(param: str, message: str) -> PydanticCustomError:
    """A whole-request check's failure, naming the field it is about."""
    return PydanticCustomError("field_dependency", message, {"param": param})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Penalty = Annotated[float, Field(ge=-2, le=2)]
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None


class _Request(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: Text
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    # ASCII digits (\\d would take other scripts' digits), few enough for int() (it refuses
    # more than 4300) and for any vocabulary; an id past the vocabulary is refused later.
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    seed: int | None = None
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=4)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    user: Text | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _needs("stream_options", "stream_options is only allowed when stream is true")
        return self


class CompletionRequest(_Request):
    """A /v1/completions body (see COMPLETION_FIELDS)."""

    prompt: Union[Text, list[Text], list[TokenId], list[list[TokenId]]]
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None
    echo: StrictBool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _zero_tokens_need_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise _needs("max_tokens", "max_tokens=0 is only allowed with echo: true (scoring the prompt)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: None = None  # a participant's name would need a template that shows it


class ResponseFormatText(_Strict):
    type: Literal["text"]


class PromptCacheOptions(_Strict):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class ChatRequest(_Request):
    """A /v1/chat/completions body (see CHAT_FIELDS)."""

    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=slots.TOP_K)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    audio: None = None
    function_call: Literal["none"] | None = None
    functions: None = None
    metadata: dict[Text, Text] | None = None
    modalities: list[Literal["text"]] | None = None
    moderation: None = None
    parallel_tool_calls: None = None
    prediction: None = None
    prompt_cache_key: Text | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    reasoning_effort: None = None
    response_format: ResponseFormatText | None = None
    safety_identifier: Text | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    store: Annotated[StrictBool, _only(False)] | None = None
    tool_choice: Literal["none"] | None = None
    tools: None = None
    verbosity: None = None
    web_search_options: None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _needs("top_logprobs", "top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(_Strict):
    """vLLM's /tokenize body. lm adds no special tokens to text, so add_special_tokens adds nothing."""

    prompt: Text
    add_special_tokens: StrictBool | None = None
    model: Text | None = None


class DetokenizeRequest(_Strict):
    tokens: list[TokenId]
    model: Text | None = None


def validation_error(errors: list[dict], fields: dict[str, tuple[str, str]], body: Any = None) -> RequestError:
    """OpenAI's 400 for the most relevant of pydantic's `errors` on the request `body`
    (see `_relevance`): `param` the top-level field; the message names the offending key
    path inside it (`messages[0].tool_calls`), says what was wrong and what the field accepts."""
    error = max(errors, key=lambda e: _relevance(e, body))  # the first of the most relevant
    loc = list(error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"])
    kind, given = error["type"], error.get("input")
    if kind == "json_invalid":
        return RequestError(400, f"the request body is not valid JSON ({error.get('ctx', {}).get('error', '')}).")
    if kind == "field_dependency":  # a whole-request check: its loc is the body, its ctx names the field
        return RequestError(400, f"{error['msg']}.", param=error["ctx"]["param"], code="invalid_value")
    if kind == "string_unicode" and not loc:  # pydantic-core gives no location for a key that is not Unicode
        if loc := _invalid_key(body):
            return RequestError(400, f"Unrecognized request argument supplied: {_key_path(loc)} (not valid "
                                     "Unicode: it holds a lone surrogate)", param=str(loc[0]),
                                code="unknown_parameter")
        return RequestError(400, f"the request body is not valid: {error['msg']}.")
    if not loc or isinstance(given, (bytes, bytearray)):
        if kind == "missing" or isinstance(given, (bytes, bytearray)):
            return RequestError(400, "the request needs a JSON object body sent with "
                                     "`Content-Type: application/json`.")
        return RequestError(400, "the request body must be a JSON object.")
    param = str(loc[0])
    path = _key_path(_input_loc(loc, body, kind))
    if kind == "extra_forbidden":
        return RequestError(400, f"Unrecognized request argument supplied: {path}", param=param,
                            code="unknown_parameter")
    status, accepts = fields.get(param, ("", ""))
    if status == REFUSED:
        return RequestError(400, f"{param} is not supported by this server ({accepts}).", param=param,
                            code="unsupported_parameter")
    if kind == "missing":
        return RequestError(400, f"'{path}' is required.", param=param, code="missing_required_parameter")
    shown = json.dumps(given)[:200] if _jsonable(given) else repr(given)[:200]
    hint = f" {param} accepts {accepts}." if accepts else ""
    return RequestError(400, f"Invalid value for '{path}': {shown} ({error['msg']}).{hint}", param=param,
                        code="invalid_value")


def _input_loc(loc: list, body: Any, kind: str) -> list:
    """The parts of a pydantic error location that index into the request body: keys and
    list positions, without the tags pydantic adds for union members ('str',
    'list[TextPart]') or dict keys ('[key]'). A missing key keeps its name."""
    kept, value = [], body
    for i, part in enumerate(loc):
        if isinstance(value, dict) and isinstance(part, str) and part in value:
            value = value[part]
        elif isinstance(value, list) and type(part) is int and 0 <= part < len(value):
            value = value[part]
        elif not (kind == "missing" and i == len(loc) - 1):
            continue
        kept.append(part)
    return kept or loc[:1]


def _invalid_key(value: Any) -> list:
    """The location of the first object key in `value` that is not valid Unicode, or []."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and not key.isascii():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                return [key]
        if inner := _invalid_key(item):
            return [key, *inner]
    return []


def _key_path(parts: list) -> str:
    """['messages', 0, 'content'] -> 'messages[0].content' (a key past 40 characters cut to them and '...')."""
    shown = [p if type(p) is int or len(str(p)) <= 40 else f"{str(p)[:40]}..." for p in parts]
    return "".join(f"[{p}]" if type(p) is int else (f".{p}" if i else str(p)) for i, p in enumerate(shown))


def _relevance(error: dict, body: Any) -> tuple:
    """How well an error explains a refusal, for choosing one to report: an unknown key
    first (it is the fault whatever else is said about its object), then the error
    deepest in the input (the union member that matched the input furthest), then a
    value's error over a type mismatch (`prompt: [-1]` fails as a string, as a list of
    strings and as a list of ids; the id's range is the one to name)."""
    loc = list(error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"])
    return (error["type"] == "extra_forbidden", len(_input_loc(loc, body, error["type"])),
            not error["type"].endswith("_type"))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# --- Decoding through the continuous batcher -----------------------------------------


@dataclasses.dataclass
class Job:
    """One prompt to decode. Its `out` queue (asyncio, of the request's event loop) gets
    the prompt's Scores first when `score_prompt`, then one (token, Scores row or None)
    per step, then None (or a RequestError)."""

    prompt_ids: np.ndarray
    max_tokens: int
    sampling: decode.Sampling
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
    return float(scores.logprob_N[i]), scores.top_ids_NK[i].tolist(), scores.top_logprobs_NK[i].tolist()


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
        bias_V = np.zeros((cfg.vocab_size,), np.float32)
        with self.lock:
            for length in buckets:
                self.slots, _ = slots.admit(self.loaded.model, self.loaded.params, self.slots, 0,
                                            np.zeros((1, length), np.int32), 1, 0, decode.Sampling(), bias_V,
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
            token_S, scores, self.slots = slots.step(self.loaded.model, self.loaded.params, self.slots,
                                                     self.loaded.tokenizer.vocab_size)
        token_S = np.asarray(token_S)
        if any(job.want_scores for job in self.running.values()):
            scores = slots.Scores(*(np.asarray(x) for x in scores))
        self.steps_run += 1
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for slot, job in list(self.running.items()):
            token = int(token_S[slot])
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
    sampling: decode.Sampling
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
                ids = tokenizer.encode(prompt) if prompt else np.array([tokenizer.eos_id], np.int32)
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


def _sampling(body: _Request) -> decode.Sampling:
    return decode.Sampling(temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=max(1e-9, 1.0 if body.top_p is None else body.top_p),  # 0: the top token only
                           presence_penalty=body.presence_penalty or 0.0,
                           frequency_penalty=body.frequency_penalty or 0.0)


def _stop(body: _Request) -> tuple[str, ...]:
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())


def make_app(loaded: Loaded, limits: Limits, model_name: str, api_key: str | None = None):
    """The FastAPI application serving `loaded` as `model_name`."""
    app = FastAPI(title="lm", docs_url=None, redoc_url=None, default_response_class=AsciiJSONResponse)
    engine = Engine(loaded, limits)
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key, max_concurrent=limits.max_concurrent,
                       max_request_bytes=limits.max_request_bytes)
    tokenizer = loaded.tokenizer
    fields_of = {"/v1/completions": COMPLETION_FIELDS, "/v1/chat/completions": CHAT_FIELDS}

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        return error_response(validation_error(list(e.errors()), fields_of.get(request.url.path, {}),
                                               getattr(e, "body", None)))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        return error_response(RequestError(e.status_code, str(e.detail), "invalid_request_error"
                                           if e.status_code < 500 else "server_error"))

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception):
        # The safety net: a fault of the server's is a 500 with OpenAI's body, not plain text
        # (Starlette still re-raises it afterwards, so the server's log shows the traceback).
        return error_response(unexpected_error(e))

    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise RequestError(404, f"The model {model!r} does not exist; this server has {model_name!r}.",
                               param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "steps_run": engine.batcher.steps_run}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lm"}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        # lm-eval reads eos_token and encodes it to find the id; text never encodes to a
        # control id here, so the token has no spelling (null) and its id is given instead.
        return {"eos_token": None, "bos_token": None, "pad_token": None, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id, "bos_token_id": None, "tokenizer_class": f"lm.{tokenizer.kind}",
                "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "model_max_length": engine.context,
                "max_model_len": engine.context}

    # Plain `def`: FastAPI runs these in its threadpool, so a long text does not hold up the
    # event loop (and every other request) while it is encoded or decoded.
    @app.post("/tokenize")
    def tokenize(body: TokenizeRequest):
        check_model(body.model)
        try:
            tokens = tokenizer.encode(body.prompt).tolist()
        except ValueError as e:
            raise RequestError(400, f"prompt cannot be encoded by this model's tokenizer: {e}", param="prompt",
                               code="invalid_value") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        bad = [i for i in body.tokens if i >= tokenizer.vocab_size]
        if bad:
            raise RequestError(400, f"tokens holds token id {bad[0]}, outside the vocabulary "
                                    f"[0, {tokenizer.vocab_size}).", param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(body.tokens)}

    def response_head(chat: bool, stream: bool) -> dict:
        kind = "chat.completion" if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": kind + (".chunk" if chat and stream else ""), "created": int(time.time()),
                "model": model_name}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def completion_logprobs(tokens: list[Token], k: int, base: int) -> dict:
        """OpenAI's completions logprobs: parallel lists over `tokens` (offsets shifted by `base`)."""
        text = lambda i: engine.token_text(i)[0]
        return {"tokens": [text(t.id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [None if t.top is None else _top_dict(t.top[:k], text) for t in tokens],
                "text_offset": [base + t.offset for t in tokens]}

    def chat_logprobs(tokens: list[Token], k: int) -> dict:
        def entry(token: int, logprob: float) -> dict:
            text, raw = engine.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": None if raw is None else list(raw)}

        return {"content": [entry(t.id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top[:k]]}
                            for t in tokens], "refusal": None}

    async def merged(runs: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) from several runs as they come."""
        pieces: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, run: AsyncIterator[Piece]):
            try:
                async for piece in run:
                    await pieces.put((index, piece))
            except Exception as e:  # noqa: BLE001 (raised again below, in the request's own task)
                await pieces.put((index, e))
            await pieces.put((index, None))

        tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
        try:
            done = 0
            while done < len(runs):
                index, piece = await pieces.get()
                if isinstance(piece, Exception):
                    raise piece
                if piece is None:
                    done += 1
                else:
                    yield index, piece
        finally:
            for task in tasks:
                task.cancel()

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        prompts = _prompts(body.prompt)
        if len(prompts) > limits.max_prompts:
            raise RequestError(400, f"the request holds {len(prompts)} prompts; this server takes at most "
                                    f"{limits.max_prompts} (--max_prompts).", param="prompt")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        ids = [await run_in_threadpool(engine.prompt_ids, p) for p in prompts]  # encoding is CPU work
        for prompt_ids in ids:
            engine.check_length(prompt_ids, max_tokens)
        bias_V, sampling, stop = engine.bias(body.logit_bias), _sampling(body), _stop(body)
        seed = secrets.randbits(31) if body.seed is None else body.seed  # no seed: a fresh draw
        wants_logprobs = body.logprobs is not None
        runs = [engine.run(Generation(prompt_ids, max_tokens, sampling, bias_V, stop, seed,
                                      score_prompt=bool(body.echo) and wants_logprobs, want_scores=wants_logprobs))
                for prompt_ids in ids]
        echoed = [(p if isinstance(p, str) else tokenizer.decode(p)) if body.echo else "" for p in prompts]
        k = body.logprobs or 0
        prompt_tokens = sum(len(i) for i in ids)

        def logprobs_of(index: int, pieces: list[Piece]) -> dict | None:
            """Completions logprobs of a choice's pieces: prompt tokens at their own offsets,
            generated ones after the echoed text."""
            if not wants_logprobs or not any(p.tokens for p in pieces):
                return None
            parts = [completion_logprobs(p.tokens, k, 0 if p.prompt else len(echoed[index])) for p in pieces]
            return {key: [x for part in parts for x in part[key]] for key in ("tokens", "token_logprobs",
                                                                               "top_logprobs", "text_offset")}

        if not body.stream:
            async def collect(run):
                return [piece async for piece in run]

            results = await asyncio.gather(*(collect(run) for run in runs))
            choices = [{"index": index, "text": echoed[index] + "".join(p.text for p in pieces),
                        "finish_reason": pieces[-1].finish, "logprobs": logprobs_of(index, pieces)}
                       for index, pieces in enumerate(results)]
            completion_tokens = sum(len(p.tokens) for pieces in results for p in pieces if not p.prompt)
            return {**response_head(False, False), "choices": choices,
                    "usage": usage(prompt_tokens, completion_tokens)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = response_head(False, True)

        async def events():
            completion_tokens, echo_sent = 0, set()
            chunk = lambda choice: {**head, "choices": [choice]} | ({"usage": None} if include_usage else {})
            try:
                async for index, piece in merged(runs):
                    text = piece.text
                    if body.echo and index not in echo_sent:  # the echoed prompt comes first
                        echo_sent.add(index)
                        text = echoed[index] + text
                    completion_tokens += 0 if piece.prompt else len(piece.tokens)
                    yield sse(chunk({"index": index, "text": text, "finish_reason": piece.finish,
                                     "logprobs": logprobs_of(index, [piece])}))
            except Exception as e:  # noqa: BLE001 (the status is sent: the error goes in the stream)
                yield sse((e if isinstance(e, RequestError) else unexpected_error(e)).body())
                return
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
        ids = await run_in_threadpool(engine.prompt_ids, chat_prompt(body.messages), "messages")
        limit = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = limit or min(limits.max_tokens, engine.context - len(ids))
        if max_tokens < 1:
            raise RequestError(400, f"the prompt ({len(ids)} tokens) fills the model's context of {engine.context} "
                                    "tokens.", param="messages", code="context_length_exceeded")
        engine.check_length(ids, max_tokens, param)
        seed = secrets.randbits(31) if body.seed is None else body.seed
        run = engine.run(Generation(ids, max_tokens, _sampling(body), engine.bias(body.logit_bias), _stop(body), seed,
                                    score_prompt=False, want_scores=bool(body.logprobs)))
        k = body.top_logprobs or 0
        if not body.stream:
            pieces = [piece async for piece in run]
            tokens = [t for piece in pieces for t in piece.tokens]
            message = {"role": "assistant", "content": "".join(p.text for p in pieces), "refusal": None}
            return {**response_head(True, False),
                    "choices": [{"index": 0, "message": message, "finish_reason": pieces[-1].finish,
                                 "logprobs": chat_logprobs(tokens, k) if body.logprobs else None}],
                    "usage": usage(len(ids), len(tokens))}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = response_head(True, True)

        async def events():
            chunk = lambda choice: {**head, "choices": [choice]} | ({"usage": None} if include_usage else {})
            yield sse(chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}))
            completion_tokens = 0
            try:
                async for piece in run:
                    completion_tokens += len(piece.tokens)
                    delta = {"content": piece.text} if piece.text else {}
                    logprobs = chat_logprobs(piece.tokens, k) if body.logprobs and piece.tokens else None
                    if delta or logprobs or piece.finish:
                        yield sse(chunk({"index": 0, "delta": delta, "finish_reason": piece.finish,
                                         "logprobs": logprobs}))
            except Exception as e:  # noqa: BLE001 (the status is sent: the error goes in the stream)
                yield sse((e if isinstance(e, RequestError) else unexpected_error(e)).body())
                return
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(ids), completion_tokens)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def unexpected_error(e: Exception) -> RequestError:
    """OpenAI's 500 for a fault of the server's (named by its type only: its text may hold internals)."""
    return RequestError(500, f"the server failed on this request ({type(e).__name__}); it goes on serving "
                             "others.", "server_error")


def _top_dict(top: list[tuple[int, float]], text) -> dict[str, float]:
    """{token text: log p}, most likely first (a later token with the same text keeps the first's entry)."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(text(token), logprob)
    return out


def main(argv: list[str]) -> None:
    import os
    import sys

    import uvicorn
    from absl import flags

    from lm import runs, runtime
    from lm.cli import exit_with_error, quiet_logging, reject_positional
    from lm.config import ConfigError

    reject_positional(argv)
    quiet_logging()
    f = flags.FLAGS
    api_key = f.api_key or os.environ.get("LM_API_KEY")
    if warning := exposure_warning(f.host, api_key):
        print(warning, file=sys.stderr, flush=True)
    if not f.workdir:
        exit_with_error("--workdir is required, e.g. --workdir=runs/shakespeare_char")
    runtime.enable_compilation_cache()
    try:
        loaded = runs.load(f.workdir)
    except ConfigError as e:
        exit_with_error(str(e))
    if loaded.model_cfg.family != "decoder":
        exit_with_error(f"{f.workdir} holds a {loaded.model_cfg.family!r} model; the server decodes with a decoder.")
    if f.max_request_bytes < 1:
        exit_with_error(f"--max_request_bytes={f.max_request_bytes}: give a positive number of bytes, e.g. 4194304.")
    context = loaded.model_cfg.max_len
    limits = Limits(max_prompt_tokens=min(f.max_prompt_tokens or context - 1, context - 1),
                    max_tokens=min(f.max_tokens_limit, context - 1), max_concurrent=f.max_concurrent,
                    max_batch=f.max_batch, batch_window_ms=f.batch_window_ms, max_prompts=f.max_prompts,
                    max_request_bytes=f.max_request_bytes, max_tokens_limit=f.max_tokens_limit)
    name = f.model_name or os.path.basename(os.path.normpath(f.workdir))
    app = make_app(loaded, limits, name, api_key)
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
    flags.DEFINE_integer("max_tokens_limit", 256, "Largest max_tokens accepted (at most the context less one).")
    flags.DEFINE_integer("max_concurrent", 64, "Requests in flight before 429s.")
    flags.DEFINE_integer("max_batch", 32, "Most requests decoded together.")
    flags.DEFINE_integer("max_prompts", 32, "Most prompts one /v1/completions request may carry (each is "
                                            "decoded as its own job through the batcher).")
    flags.DEFINE_integer("max_request_bytes", 4 * 2**20, "Largest request body accepted, in bytes (413 above it).")
    flags.DEFINE_float("batch_window_ms", 10.0, "How long the first request waits for others to batch with.")


if __name__ == "__main__":
    from absl import app as absl_app

    _define_flags()
    absl_app.run(main)
