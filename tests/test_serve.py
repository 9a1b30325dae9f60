"""The HTTP server, through the official `openai` client: completions, chat and
streaming with OpenAI's semantics for every request field (logprobs equal to
lm.evaluate's log-likelihoods, echo, include_usage, additive penalties, logit_bias), a
400 naming the field for every wrong-typed, unknown or unsupported one (after which the
server keeps serving), vLLM's tokenizer endpoints, and the API key."""

import dataclasses
import hashlib
import hmac
import http.client
import json
import socket
import threading
import time
import typing
import urllib.error
import urllib.request
from collections import Counter

import openai
import pytest

from lm.evaluation.scoring import continuation_log_likelihoods
from lm.inference import protocol
from lm.inference.engine import Limits
from lm.inference.http import Guard, ListenError, exposure_warning, listening_sockets, make_app
from lm.runs import artifacts
from tests.helpers import run_cli, serve_app, start_server

KEY = "test-key"
MAX_PROMPTS = 4
MAX_TOKENS_LIMIT = 20
MAX_REQUEST_BYTES = 8192


@pytest.fixture(scope="module")
def server(pretrained):
    with start_server(pretrained, "--max_prompt_tokens=32", f"--max_prompts={MAX_PROMPTS}",
                      f"--max_tokens_limit={MAX_TOKENS_LIMIT}", f"--max_request_bytes={MAX_REQUEST_BYTES}",
                      api_key=KEY) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def loaded(pretrained):
    """The served export, loaded in this process: lm.evaluate's view of the same model."""
    return artifacts.load(pretrained)


def post(base: str, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(base: str, path: str, key: str | None = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_openai_client_gets_completions_chat_and_streams(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]

    completion = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0)
    text = completion.choices[0].text
    assert completion.choices[0].finish_reason == "length" and len(text) == 8  # one character per token
    assert completion.usage.prompt_tokens == 6 and completion.usage.completion_tokens == 8

    pieces = [chunk.choices[0].text for chunk in
              client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # arrived in pieces

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].message.content) == 5
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Speak."}], max_tokens=5, temperature=0, stream=True))
    assert streamed == chat.choices[0].message.content

    stopped = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0, stop=[text[3]])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[:text.index(text[3])]
    # Counted as tokens generated and returned, not by re-encoding the text: the cut ones are not counted.
    assert stopped.usage.completion_tokens == len(stopped.choices[0].text)


def test_completion_logprobs_with_echo_equal_lm_evaluate_log_likelihoods(client, loaded):
    prompt = "ROMEO: Speak"
    completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                           echo=True)
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt) and len(choice.text) == len(prompt) + 6
    assert "".join(logprobs.tokens) == choice.text and logprobs.text_offset == list(range(len(choice.text)))
    # The first prompt token is predicted by nothing: no log-probability, no alternatives.
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(len(top) == 3 for top in logprobs.top_logprobs[1:])
    # lm.evaluate scores the same text from the same export: every token after the first.
    (expected, scored), = continuation_log_likelihoods(loaded, [(choice.text[:1], choice.text[1:])])
    assert scored == len(choice.text) - 1
    assert sum(logprobs.token_logprobs[1:]) == pytest.approx(expected, abs=1e-4)
    (prompt_only, _), = continuation_log_likelihoods(loaded, [(prompt[:1], prompt[1:])])
    assert sum(logprobs.token_logprobs[1:len(prompt)]) == pytest.approx(prompt_only, abs=1e-4)
    # Greedy: each generated token is the most likely one, and its logprob is the top entry.
    for token, logprob, top in zip(logprobs.tokens[len(prompt):], logprobs.token_logprobs[len(prompt):],
                                   logprobs.top_logprobs[len(prompt):]):
        assert max(top, key=top.get) == token and top[token] == logprob
    assert completion.usage.completion_tokens == 6

    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    assert plain.choices[0].text == choice.text[len(prompt):]  # no echo: the completion alone
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs[len(prompt):], abs=1e-5)
    assert plain.choices[0].logprobs.top_logprobs == [{}] * 6


def test_token_id_prompts_score_as_the_lm_eval_harness_reads_them(client, loaded):
    """The harness's loglikelihood request: token-id prompts, echo, logprobs 1, max_tokens 1;
    it sums token_logprobs[ctxlen:-1] of each choice, sorted by index."""
    pairs = [("ROMEO: ", "Speak"), ("JULIET:", " O Romeo"), ("First Citizen:", " Before")]
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(c).tolist() + tokenizer.encode(x).tolist() for c, x in pairs]
    response = client.completions.create(model="tiny", prompt=prompts, temperature=0, max_tokens=1, logprobs=1,
                                         seed=1234, echo=True)
    expected = continuation_log_likelihoods(loaded, pairs)
    choices = sorted(response.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    for choice, (context, _), (log_likelihood, _), ids in zip(choices, pairs, expected, prompts):
        ctxlen = len(tokenizer.encode(context))
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1  # the prompt, then the one generated token
        assert sum(choice.logprobs.token_logprobs[ctxlen:-1]) == pytest.approx(log_likelihood, abs=1e-4)
        assert choice.text.startswith(tokenizer.decode(ids))
        # The harness's greediness check, on the token generated greedily: exact equality holds.
        assert choice.logprobs.token_logprobs[-1] == max(choice.logprobs.top_logprobs[-1].values())
    assert response.usage.completion_tokens == 3 and response.usage.prompt_tokens == sum(map(len, prompts))

    strings = client.completions.create(model="tiny", prompt=["ROMEO:", "JULIET:"], max_tokens=3, temperature=0)
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=3, temperature=0).choices[0].text
             for p in ("ROMEO:", "JULIET:")]
    assert [c.text for c in sorted(strings.choices, key=lambda c: c.index)] == alone

    scored = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=0, echo=True, logprobs=1)
    assert scored.usage.completion_tokens == 0 and len(scored.choices[0].logprobs.token_logprobs) == len(prompts[0])
    assert sum(scored.choices[0].logprobs.token_logprobs[1:]) == pytest.approx(
        continuation_log_likelihoods(loaded, [(pairs[0][0][:1], "".join(pairs[0])[1:])])[0][0], abs=1e-4)


def test_chat_logprobs_and_streams_with_usage(client):
    messages = [{"role": "user", "content": "Speak."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert len(content) == chat.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert bytes(entry.bytes).decode() == entry.token

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])
    streamed = [entry for chunk in chunks[:-1] if chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]

    chunks = list(client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(chunk.usage is None for chunk in chunks[:-1])


def adjusted(logprob: float, count: int, presence: float, frequency: float) -> float:
    """OpenAI's additive penalties on a token generated `count` times so far."""
    return logprob - count * frequency - (count > 0) * presence


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.5), (-1.0, -0.5)])
def test_presence_and_frequency_penalties_are_additive_on_generated_tokens(client, presence, frequency):
    """Greedy with penalties: each chosen token is the argmax of the model's log-probability
    minus the penalty terms, counting the tokens generated before it (not the prompt's)."""
    settings = dict(model="tiny", messages=[{"role": "user", "content": "Speak, speak."}], max_tokens=14,
                    temperature=0, logprobs=True, top_logprobs=20)
    penalised = client.chat.completions.create(presence_penalty=presence, frequency_penalty=frequency, **settings)
    content = penalised.choices[0].logprobs.content
    assert len(content) == penalised.usage.completion_tokens  # up to 14, or fewer ending with <eos>
    assert len(content) == 14 or (content[-1].token == "<eos>" and penalised.choices[0].finish_reason == "stop")
    counts: Counter = Counter()
    for entry in content:
        chosen = adjusted(entry.logprob, counts[entry.token], presence, frequency)
        for alternative in entry.top_logprobs:
            assert chosen >= adjusted(alternative.logprob, counts[alternative.token], presence, frequency) - 1e-5
        if presence >= 0 and frequency >= 0:  # tokens not listed are less likely and no less penalised
            assert chosen >= entry.top_logprobs[-1].logprob - 1e-5
        counts[entry.token] += 1
    if presence > 0:  # this model repeats ':' when greedy; penalised, it does not
        plain = client.chat.completions.create(**settings).choices[0].message.content
        assert plain == ":" * 14 and penalised.choices[0].message.content != plain


def test_logit_bias_adds_to_the_logits(client, loaded):
    x = int(loaded.tokenizer.encode("x")[0])
    favoured = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5, temperature=0,
                                         logit_bias={str(x): 100})
    assert favoured.choices[0].text == "xxxxx"
    plain = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5, temperature=0).choices[0].text
    first = int(loaded.tokenizer.encode(plain[0])[0])
    banned = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=5, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text[0] != plain[0]
    # usage counts the tokens generated, not the text re-encoded: <pad> has no text.
    pad = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=3, temperature=0,
                                    logit_bias={str(loaded.tokenizer.pad_id): 100})
    assert pad.choices[0].text == "" and pad.usage.completion_tokens == 3


BAD_COMPLETIONS = [  # (field, value): each answered by a 400 naming the field
    ("stop", 5), ("stop", True), ("stop", ["a", "b", "c", "d", "e"]), ("logprobs", "x"), ("logprobs", 6),
    ("logprobs", True), ("echo", "yes"), ("temperature", "hot"), ("temperature", 2.5), ("top_p", 1.5), ("n", 2),
    ("best_of", 3), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("max_tokens", -1), ("max_tokens", 1.5),
    ("max_tokens", 0), ("seed", "1"), ("suffix", "the end"), ("stream_options", {"include_usage": True}),
    ("logit_bias", {"5": 101}), ("logit_bias", {"x": 1}), ("logit_bias", {"100000": 1}), ("user", 7),
    ("prompt", [1, "a"]), ("prompt", [100000]), ("prompt", []), ("prompt", ["a"] * (MAX_PROMPTS + 1)),
    ("prompt", "x" * 40), ("frobnicate", 1),
    # An empty stop string would match everywhere (it used to cut text silently).
    ("stop", ""), ("stop", ["", ""]), ("stop", ["ok", ""]),
    # Text that is not Unicode (a lone surrogate, which JSON's \u escapes can spell), in every text field.
    ("prompt", "\ud800"), ("prompt", ["ok", "\udc00"]), ("stop", "\ud800"), ("stop", ["\udfff"]), ("user", "\ud800"),
    ("model", "\ud800"), ("\ud800", 1),
    # A key past int()'s 4300 digits, and digits of another script (int() reads them).
    ("logit_bias", {"1" * 5000: 1}), ("logit_bias", {"\u0663": 1}), ("temperature", float("nan")),
    ("prompt", [-1]), ("prompt", [[0, -1]]), ("stream_options", {"foo": True}),
]
BAD_CHAT = [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("top_logprobs", 2), ("logprobs", 1),
    ("top_logprobs", 21), ("n", 2), ("response_format", {"type": "json_object"}), ("store", True),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("reasoning_effort", "low"), ("verbosity", "low"), ("max_completion_tokens", 0),
    ("messages", []), ("messages", [{"role": "tool", "content": "x"}]), ("messages", [{"role": "user"}]),
    ("messages", [{"role": "user", "content": "x", "name": "bob"}]), ("parallel_tool_calls", True),
    ("web_search_options", {}), ("prediction", {"type": "content", "content": "x"}), ("unknown_key", 1),
    ("stop", ""), ("stop", ["", ""]), ("messages", [{"role": "user", "content": "\udc00"}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]), ("metadata", {"k": "\ud800"}),
    ("metadata", {"\ud800": "v"}), ("safety_identifier", "\ud800"), ("prompt_cache_key", "\ud800"),
    ("messages", [{"role": "assistant", "content": "x", "tool_calls": []}]), ("messages", [{"role": "user",
                                                                                       "content": "x" * 40}]),
]
# What the message says for some of them: the innermost offending key, and the reason.
NAMED = [
    ("/v1/completions", {"prompt": [-1]}, "'prompt[0]': -1 (Input should be greater than or equal to 0)"),
    ("/v1/completions", {"prompt": [[0, -1]]}, "'prompt[0][1]': -1 (Input should be greater than or equal to 0)"),
    ("/v1/completions", {"prompt": ["ok", "\udc00"]}, "'prompt[1]': \"\\udc00\" (text must be valid Unicode: "
                                                      "character 0 is a lone surrogate (\\udc00)"),
    ("/v1/completions", {"stream": True, "stream_options": {"foo": True}},
     "Unrecognized request argument supplied: stream_options.foo"),
    ("/v1/completions", {"stop": ["ok", ""]}, "'stop[1]': \"\" (String should have at least 1 character)"),
    ("/v1/completions", {"logit_bias": {"1" * 5000: 1}}, f"'logit_bias.{'1' * 40}...': \"{'1' * 199}"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
     "Unrecognized request argument supplied: messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "'messages[0].content[0].text'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]},
     "the prompt rendered from messages has"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "'messages[0].content' is required"),
]


def test_wrong_typed_unknown_or_unsupported_fields_get_a_400_naming_the_field(server, client):
    completion = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 4}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Speak."}], "max_tokens": 4}
    for path, base, cases in (("/v1/completions", completion, BAD_COMPLETIONS),
                              ("/v1/chat/completions", chat, BAD_CHAT)):
        for field, value in cases:
            status, body = post(server, path, base | {field: value})
            assert status == 400, (path, field, value, status, body)
            error = body["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == field, (field, value, error)
            assert field in error["message"], error
    for path, change, message in NAMED:
        status, body = post(server, path, (completion if path == "/v1/completions" else chat) | change)
        assert status == 400 and message in body["error"]["message"], (change, body)
    with pytest.raises(openai.BadRequestError) as caught:  # the official client sees the same
        client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=4, stop=5)
    assert caught.value.param == "stop"

    status, error = post(server, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    status, error = post(server, "/v1/completions", {"model": "tiny"})
    assert status == 400 and error["error"]["param"] == "prompt" and "required" in error["error"]["message"]
    status, error = post(server, "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in error["error"]["message"]
    status, error = post(server, "/v1/completions", completion | {"model": "gpt-4"})
    assert status == 404 and error["error"]["code"] == "model_not_found"
    status, error = post(server, "/v1/completions", completion | {"prompt": "x" * 40})
    assert status == 400 and error["error"]["code"] == "context_length_exceeded"
    status, ok = post(server, "/v1/completions", completion | {"temperature": 0})  # greedy: sampling may pick <eos>
    assert status == 200 and len(ok["choices"][0]["text"]) == 4 and ok["choices"][0]["finish_reason"] == "length"
    # Accepted no-op and output-neutral values change nothing.
    same = post(server, "/v1/chat/completions", chat | {
        "temperature": 0, "n": 1, "store": False, "tool_choice": "none", "response_format": {"type": "text"},
        "user": "u", "metadata": {"a": "b"}, "safety_identifier": "s", "prompt_cache_key": "k",
        "service_tier": "auto", "modalities": ["text"], "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Speak."}]}]})
    assert same[0] == 200
    assert same[1]["choices"][0]["message"] == post(server, "/v1/chat/completions", chat | {"temperature": 0})[1][
        "choices"][0]["message"]


def test_every_openai_request_field_is_implemented_accepted_or_refused():
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    for module, table, model in ((completion_create_params, protocol.COMPLETION_FIELDS, protocol.CompletionRequest),
                                 (chat_create_params, protocol.CHAT_FIELDS, protocol.ChatRequest)):
        keys = set(module.CompletionCreateParamsBase.__annotations__) | {"stream"}
        assert keys == set(table), keys ^ set(table)  # a new client field must be classified
        assert set(model.model_fields) == keys  # and validated: an unlisted key is an unknown one
        for name, (status, accepts) in table.items():
            assert status in (protocol.IMPLEMENTED, protocol.NO_OP, protocol.NEUTRAL, protocol.REFUSED) and accepts
            if status == protocol.REFUSED:  # only null gets through
                assert model.model_fields[name].annotation is type(None), name


def test_vllm_tokenizer_endpoints_serve_the_lm_eval_remote_tokenizer(server, loaded):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    status, info = get(server, "/tokenizer_info")
    assert status == 200 and "eos_token" in info and info["eos_token"] is None  # no text spells a control token
    assert info["eos_token_id"] == loaded.tokenizer.eos_id and info["vocab_size"] == loaded.tokenizer.vocab_size
    assert info["model_max_length"] == 48
    status, tokens = post(server, "/tokenize", {"prompt": "ROMEO: hi", "add_special_tokens": True})
    assert status == 200 and tokens == {"tokens": loaded.tokenizer.encode("ROMEO: hi").tolist(), "count": 9,
                                        "max_model_len": 48}
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}) == (200, {"prompt": "ROMEO: hi"})
    status, error = post(server, "/detokenize", {"tokens": [10**6]})
    assert status == 400 and error["error"]["param"] == "tokens"
    for prompt in (5, "\ud800", "ok\udc00"):
        status, error = post(server, "/tokenize", {"prompt": prompt})
        assert status == 400 and error["error"]["param"] == "prompt", error

    assert check_remote_tokenizer_support(server + "/v1/completions", auth_token=KEY)
    remote = RemoteTokenizer(server + "/v1/completions", auth_token=KEY)
    assert remote.encode("ROMEO:") == loaded.tokenizer.encode("ROMEO:").tolist()
    assert remote.decode(remote.encode("ROMEO:")) == "ROMEO:" and remote.eos_token_id is None


def test_the_api_key_guards_every_path_but_health_and_is_compared_in_constant_time(server, monkeypatch):
    same_length, other_length = "x" * len(KEY), "wrong"
    for path in ("/v1/models", "/tokenizer_info"):
        answers = [get(server, path, key) for key in (same_length, other_length, None)]
        assert [status for status, _ in answers] == [401] * 3
        assert answers[0][1] == answers[1][1] == answers[2][1]  # one body, whatever the guess
        assert answers[0][1]["error"]["code"] == "invalid_api_key"
    assert get(server, "/health", key=None)[0] == 200

    compared = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)
    guard = Guard(None, KEY, 1)
    assert guard.authorized([(b"authorization", f"Bearer {KEY}".encode())])
    assert not guard.authorized([(b"authorization", b"Bearer " + same_length.encode())])
    assert not guard.authorized([])
    # Equal-length digests: the time taken depends on neither the key's length nor a guess's.
    assert len(compared) == 3 and all(len(a) == len(b) == hashlib.sha256().digest_size for a, b in compared)


def test_a_server_open_to_the_network_without_a_key_warns_at_start_up():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("0.0.0.0", "key") is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        assert "no API key" in exposure_warning(host, None)
    result = run_cli("lm.serve", "--host=0.0.0.0", "--port=0", "--workdir=/nonexistent/run", check=False,
                     timeout=120)
    assert "WARNING: serving on 0.0.0.0 with no API key" in result.stderr and "--api_key" in result.stderr


def test_an_address_that_cannot_be_listened_on_or_a_number_out_of_range_fails_in_one_line_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1 port {port}: .*Fix: choose another"):
            listening_sockets("127.0.0.1", port)
        # The workdir does not exist: the address is checked first, before any loading.
        in_use = run_cli("lm.serve", "--workdir=/nonexistent/run", f"--port={port}", check=False, timeout=120)
    with pytest.raises(ListenError, match="--host=not.a.host.invalid does not resolve"):
        listening_sockets("not.a.host.invalid", 0)
    sockets = listening_sockets("127.0.0.1", 0)  # bound for uvicorn, which listens on them
    assert len(sockets) == 1 and sockets[0].getsockname()[1] > 0
    sockets[0].close()
    zero_batch = run_cli("lm.serve", "--workdir=/nonexistent/run", "--max_batch=0", check=False, timeout=120)
    for result, problem in ((in_use, f"cannot listen on 127.0.0.1 port {port}"),
                            (zero_batch, "flag --max_batch=0: 0 is not a positive integer")):
        assert result.returncode == 2 and result.stderr == f"lm: error: {problem}" + result.stderr.split(problem)[1]
        assert result.stderr.count("\n") == 1 and "Fix:" in result.stderr, result.stderr


def test_max_tokens_past_the_context_blames_the_context_and_the_limit_says_where_it_comes_from(server):
    completion = {"model": "tiny", "prompt": "ROMEO:"}
    status, body = post(server, "/v1/completions", completion | {"max_tokens": 48})  # the context is 48
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "plus max_tokens=48 exceeds the model's context of 48 tokens; ask for at most 42" in body["error"]["message"]
    status, body = post(server, "/v1/completions", completion | {"max_tokens": MAX_TOKENS_LIMIT + 1})
    assert status == 400 and body["error"]["param"] == "max_tokens", body
    assert (f"max_tokens={MAX_TOKENS_LIMIT + 1} is more than this server's limit of {MAX_TOKENS_LIMIT}: the smaller "
            f"of --max_tokens_limit={MAX_TOKENS_LIMIT} and the model's context of 48 tokens less one"
            in body["error"]["message"]), body
    assert post(server, "/v1/completions", completion | {"max_tokens": MAX_TOKENS_LIMIT})[0] == 200


def test_the_bearer_scheme_matches_in_any_case_and_one_authorization_header_is_required(server):
    for scheme in ("bearer", "BEARER", "BeArEr"):
        request = urllib.request.Request(server + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    connection.putrequest("GET", "/v1/models")
    connection.putheader("Authorization", "Bearer wrong")
    connection.putheader("Authorization", f"Bearer {KEY}")  # which one counts? neither
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 401 and json.loads(response.read())["error"]["code"] == "invalid_api_key"
    guard = Guard(None, KEY, 1)
    assert guard.authorized([(b"authorization", f"bearer  {KEY}".encode())])
    assert not guard.authorized([(b"authorization", f"Bearer {KEY}".encode())] * 2)
    assert not guard.authorized([(b"authorization", f"Basic {KEY}".encode())])
    assert not guard.authorized([(b"authorization", KEY.encode())])


def send_body(base: str, body: bytes, chunked: bool) -> tuple[int, dict]:
    """POST /v1/completions with `body` sent whole (with Content-Length) or chunked (without)."""
    connection = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if chunked:
        connection.request("POST", "/v1/completions", body=iter([body[i:i + 1000] for i in range(0, len(body), 1000)]),
                           headers=headers, encode_chunked=True)
    else:
        connection.request("POST", "/v1/completions", body=body, headers=headers)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize("chunked", [False, True])
def test_a_request_body_past_the_size_cap_gets_a_413_and_one_below_it_is_served(server, chunked):
    small = json.dumps({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2, "user": "u" * 5000}).encode()
    large = json.dumps({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2, "user": "u" * MAX_REQUEST_BYTES}).encode()
    status, body = send_body(server, large, chunked)
    assert status == 413, body
    assert body["error"]["code"] == "request_too_large" and "--max_request_bytes" in body["error"]["message"]
    assert str(MAX_REQUEST_BYTES) in body["error"]["message"]
    status, body = send_body(server, small, chunked)
    assert status == 200 and len(body["choices"][0]["text"]) <= 2, body


def _has_unchecked_str(annotation) -> bool:
    """Whether a pydantic annotation holds a str that is neither a Text (checked for lone
    surrogates) nor pattern-bounded, nor inside a nested model that does."""
    if annotation is str:
        return True
    if isinstance(annotation, type) and issubclass(annotation, protocol.BaseModel):
        return any(_has_field_unchecked_str(f) for f in annotation.model_fields.values())
    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        if base is str:
            return not any(getattr(m, "func", None) is protocol._valid_unicode or "pattern=" in repr(m) for m in meta)
        return _has_unchecked_str(base)
    return any(_has_unchecked_str(a) for a in typing.get_args(annotation) if not isinstance(a, str))


def _has_field_unchecked_str(field) -> bool:
    if field.annotation is str:  # pydantic moves a top-level Annotated's metadata to the field
        return not any(getattr(m, "func", None) is protocol._valid_unicode for m in field.metadata)
    return _has_unchecked_str(field.annotation)


def test_every_text_field_refuses_text_that_is_not_unicode():
    for model in (protocol.CompletionRequest, protocol.ChatRequest, protocol.TokenizeRequest,
                  protocol.DetokenizeRequest):
        unchecked = [name for name, field in model.model_fields.items() if _has_field_unchecked_str(field)]
        assert unchecked == [], (model.__name__, unchecked)
    assert _has_unchecked_str(dict[str, protocol.Text]) and _has_unchecked_str(list[str] | None)  # the check checks


class _TestTokenizer:
    """The served tokenizer, except for text holding "slow" (encoded after a second),
    "boom" (a RuntimeError: a fault of the server's) or "cannot" (the ValueError the
    tokenizers raise for text they can spell only with a control id)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text: str):
        if "boom" in text:
            raise RuntimeError("an internal fault")
        if "cannot" in text:
            raise ValueError("the tokenizer encodes the character '\\x00' only as a control token")
        if "slow" in text:
            time.sleep(1.0)
        return self.inner.encode(text)


@pytest.fixture(scope="module")
def test_tokenizer_server(loaded):
    """make_app on the served export with _TestTokenizer, served by uvicorn in this process."""
    app = make_app(dataclasses.replace(loaded, tokenizer=_TestTokenizer(loaded.tokenizer)),
                   Limits(max_prompt_tokens=40, max_tokens=4), "tiny", KEY)
    with serve_app(app, log_level="critical") as base:
        yield base


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"prompt": "slow"}),
    ("/v1/completions", {"model": "tiny", "prompt": "slow", "max_tokens": 1}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 1}),
])
def test_tokenizing_runs_off_the_event_loop(test_tokenizer_server, path, body):
    answers = []
    slow = threading.Thread(target=lambda: answers.append(post(test_tokenizer_server, path, body)))
    slow.start()
    time.sleep(0.2)  # the slow request is being encoded
    start = time.monotonic()
    assert get(test_tokenizer_server, "/health")[0] == 200
    assert time.monotonic() - start < 0.5 and slow.is_alive()  # answered while the encoding goes on
    slow.join()
    assert answers[0][0] == 200, answers


def test_a_fault_of_the_server_gets_openai_s_500_body_and_untokenizable_text_a_400(test_tokenizer_server):
    base = test_tokenizer_server
    for path, body in (("/tokenize", {"prompt": "boom"}), ("/v1/completions", {"model": "tiny", "prompt": "boom"}),
                       ("/v1/completions", {"model": "tiny", "prompt": "boom", "stream": True})):
        status, answer = post(base, path, body)
        assert status == 500 and answer["error"]["type"] == "server_error", (path, answer)
        assert "RuntimeError" in answer["error"]["message"] and "internal fault" not in answer["error"]["message"]
    for path, body, param in (
            ("/tokenize", {"prompt": "cannot"}, "prompt"), ("/v1/completions", {"model": "tiny", "prompt": "cannot"},
                                                            "prompt"),
            ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "cannot"}]},
             "messages")):
        status, answer = post(base, path, body)
        assert status == 400 and answer["error"]["param"] == param, (path, answer)
        assert "only as a control token" in answer["error"]["message"]
    assert post(base, "/v1/completions", {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 2})[0] == 200
