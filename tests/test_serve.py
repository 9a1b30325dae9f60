"""The HTTP server, through the official `openai` client: completions, chat and
streaming; and OpenAI-style 4xx errors for bad requests, after which it keeps serving."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.helpers import REPO, cli_env

KEY = "test-key"


@pytest.fixture(scope="module")
def server(pretrained):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "lm.serve", f"--workdir={pretrained}", f"--port={port}",
                                "--model_name=tiny", f"--api_key={KEY}", "--max_prompt_tokens=32"],
                               cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read())
            time.sleep(0.5)
    yield base
    process.terminate()
    process.wait(timeout=30)


def post(base: str, path: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=body, headers={"Authorization": f"Bearer {key}",
                                                                       "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_openai_client_gets_completions_chat_and_streams(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    completion = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, temperature=0)
    text = completion.choices[0].text
    assert completion.choices[0].finish_reason == "length" and len(text) == 8  # one character per token
    assert completion.usage.prompt_tokens == 6

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


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    body = lambda **kw: json.dumps({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 4, **kw}).encode()
    status, error = post(server, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    status, error = post(server, "/v1/completions", body(prompt="x" * 40))
    assert status == 400 and error["error"]["code"] == "context_length_exceeded"
    status, error = post(server, "/v1/completions", body(max_tokens=-1))
    assert status == 400 and error["error"]["param"] == "max_tokens"
    status, error = post(server, "/v1/completions", body(model="gpt-4"))
    assert status == 404 and error["error"]["code"] == "model_not_found"
    status, error = post(server, "/v1/completions", body(), key="wrong")
    assert status == 401 and error["error"]["code"] == "invalid_api_key"
    status, ok = post(server, "/v1/completions", body(temperature=0))  # greedy: sampling may pick <eos>
    assert status == 200 and len(ok["choices"][0]["text"]) == 4 and ok["choices"][0]["finish_reason"] == "length"
