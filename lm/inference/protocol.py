"""The OpenAI request schema `lm.serve` speaks: a table per endpoint of every request field
the pinned `openai` client sends (`COMPLETION_FIELDS`, `CHAT_FIELDS`), the pydantic models
that validate bodies against it (unknown keys and wrong types refused; every text a
`Text`: valid Unicode, no lone surrogates), and OpenAI's error body (`RequestError`,
`validation_error`: a 400 naming the field in `param` and the key path in the message).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, model_validator
from pydantic_core import PydanticCustomError

from lm.inference import slots


class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message, type, the offending parameter."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def unexpected_error(e: Exception) -> RequestError:
    """OpenAI's 500 for a fault of the server's (named by its type only: its text may hold internals)."""
    return RequestError(500, f"the server failed on this request ({type(e).__name__}); it goes on serving "
                             "others.", "server_error")


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

    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
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
