"""The corpus: build each source's TFDS dataset, fit the tokenizer, tokenize each split once.

`prepare(config, tokenizer_path)` returns a `Corpus`. Each split is stored once as one
token stream, its documents joined by `<eos>`, plus each document's (start, length),
under `<data_dir>/tokens/<dataset>/<tokenizer id>/` (`lm.data.token_cache`); the cache
is keyed by the dataset's fingerprint and the tokenizer's, so a change to either
tokenizes afresh. Tokenizing is `lm.data.build.tokens`: parallel tasks over the
dataset's records, joined by streaming, in memory that does not grow with the corpus.
`python -m lm.prepare` does it ahead of training; a run's start-up then only reads the
cache. Rows (`lm.data.rows`) and batches (`lm.data.batches`) are read from these streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import threading

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from lm.config import resolve_files
from lm.data import text_files, token_cache, tokenizers, vocabulary
from lm.data.documents import CorpusError
from lm.data.sources import check_inputs

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus: the tokenizer and each split's token stream and documents.

    With several sources (`config.data.sources`), `tokens` and `documents` join all of
    them (validation is scored on the union) and `mixture` keeps each source's train
    split with its weight, for training batches drawn in those proportions.
    """

    tokenizer: tokenizers.Tokenizer
    tokens: dict[str, np.ndarray]  # split -> int32 stream, documents joined by <eos> (memory-mapped)
    documents: dict[str, np.ndarray]  # split -> int64 [num_documents, 2]: (start, length) in `tokens`
    bytes_per_token: dict[str, float]  # split -> UTF-8 bytes per token, for bits per byte
    reports: dict[str, dict]  # source -> its cleaning report (`lm.data.cleaning.Report`)
    mixture: tuple[tuple[float, np.ndarray, np.ndarray], ...] = ()  # (weight, train tokens, documents)


def data_dir(config: ml_collections.ConfigDict) -> str:
    """The data cache (TFDS datasets, tokenizers, token streams): config.data.data_dir,
    else $LM_DATA_DIR, else ~/.cache/lm/data."""
    return os.path.expanduser(config.data.data_dir or os.environ.get("LM_DATA_DIR")
                              or os.path.join("~", ".cache", "lm", "data"))


def sources(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[str, ...], float]]:
    """(dataset name, files, weight) of each corpus the config trains on."""
    d = config.data
    if not d.sources:
        return [(d.name, tuple(d.files), 1.0)]
    return [(f"{d.name}_{name}", tuple(src.files), float(src.weight)) for name, src in d.sources.items()]


def builders(config: ml_collections.ConfigDict, **build_options) -> dict[str, text_files.TextFiles]:
    """Builds (once per content and options) each source's TFDS dataset: dataset name
    (`config.data.name`, or `<name>_<source>` for each of `config.data.sources`) -> builder.
    With `config.data.build="datatrove"`, `lm.data.build.run` builds it (`build_options`:
    its executor, workers, tasks...); a build queued on Slurm is left out until it is done.
    Every source's inputs are hashed, and checked if not built, (`lm.data.sources.check_inputs`) before
    any is built. Builds into one data cache take turns (`_exclusive`): a second build of
    the same corpus waits, then reuses the first's dataset. Raises CorpusError (naming the
    source, the file and the fix) for a data cache or a file that cannot be used."""
    tfds.disable_progress_bar()
    with _exclusive(data_dir(config), _data_dir_field(config)):
        planned = {}
        for (name, files, _), source in zip(sources(config), list(config.data.sources) or [""]):
            with _naming(source):
                options = _with_build(config, text_files.corpus_options(config.data, source))
                builder = text_files.builder(name, resolve_files(files), options, data_dir(config))
                if not text_files.is_built(builder):
                    check_inputs(builder.builder_config.files, options)
            planned[name] = (source, builder)
        built = {}
        for name, (source, builder) in planned.items():
            with _naming(source):
                if config.data.build == "datatrove":
                    from lm.data import build  # datatrove: imported by the builds that use it

                    build.run(builder, **build_options)
                    if not build.is_built(builder):
                        continue
                builder.download_and_prepare()
            built[name] = builder
        return built


@contextlib.contextmanager
def _naming(source: str):
    """A CorpusError raised inside, as one message naming the source (`config.data.sources.<source>`)."""
    try:
        yield
    except CorpusError as e:
        raise CorpusError(f"config.data.sources.{source}: {e}" if source else str(e)) from None


def _with_build(config: ml_collections.ConfigDict, options: dict) -> dict:
    """A corpus's options, naming its build where it is not the in-memory one: near dedup
    differs a little between builds, so each build is its own dataset (and token cache)."""
    return options if config.data.build == "memory" else {**options, "build": config.data.build}


def prepare(config: ml_collections.ConfigDict, tokenizer_path: str | None, **tokenize) -> Corpus:
    """Builds the corpus datasets, fits the tokenizer and tokenizes each split once.

    The tokenizer is fitted to the train split(s) (or loaded from data.sentencepiece.model,
    or from its cache: `lm.data.vocabulary`) and saved at `tokenizer_path`; if that file
    exists (a resumed run), it is loaded instead, so ids never change under a run.
    `tokenizer_path=None` (`lm.prepare`, which has no run) saves it nowhere: the cached
    tokenizer is the one a run then fits, and so are its token caches. `tokenize`:
    `token_streams`' options (executor, workers, verbose). Processes preparing into one
    data cache take turns (a sweep's parallel runs): TFDS renames a finished build into
    place, and two builds of one dataset at once collide.
    """
    with _exclusive(data_dir(config), _data_dir_field(config)):
        return _prepare(config, tokenizer_path, tokenize)


_held = threading.local()  # the data caches this thread holds the lock of: `_exclusive` is re-entrant


@contextlib.contextmanager
def _exclusive(directory: str, field: str = "config.data.data_dir"):
    """Holds `directory`'s lock (`.lock` in it, created with the directory): other processes
    (and threads) wait; the holding thread may enter again (`prepare` runs `builders`). Raises
    CorpusError naming `field` when the directory cannot be created or written."""
    key = os.path.realpath(directory)
    held = vars(_held).setdefault("dirs", set())
    if key in held:
        yield
        return
    try:
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a directory")
        os.makedirs(directory, exist_ok=True)
        handle = open(os.path.join(directory, ".lock"), "a", encoding="utf-8")
        if not os.access(directory, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise CorpusError(f"{field}={directory!r} cannot be the data cache: {e.strerror or e}. Fix: set "
                          "config.data.data_dir (or $LM_DATA_DIR) to a directory this user can create and "
                          "write.") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if the process dies
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _data_dir_field(config: ml_collections.ConfigDict) -> str:
    """Where the data cache's path came from, for errors about it."""
    if config.data.data_dir:
        return "config.data.data_dir"
    return "$LM_DATA_DIR" if os.environ.get("LM_DATA_DIR") else "the default data cache (config.data.data_dir)"


def _prepare(config: ml_collections.ConfigDict, tokenizer_path: str | None, tokenize: dict) -> Corpus:
    built = builders(config)
    if tokenizer_path and os.path.exists(tokenizer_path):
        tokenizer = tokenizers.load(tokenizer_path)
    else:
        tokenizer = fit_tokenizer(config, built)
        if tokenizer_path:
            tokenizers.save(tokenizer, tokenizer_path)
    per_source = {split: [] for split in SPLITS}
    for builder in built.values():
        streams = token_streams(builder, tokenizer, token_dir(config, builder, tokenizer), **tokenize)
        for split in SPLITS:
            per_source[split].append(streams[split])
    tokens, documents, bytes_per_token = {}, {}, {}
    for split in SPLITS:
        tokens[split], documents[split] = _join([(t, d) for t, d, _ in per_source[split]], tokenizer.eos_id)
        _check_split(config, split, tokens[split], documents[split])
        bytes_per_token[split] = sum(b for _, _, b in per_source[split]) / max(len(tokens[split]), 1)
    weights = [weight for _, _, weight in sources(config)]
    mixture = tuple((w, t, d) for w, (t, d, _) in zip(weights, per_source["train"])) if len(weights) > 1 else ()
    reports = {name: text_files.report(builder) for name, builder in built.items()}
    return Corpus(tokenizer, tokens, documents, bytes_per_token, reports, mixture)


def token_dir(config: ml_collections.ConfigDict, builder: text_files.TextFiles,
              tokenizer: tokenizers.Tokenizer) -> str:
    """Where a built dataset's token cache for `tokenizer` lives."""
    return os.path.join(data_dir(config), "tokens", builder.builder_config.name, _tokenizer_id(tokenizer))


def _join(streams: list[tuple[np.ndarray, np.ndarray]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One stream (joined by <eos>) and document table from several."""
    if len(streams) == 1:
        return streams[0]
    pieces, tables, offset = [], [], 0
    for tokens, documents in streams:
        if pieces:
            pieces.append(np.array([eos_id], np.int32))
            offset += 1
        pieces.append(np.asarray(tokens))
        tables.append(documents + np.array([offset, 0]))
        offset += len(tokens)
    return np.concatenate(pieces), np.concatenate(tables)


def _check_split(config: ml_collections.ConfigDict, split: str, tokens: np.ndarray, documents: np.ndarray) -> None:
    if len(tokens) < config.data.seq_len + 1 and config.data.packing == "stream":
        raise CorpusError(
            f"the {split} split of config.data.files has {len(tokens)} tokens, fewer than "
            f"one row of config.data.seq_len + 1 = {config.data.seq_len + 1}. Fix: use more text, "
            "a shorter seq_len, or a different data.validation_fraction.")
    if not len(documents):
        raise CorpusError(f"the {split} split of config.data.files has no documents. Fix: use more "
                          "text, or a different data.validation_fraction / data.split.")


def fit_tokenizer(config: ml_collections.ConfigDict, built: dict[str, text_files.TextFiles]) -> tokenizers.Tokenizer:
    """The config's tokenizer for `built`, fitted once and cached (`lm.data.vocabulary.fit`)."""
    return vocabulary.fit(config, built, os.path.join(data_dir(config), "tokenizers"))


texts = vocabulary.texts  # a built split's documents: read here by the commands, tests and benches


def _tokenizer_id(tokenizer: tokenizers.Tokenizer) -> str:
    spec = json.dumps(tokenizer.to_json(), sort_keys=True, ensure_ascii=False)
    return f"{tokenizer.kind}_{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def token_streams(builder: text_files.TextFiles, tokenizer: tokenizers.Tokenizer, cache_dir: str,
                  **tokenize) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """split -> (stream, documents, UTF-8 bytes) of the built dataset, read from its token
    cache in `cache_dir` (the stream memory-mapped).

    Splits not cached yet are tokenized first, by `lm.data.build.tokens.tokenize` (parallel
    tasks over the records, joined by streaming; `tokenize`: its executor, workers,
    executor_options, verbose, part_bytes); the ids are `tokenizer.encode`'s."""
    missing = {split: (builder.info.splits[split].num_examples, builder.info.splits[split].num_bytes)
               for split in SPLITS if not token_cache.is_cached(cache_dir, split)}
    if missing:
        from lm.data.build import tokens  # datatrove: imported when there is something to tokenize

        os.makedirs(cache_dir, exist_ok=True)
        tokens.tokenize(builder.data_dir, missing, tokenizer, cache_dir, **tokenize)
    return {split: token_cache.load(cache_dir, split) for split in SPLITS}
