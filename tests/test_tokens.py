"""Tokens stored once: the parallel tokenizing stage gives `encode`'s ids, SentencePiece
trains on a bounded, seeded sample, and a corpus `lm.prepare` tokenized starts training
without tokenizing."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from helpers import cli_env, run_cli, tiny_config

from lm.data import corpora, corpus, token_cache, tokenizers, vocabulary
from lm.data.build import tokens as token_stage

SPLITS = ("train", "validation")


def paragraphs(limit: int) -> list[str]:
    """The first `limit` characters of Tiny Shakespeare, as its speeches."""
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        return [p for p in f.read(limit).split("\n\n") if p.strip()]


def write_corpus(path, count: int, seed: int = 0) -> list[str]:
    """A JSONL corpus of `count` documents: speeches, with text outside their alphabet and
    spelling control tokens (byte fallback, `<eos>` as text); returns the texts."""
    rng = random.Random(seed)
    speeches = paragraphs(200_000)
    extras = ["", " café ☃ 東京", " <eos></s><pad>", " <0x41> \u200b"]
    docs = [rng.choice(speeches) + rng.choice(extras) + f" #{i}" for i in range(count)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return docs


def small_config(tmp_path, files, **overrides):
    settings = dict(data__files=tuple(map(str, files)), data__name="speeches", data__split="hash",
                    data__data_dir=str(tmp_path / "data"), data__tokenizer="sentencepiece",
                    data__sentencepiece__vocab_size=600, data__packing="pack")
    return tiny_config(**{**settings, **overrides})


def reference(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The single-process reference: each text's `encode`, joined by <eos>, and (start, length)."""
    ids = [tokenizer.encode(t) for t in texts]
    eos = np.array([tokenizer.eos_id], np.int32)
    stream = np.concatenate([a for doc in ids for a in (doc, eos)][:-1])
    lengths = np.array([len(doc) for doc in ids], np.int64)
    return stream, np.stack([np.cumsum(lengths + 1) - lengths - 1, lengths], axis=1)


@pytest.mark.parametrize("kind, workers", [("sentencepiece", 2), ("char", 1)])
def test_parallel_tokenizing_gives_encodes_ids_and_documents_in_order(tmp_path, kind, workers):
    config = small_config(tmp_path, [tmp_path / "docs.jsonl"], data__tokenizer=kind)
    write_corpus(tmp_path / "docs.jsonl", 600)
    builder = corpus.builders(config)["speeches"]
    tokenizer = corpus.fit_tokenizer(config, corpus.builders(config))
    infos = {s: (builder.info.splits[s].num_examples, builder.info.splits[s].num_bytes) for s in SPLITS}
    parts = token_stage.plan(infos, part_bytes=8_000)
    assert all(sum(split == s for split, _, _ in parts) > 1 for s in SPLITS)  # several tasks a split, joined
    result = token_stage.tokenize(builder.data_dir, infos, tokenizer, str(tmp_path / "parts"),
                                  workers=workers, part_bytes=8_000)
    whole = token_stage.tokenize(builder.data_dir, infos, tokenizer, str(tmp_path / "whole"))  # one task a split
    for split in SPLITS:
        texts = list(corpus.texts(builder.as_data_source()[split]))
        want_stream, want_docs = reference(tokenizer, texts)
        for cache in ("parts", "whole"):
            stream, docs, num_bytes = token_cache.load(str(tmp_path / cache), split)
            assert stream.dtype == np.int32 and np.array_equal(stream, want_stream)
            assert np.array_equal(docs, want_docs)
            assert num_bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert result[split] == whole[split] == {"documents": len(texts), "tokens": len(want_stream),
                                                 "bytes": num_bytes}
    assert sorted(os.listdir(tmp_path / "parts")) == sorted(f"{s}.{n}" for s in SPLITS for n in
                                                           ("tokens.npy", "docs.npy", "json"))  # parts removed


def test_a_failed_tokenizing_leaves_no_cache_and_a_rerun_redoes_only_the_unfinished_parts(tmp_path, monkeypatch):
    config = small_config(tmp_path, [tmp_path / "docs.jsonl"], data__tokenizer="char")
    write_corpus(tmp_path / "docs.jsonl", 300)
    built = corpus.builders(config)
    builder, tokenizer = built["speeches"], corpus.fit_tokenizer(config, built)
    infos = {s: (builder.info.splits[s].num_examples, builder.info.splits[s].num_bytes) for s in SPLITS}
    parts, cache = token_stage.plan(infos, part_bytes=8_000), str(tmp_path / "tokens")
    calls, encode_batch, failing = [], tokenizers.CharTokenizer.encode_batch, [True]

    def failing_third(self, texts):  # each part is one chunk of records: one call a part
        calls.append(len(texts))
        if failing and len(calls) == 3:
            raise RuntimeError("the third part failed")
        return encode_batch(self, texts)

    monkeypatch.setattr(tokenizers.CharTokenizer, "encode_batch", failing_third)
    with pytest.raises(RuntimeError, match="the third part failed"):
        token_stage.tokenize(builder.data_dir, infos, tokenizer, cache, workers=1, part_bytes=8_000)
    assert not any(token_cache.is_cached(cache, split) for split in SPLITS)
    calls.clear()
    failing.clear()
    token_stage.tokenize(builder.data_dir, infos, tokenizer, cache, workers=1, part_bytes=8_000)
    assert len(calls) == len(parts) - 2  # the two finished parts were kept
    for split in SPLITS:
        stream, docs, _ = token_cache.load(cache, split)
        want_stream, want_docs = reference(tokenizer, list(corpus.texts(builder.as_data_source()[split])))
        assert np.array_equal(stream, want_stream) and np.array_equal(docs, want_docs)
    assert not [name for name in os.listdir(cache) if name.startswith("incomplete")]


class CountingSource:
    """A built split's data source that counts the documents read through it."""

    def __init__(self, source):
        self.source, self.reads = source, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.reads += 1
        return self.source[index]


def test_sentencepiece_trains_on_a_bounded_seeded_sample_and_on_all_of_a_small_corpus(tmp_path):
    config = small_config(tmp_path, [tmp_path / "docs.jsonl"], data__sentencepiece__max_sentences=150)
    docs = write_corpus(tmp_path / "docs.jsonl", 400)
    built = corpus.builders(config)
    train = built["speeches"].as_data_source()["train"]
    num_bytes = built["speeches"].info.splits["train"].num_bytes
    everything = list(corpus.texts(train))
    assert len(everything) > 300 and set(everything) <= set(docs)

    counting = CountingSource(train)
    sample = list(vocabulary.sample_texts([(counting, num_bytes)], 150))
    assert len(sample) == counting.reads == 150 and len(set(sample)) == 150 and set(sample) <= set(everything)
    assert list(vocabulary.sample_texts([(train, num_bytes)], 150)) == sample  # seeded
    assert list(vocabulary.sample_texts([(train, num_bytes)], 150, seed=1)) != sample

    counting = CountingSource(train)  # a byte budget ends the sample early
    budget = list(vocabulary.sample_texts([(counting, num_bytes)], 150, max_bytes=10_000))
    assert counting.reads == len(budget) < 150
    assert sum(len(t.encode("utf-8")) for t in budget[:-1]) < 10_000 <= sum(len(t.encode("utf-8")) for t in budget)

    assert list(vocabulary.sample_texts([(train, num_bytes)], 10_000)) == everything  # small: all, in order

    first = vocabulary.train_sentencepiece(config, built)
    assert first.model_proto == vocabulary.train_sentencepiece(config, built).model_proto  # same seed, same model
    config.data.sentencepiece.max_sentences = 10_000
    assert first.model_proto != vocabulary.train_sentencepiece(config, built).model_proto  # trained on all


def test_a_corpus_lm_prepare_tokenized_starts_training_without_tokenizing(tmp_path, monkeypatch):
    """datatrove build, SentencePiece, packing: `lm.prepare` builds, fits and tokenizes; a
    run's start-up (workdir, corpus, tokenizer, model, the first batches) then encodes
    nothing. (tests/test_end_to_end.py trains such a run, killed and resumed.)"""
    from lm.data import batches
    from lm.training import setup

    write_corpus(tmp_path / "docs.jsonl", 300)
    config = small_config(tmp_path, [tmp_path / "docs.jsonl"], data__build="datatrove")
    flags = [f"--config.data.{key}={value}" for key, value in (
        ("files", f"('{tmp_path / 'docs.jsonl'}',)"), ("name", "speeches"), ("split", "hash"), ("build", "datatrove"),
        ("data_dir", config.data.data_dir), ("tokenizer", "sentencepiece"), ("sentencepiece.vocab_size", 600))]
    prepared = run_cli("lm.prepare", "--config=configs/shakespeare_char.py", *flags, "--workers=2")
    assert "tokenized " in prepared.stdout and "tokens/s" in prepared.stdout
    token_dir = prepared.stdout.split("tokens: ")[-1].strip()
    stored = np.load(os.path.join(token_dir, "train.tokens.npy"))

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer encoded text at training start-up")

    for name in ("encode", "encode_batch"):
        monkeypatch.setattr(tokenizers.SentencePieceTokenizer, name, refuse)
    run = setup.setup_run(config, str(tmp_path / "run"))
    try:
        iterator = batches.iterate(batches.train_data(config, run.corpus), 1, 1)
        first = [next(iterator) for _ in range(2)]
    finally:
        run.close()
    assert np.array_equal(run.corpus.tokens["train"], stored)
    assert first[0]["tokens"].shape == (config.train.batch_size, config.data.seq_len + 1)
    text = first[0]["segment_ids"] > 0  # packed documents (the rest is padding)
    assert text.any() and np.isin(first[0]["tokens"][text], stored).all()
    tokenizer = tokenizers.load(str(tmp_path / "run" / "tokenizer.json"))
    assert corpus._tokenizer_id(tokenizer) == os.path.basename(token_dir)  # noqa: SLF001


def test_a_process_running_jax_tokenizes_in_worker_processes_without_forking_itself(tmp_path):
    """A run that finds no tokens tokenizes at start-up, after JAX started its threads: no
    process may be forked from it (JAX warns that fork can deadlock); workers and datatrove's
    Manager start from the forkserver."""
    files = [tmp_path / f"part-{i}.jsonl" for i in range(2)]
    for seed, path in enumerate(files):
        write_corpus(path, 150, seed)
    script = f"""
import lm, jax.numpy as jnp
from helpers import tiny_config
from lm.data import corpus
from lm.data.build import tokens
jnp.ones(3).block_until_ready()
tokens.PART_BYTES = 8_000  # several parts a split: worker processes
config = tiny_config(data__files={tuple(map(str, files))!r}, data__split="hash", data__build="datatrove",
                     data__data_dir={str(tmp_path / 'data')!r})
corpus.prepare(config, {str(tmp_path / 'tokenizer.json')!r}, workers=2)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__), env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "os.fork()" not in result.stderr
