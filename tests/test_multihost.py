"""Multi-host data loading with two real `jax.distributed` processes on 127.0.0.1."""

import os
import socket
import subprocess
import sys

import numpy as np
from helpers import REPO, cli_env, tiny_config

from lm.data import batches
from lm.data.corpus import prepare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_rows_whose_union_is_the_single_process_batch(tmp_path):
    config = tiny_config(data__unit="paragraph", data__split="hash", data__tokenizer="sentencepiece",
                         data__packing="pack", data__seq_len=32, train__batch_size=8)
    corpus = prepare(config, str(tmp_path / "tokenizer.json"))  # builds the shared caches once
    step = 11
    expected = batches.train_data(config, corpus)[step]

    coordinator = f"127.0.0.1:{free_port()}"
    env = cli_env()
    env["PYTHONPATH"] = os.path.join(REPO, "tests")
    outs = [str(tmp_path / f"process{i}.npz") for i in range(2)]
    workers = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"),
                                 coordinator, str(i), outs[i], str(step)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, output
    results = [np.load(out) for out in outs]
    assert all(int(r["process_count"]) == 2 and int(r["devices"]) == 2 for r in results)
    for key in ("tokens", "segment_ids", "positions"):
        rows = [r[f"local_{key}"] for r in results]
        assert rows[0].shape[0] == rows[1].shape[0] == 4  # each process holds half the batch
        assert not np.array_equal(rows[0], rows[1])
        assert np.array_equal(np.concatenate(rows), expected[key])  # disjoint halves of the same batch
        for r in results:  # the global array both processes see is the single-process batch
            assert np.array_equal(r[f"global_{key}"], expected[key])
