"""OpenAI's response bodies for the engine's `Piece`s: a whole completion or chat
completion, or its server-sent events (`data: {chunk}` lines, then `data: [DONE]`), with
usage and logprobs in the format of each endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from lm.inference.engine import Piece, Token
from lm.inference.protocol import RequestError, unexpected_error

TokenText = Callable[[int], tuple[str, "bytes | None"]]  # Engine.token_text: a token's (text, UTF-8 bytes)


def response_head(chat: bool, stream: bool, model_name: str) -> dict:
    """The fields every response (or chunk) of one request shares: id, object, created, model."""
    kind = "chat.completion" if chat else "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind + (".chunk" if chat and stream else ""), "created": int(time.time()),
            "model": model_name}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    """One server-sent event: a JSON payload, or a plain string such as "[DONE]"."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def completion_logprobs(tokens: list[Token], k: int, base: int, token_text: TokenText) -> dict:
    """OpenAI's completions logprobs: parallel lists over `tokens` (offsets shifted by `base`)."""
    text = lambda i: token_text(i)[0]
    return {"tokens": [text(t.id) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.top is None else _top_dict(t.top[:k], text) for t in tokens],
            "text_offset": [base + t.offset for t in tokens]}


def chat_logprobs(tokens: list[Token], k: int, token_text: TokenText) -> dict:
    """OpenAI's chat logprobs: per token its text, log p, bytes and `k` top alternatives."""

    def entry(token: int, logprob: float) -> dict:
        text, raw = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": None if raw is None else list(raw)}

    return {"content": [entry(t.id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top[:k]]}
                        for t in tokens], "refusal": None}


def _top_dict(top: list[tuple[int, float]], text) -> dict[str, float]:
    """{token text: log p}, most likely first (a later token with the same text keeps the first's entry)."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(text(token), logprob)
    return out


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


async def _events(head: dict, updates: AsyncIterator[tuple[dict | None, int]], prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of a stream's (choice, completion tokens) updates: a chunk per
    choice (none for None: tokens counted, nothing to send), with `"usage": null` when
    `include_usage`, then a last chunk with the usage and no choices, then [DONE]. A failure
    after the 200 went out is sent as the stream's last event, OpenAI's error body."""
    completion_tokens = 0
    try:
        async for choice, tokens in updates:
            completion_tokens += tokens
            if choice is not None:
                yield sse({**head, "choices": [choice]} | ({"usage": None} if include_usage else {}))
    except Exception as e:  # noqa: BLE001 (the status is sent: the error goes in the stream)
        yield sse((e if isinstance(e, RequestError) else unexpected_error(e)).body())
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield sse("[DONE]")


@dataclasses.dataclass(frozen=True)
class Completion:
    """A /v1/completions request's runs (one per prompt) and how to report them."""

    runs: list[AsyncIterator[Piece]]
    model: str  # the served model's id
    prompt_tokens: int
    echoed: list[str]  # per prompt, the text that precedes its completion ("" without echo)
    logprobs: int | None  # alternatives per token; None: no logprobs asked
    token_text: TokenText
    include_usage: bool = False  # streaming: a last chunk with usage and no choices

    def logprobs_of(self, index: int, pieces: list[Piece]) -> dict | None:
        """Completions logprobs of a choice's pieces: prompt tokens at their own offsets,
        generated ones after the echoed text."""
        if self.logprobs is None or not any(p.tokens for p in pieces):
            return None
        parts = [completion_logprobs(p.tokens, self.logprobs, 0 if p.prompt else len(self.echoed[index]),
                                     self.token_text) for p in pieces]
        return {key: [x for part in parts for x in part[key]] for key in ("tokens", "token_logprobs",
                                                                           "top_logprobs", "text_offset")}

    async def body(self) -> dict:
        """The whole response, once every run has finished."""

        async def collect(run):
            return [piece async for piece in run]

        results = await asyncio.gather(*(collect(run) for run in self.runs))
        choices = [{"index": index, "text": self.echoed[index] + "".join(p.text for p in pieces),
                    "finish_reason": pieces[-1].finish, "logprobs": self.logprobs_of(index, pieces)}
                   for index, pieces in enumerate(results)]
        completion_tokens = sum(len(p.tokens) for pieces in results for p in pieces if not p.prompt)
        return {**response_head(False, False, self.model), "choices": choices,
                "usage": usage(self.prompt_tokens, completion_tokens)}

    def events(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of any choice as it comes (a choice's echoed
        prompt in its first), the usage chunk if asked, then [DONE]."""
        return _events(response_head(False, True, self.model), self._updates(), self.prompt_tokens,
                       self.include_usage)

    async def _updates(self) -> AsyncIterator[tuple[dict, int]]:
        echo_sent = set()
        async for index, piece in merged(self.runs):
            text = piece.text
            if index not in echo_sent:  # the echoed prompt comes first
                echo_sent.add(index)
                text = self.echoed[index] + text
            yield ({"index": index, "text": text, "finish_reason": piece.finish,
                    "logprobs": self.logprobs_of(index, [piece])}, 0 if piece.prompt else len(piece.tokens))


@dataclasses.dataclass(frozen=True)
class Chat:
    """A /v1/chat/completions request's run and how to report it."""

    run: AsyncIterator[Piece]
    model: str  # the served model's id
    prompt_tokens: int
    logprobs: int | None  # top_logprobs per token; None: no logprobs asked
    token_text: TokenText
    include_usage: bool = False  # streaming: a last chunk with usage and no choices

    async def body(self) -> dict:
        """The whole response, once the run has finished."""
        pieces = [piece async for piece in self.run]
        tokens = [t for piece in pieces for t in piece.tokens]
        message = {"role": "assistant", "content": "".join(p.text for p in pieces), "refusal": None}
        logprobs = None if self.logprobs is None else chat_logprobs(tokens, self.logprobs, self.token_text)
        choice = {"index": 0, "message": message, "finish_reason": pieces[-1].finish, "logprobs": logprobs}
        return {**response_head(True, False, self.model), "choices": [choice],
                "usage": usage(self.prompt_tokens, len(tokens))}

    def events(self) -> AsyncIterator[str]:
        """Server-sent events: the assistant role, a delta per piece with text, tokens or the
        finish reason, the usage chunk if asked, then [DONE]."""
        return _events(response_head(True, True, self.model), self._updates(), self.prompt_tokens,
                       self.include_usage)

    async def _updates(self) -> AsyncIterator[tuple[dict | None, int]]:
        yield {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}, 0
        async for piece in self.run:
            delta = {"content": piece.text} if piece.text else {}
            logprobs = (chat_logprobs(piece.tokens, self.logprobs, self.token_text)
                        if self.logprobs is not None and piece.tokens else None)
            send = delta or logprobs or piece.finish
            yield ({"index": 0, "delta": delta, "finish_reason": piece.finish, "logprobs": logprobs}
                   if send else None), len(piece.tokens)
