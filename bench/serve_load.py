"""Load on the HTTP server: N concurrent clients for a bounded time, batched against
one-request-at-a-time serving.

    python bench/serve_load.py --workdir=runs/shakespeare_char --clients=32 --seconds=60

Starts `lm.serve` twice on 127.0.0.1 (`--max_batch=1`, then the default batching), runs
the clients against each and prints requests/s, tokens/s, p50/p95 latency, errors and
incomplete responses, then the batched/unbatched tokens/s ratio.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import openai
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run or export to serve.", required=True)
_CLIENTS = flags.DEFINE_integer("clients", 32, "Concurrent clients.")
_SECONDS = flags.DEFINE_float("seconds", 60.0, "How long each configuration is loaded.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens each request asks for.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "The batched server's --max_batch.")
_PROMPTS = ("ROMEO:\n", "JULIET:\nO ", "First Citizen:\n", "KING RICHARD III:\nNow is the ")


def start_server(max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "lm.serve", f"--workdir={_WORKDIR.value}", f"--port={port}",
                                "--model_name=bench", f"--max_batch={max_batch}", "--max_concurrent=1024"],
                               env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=2)
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            client.models.list()
            return process, base
        except openai.APIConnectionError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start within 5 minutes")


async def client(base: str, index: int, deadline: float, results: list) -> None:
    api = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    i = 0
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            response = await api.completions.create(model="bench", prompt=_PROMPTS[(index + i) % len(_PROMPTS)],
                                                    max_tokens=_MAX_TOKENS.value, temperature=0.8,
                                                    seed=index * 1000 + i)
            ok, tokens = True, response.usage.completion_tokens
            complete = response.choices[0].finish_reason in ("length", "stop") and bool(response.choices[0].text)
        except openai.OpenAIError as e:
            ok, tokens, complete = False, 0, False
            print(f"client {index}: {type(e).__name__}: {e}", flush=True)
        results.append((time.monotonic() - start, ok, complete, tokens))
        i += 1
    await api.close()


def load(base: str) -> dict:
    results: list = []
    deadline = time.monotonic() + _SECONDS.value

    async def run_all():
        await asyncio.gather(*(client(base, i, deadline, results) for i in range(_CLIENTS.value)))

    start = time.monotonic()
    asyncio.run(run_all())
    elapsed = time.monotonic() - start
    latencies = np.array([r[0] for r in results])
    return {"requests": len(results), "requests_per_s": len(results) / elapsed,
            "tokens_per_s": sum(r[3] for r in results) / elapsed, "p50_s": float(np.percentile(latencies, 50)),
            "p95_s": float(np.percentile(latencies, 95)), "errors": sum(not r[1] for r in results),
            "incomplete": sum(r[1] and not r[2] for r in results)}


def main(argv: list[str]) -> None:
    del argv
    for name in ("httpx", "httpx2", "openai"):  # one log line per request would drown the figures
        logging.getLogger(name).setLevel(logging.WARNING)
    figures = {}
    for name, max_batch in (("one at a time", 1), ("batched", _MAX_BATCH.value)):
        process, base = start_server(max_batch)
        try:
            figures[name] = load(base)
        finally:
            process.terminate()
            process.wait(timeout=60)
        f = figures[name]
        print(f"{name:>13}: {f['requests']} requests, {f['requests_per_s']:.2f} req/s, "
              f"{f['tokens_per_s']:.1f} tokens/s, "
              f"p50 {f['p50_s']:.2f} s, p95 {f['p95_s']:.2f} s, errors {f['errors']}, incomplete {f['incomplete']}",
              flush=True)
    ratio = figures["batched"]["tokens_per_s"] / figures["one at a time"]["tokens_per_s"]
    print(f"batched / one at a time tokens/s: {ratio:.2f}x")
    failures = sum(f["errors"] + f["incomplete"] for f in figures.values())
    print(f"{'PASS' if failures == 0 and ratio >= 3 else 'FAIL'}: {failures} failed or incomplete responses "
          f"(target 0), {ratio:.2f}x (target >= 3x)")


if __name__ == "__main__":
    app.run(main)
