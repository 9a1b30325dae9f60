"""CLI: serve a trained decoder over an OpenAI-compatible HTTP API (lm.inference.http).

    python -m lm.serve --workdir=runs/shakespeare_char --port=8000 [--api_key=secret]

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, each with `"stream": true` for server-sent events; and
vLLM's tokenizer endpoints (`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`).
Every request field of the `openai` client is implemented, accepted as a no-op or refused
(the tables in lm.inference.protocol). Requests that arrive within `--batch_window_ms` of
an idle server start together; later ones join the running batch between steps
(continuous batching over a KV cache: lm.inference.engine, lm.inference.slots).
"""

from __future__ import annotations

import time

from lm.config import parse_flags
from lm.errors import UsageError
from lm.inference.engine import Limits
from lm.inference.http import exposure_warning, listening_sockets, make_app


def main(argv: list[str]) -> None:
    import os
    import sys

    from absl import flags

    from lm.errors import exit_with_error, quiet_logging, reject_positional
    from lm.parallel import runtime
    from lm.runs import artifacts
    from lm.training import optim

    reject_positional(argv)
    quiet_logging()
    f = flags.FLAGS
    if not f.workdir:
        exit_with_error("--workdir is required, e.g. --workdir=runs/shakespeare_char")
    try:
        sockets = listening_sockets(f.host, f.port)  # held from here: the address is ours once compiled
    except UsageError as e:
        exit_with_error(str(e))
    api_key = f.api_key or os.environ.get("LM_API_KEY")
    if warning := exposure_warning(f.host, api_key):
        print(warning, file=sys.stderr, flush=True)
    runtime.enable_compilation_cache()
    try:
        loaded = artifacts.load(f.workdir, eval_params=optim.eval_params_reader)
    except UsageError as e:
        exit_with_error(str(e))
    if loaded.model_cfg.family != "decoder":
        exit_with_error(f"{f.workdir} holds a {loaded.model_cfg.family!r} model; the server decodes with a decoder.")
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
    port = sockets[0].getsockname()[1]  # --port=0: the free port the system chose
    print(f"serving {name} on http://{f.host}:{port}/v1 (context {context} tokens)", flush=True)
    run_server(app, sockets, f.host, port)


def run_server(app, sockets: list, host: str, port: int) -> None:
    """`uvicorn.run(app, host, port)` on sockets already bound (lm.inference.http.listening_sockets)."""
    import sys

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)  # uvicorn.run's STARTUP_FAILURE


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "A run's workdir or an export.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
    flags.DEFINE_integer("port", 8000, "Port to listen on (0: a free port, printed at start-up).",
                         lower_bound=0, upper_bound=65535)
    flags.DEFINE_string("model_name", None, "The model id clients ask for; default the workdir's name.")
    flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer <key>` (or set LM_API_KEY).")
    # Every number has its range here: absl refuses one outside it in one line, before anything loads.
    flags.DEFINE_integer("max_prompt_tokens", 0, "Longest prompt accepted; 0: the context minus one.",
                         lower_bound=0)
    flags.DEFINE_integer("max_tokens_limit", 256, "Largest max_tokens accepted (at most the context less one).",
                         lower_bound=1)
    flags.DEFINE_integer("max_concurrent", 64, "Requests in flight before 429s.", lower_bound=1)
    flags.DEFINE_integer("max_batch", 32, "Most requests decoded together.", lower_bound=1)
    flags.DEFINE_integer("max_prompts", 32, "Most prompts one /v1/completions request may carry (each is "
                                            "decoded as its own job through the batcher).", lower_bound=1)
    flags.DEFINE_integer("max_request_bytes", 4 * 2**20, "Largest request body accepted, in bytes (413 above it).",
                         lower_bound=1)
    flags.DEFINE_float("batch_window_ms", 10.0, "How long the first request waits for others to batch with.",
                       lower_bound=0.0)

if __name__ == "__main__":
    from absl import app as absl_app

    _define_flags()
    absl_app.run(main, flags_parser=parse_flags)
