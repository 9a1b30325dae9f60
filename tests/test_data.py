"""Data: the TFDS builder, tokenizers, the token cache, rows and batches (batch = f(seed, step))."""

import numpy as np
import pytest
from helpers import run_cli, tiny_config

from lm import objectives
from lm.data import batches, corpora, rows, text_files, tokenizers
from lm.data.corpus import builders, prepare, texts
from lm.data.documents import CorpusError
from lm.errors import UsageError


def test_char_tokenizer_round_trips_and_maps_unknown_characters():
    tok = tokenizers.CharTokenizer.train(["hello world\n", "ünïcode"])
    text = "hello ünïcode\n"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("hex!")
    assert ids[-1] == tok.unk_id and ids.dtype == np.int32
    assert min(tok.encode("hello")) >= 3  # 0, 1, 2 are <pad>, <eos>, <unk>
    assert tokenizers.from_json(tok.to_json()).encode(text).tolist() == tok.encode(text).tolist()


def test_byte_tokenizer_round_trips_any_text():
    tok = tokenizers.ByteTokenizer()
    text = "naïve café, 東京\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 259


def test_shakespeare_split_matches_nanogpt(tmp_path):
    corpus = prepare(tiny_config(), str(tmp_path / "tokenizer.json"))
    assert len(corpus.tokens["train"]) == 1_003_854
    assert len(corpus.tokens["validation"]) == 111_540
    assert corpus.tokenizer.vocab_size == 65 + 3
    assert corpus.bytes_per_token["validation"] == 1.0  # ASCII, one character per token
    text = open(corpora.path("tinyshakespeare"), encoding="utf-8").read()
    assert corpus.tokenizer.decode(corpus.tokens["validation"][:200]) == text[1_003_854:1_004_054]
    # A second run reuses the saved tokenizer and the cached token streams.
    again = prepare(tiny_config(), str(tmp_path / "tokenizer.json"))
    assert np.array_equal(again.tokens["train"][-100:], corpus.tokens["train"][-100:])


def test_tail_split_of_a_text_file_rebuilds_the_text(tmp_path):
    path = tmp_path / "doc.txt"
    text = "".join(f"line {i}\n" for i in range(30_000))
    path.write_text(text)
    config = tiny_config(data__files=(str(path),), data__name="doc", data__validation_fraction=0.25)
    builder = text_files.builder("doc", [str(path)], text_files.corpus_options(config.data), str(tmp_path))
    builder.download_and_prepare()
    sources = builder.as_data_source()
    splits = {s: "".join(r["text"].decode() for r in sources[s]) for s in ("train", "validation")}
    assert splits["train"] + splits["validation"] == text
    assert len(splits["validation"]) == len(text) - int(len(text) * 0.75)


def test_non_utf8_file_fails_with_a_fix(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1") * 100)
    config = tiny_config(data__files=(str(path),), data__name="latin1")
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8.*Fix"):
        prepare(config, str(tmp_path / "tokenizer.json"))


def test_too_little_text_for_one_row_is_a_config_error(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words of text\n" * 3)
    config = tiny_config(data__files=(str(path),), data__name="tiny", data__seq_len=64)
    with pytest.raises(CorpusError, match=r"validation split.*fewer than one row"):
        prepare(config, str(tmp_path / "tokenizer.json"))


STREAM = np.arange(10_000, dtype=np.int32)


def test_train_batches_are_a_function_of_seed_and_step():
    a = batches.per_process(rows.train_rows(STREAM, 16, seed=7), 8)
    b = batches.per_process(rows.train_rows(STREAM, 16, seed=7), 8)
    c = batches.per_process(rows.train_rows(STREAM, 16, seed=8), 8)
    for step in (0, 5, 1234):
        assert np.array_equal(a[step]["tokens"], b[step]["tokens"])
        assert not np.array_equal(a[step]["tokens"], c[step]["tokens"])
    assert a[3]["tokens"].shape == (8, 17)
    windows = a[3]["tokens"]
    assert np.all(np.diff(windows, axis=1) == 1)  # contiguous windows of the stream


def test_each_epoch_visits_every_window_once_at_its_own_shift():
    seq_len, per_epoch = 16, (len(STREAM) - 16) // 16
    data = batches.per_process(rows.train_rows(STREAM, seq_len, seed=0), 1)
    for epoch in range(2):
        starts = np.sort([data[epoch * per_epoch + i]["tokens"][0, 0] for i in range(per_epoch)])
        assert len(set(starts)) == per_epoch and set(np.diff(starts)) == {seq_len}
        assert starts[0] < seq_len and starts[-1] + seq_len + 1 <= len(STREAM)


def test_processes_read_disjoint_rows_whose_union_is_the_global_batch():
    whole = batches.per_process(rows.train_rows(STREAM, 16, seed=3), 8)
    parts = [batches.per_process(rows.train_rows(STREAM, 16, seed=3), 8, process_index=p, process_count=2)
             for p in range(2)]
    for step in (0, 9):
        np.testing.assert_array_equal(np.concatenate([p[step]["tokens"] for p in parts]), whole[step]["tokens"])


def test_iterator_state_resumes_at_the_same_batch():
    dataset = batches.per_process(rows.train_rows(STREAM, 16, seed=1), 4)
    it = batches.iterate(dataset, num_threads=2, prefetch=4)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = next(it)["tokens"]
    resumed = batches.iterate(dataset, num_threads=2, prefetch=4)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], expected)


def test_eval_covers_every_target_once_and_pads_with_zero_weight_rows():
    stream = np.arange(3, 1003, dtype=np.int32)  # ids >= 3: no special tokens
    dataset = batches.per_process(rows.validation_rows(stream, 16, 8, pad_id=0), 8)
    scored = np.concatenate([dataset[i]["tokens"] for i in range(len(dataset))])
    real = scored[scored[:, 0] != 0]
    targets = real[:, 1:].ravel()
    assert np.array_equal(targets, stream[1:1 + len(targets)])  # in order, no overlap, no gap
    assert len(stream) - 1 - len(targets) < 16  # only a partial last window is dropped
    assert np.all(scored[scored[:, 0] == 0] == 0) and len(scored) % 8 == 0
    assert len(batches.per_process(rows.validation_rows(stream, 16, 8, pad_id=0, num_batches=2), 8)) == 2


def packed_corpus(num_docs: int = 300, seed: int = 0):
    """A token stream of documents of varied lengths, joined by <eos> as the cache stores it."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, num_docs)
    docs = [rng.integers(3, 50, n).astype(np.int32) for n in lengths]
    pieces = [x for d in docs for x in (d, np.array([1], np.int32))][:-1]
    starts = np.cumsum(lengths + 1) - lengths - 1
    return np.concatenate(pieces), np.stack([starts, lengths], 1), docs


def test_packing_places_every_document_and_its_eos_once_with_restarting_positions():
    tokens, documents, docs = packed_corpus()
    packed = rows.PackedRows(tokens, documents, 31, 3, 1, 0)
    plan, covered = packed.epoch(0), {d: [] for d in range(len(docs))}
    for i, pieces in enumerate(plan):
        row = packed[i]
        for segment, (doc, offset, size) in enumerate(pieces, start=1):
            at = row["segment_ids"] == segment
            expected = (docs[doc].tolist() + [1])[offset:offset + size]  # the document, then <eos>
            assert row["tokens"][at].tolist() == expected
            assert row["positions"][at].tolist() == list(range(size))  # restart per piece
            covered[doc].append((offset, size))
        assert (row["tokens"][row["segment_ids"] == 0] == 0).all()  # the rest is <pad>
    for doc, spans in covered.items():  # each token of each document exactly once
        assert sum(size for _, size in spans) == len(docs[doc]) + 1
        assert sorted(o for o, _ in spans) == list(range(0, len(docs[doc]) + 1, 32))
    batch = batches.per_process(rows.train_rows(tokens, 31, seed=3, packing="pack", documents=documents), 4)[7]
    assert batch["tokens"].shape == batch["segment_ids"].shape == batch["positions"].shape == (4, 32)


def test_packed_batches_are_a_function_of_seed_and_step_and_split_over_processes():
    tokens, documents, _ = packed_corpus()
    a = batches.per_process(rows.train_rows(tokens, 31, seed=7, packing="pack", documents=documents), 8)
    b = batches.per_process(rows.train_rows(tokens, 31, seed=7, packing="pack", documents=documents), 8)
    halves = [batches.per_process(rows.train_rows(tokens, 31, seed=7, packing="pack", documents=documents), 8,
                                  process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 3, 500):  # 500 is several epochs in
        for key in ("tokens", "segment_ids", "positions"):
            assert np.array_equal(a[step][key], b[step][key])
            assert np.array_equal(np.concatenate([h[step][key] for h in halves]), a[step][key])


def test_packed_evaluation_covers_every_validation_document_once():
    tokens, documents, docs = packed_corpus(50)
    data = batches.per_process(rows.validation_rows(tokens, 31, 4, pad_id=0, packing="pack", documents=documents), 4)
    scored = sum(float(objectives.causal_lm(data[i], 0).weights_BL.sum()) for i in range(len(data)))
    pieces = sum(-(-(len(d) + 1) // 32) for d in docs)  # the first token of each piece has no input
    assert scored == sum(len(d) + 1 for d in docs) - pieces


def test_sentencepiece_bpe_2000_trains_fast_and_round_trips_the_validation_text_exactly(tmp_path):
    import time

    from lm.configs import shakespeare_bpe
    config = shakespeare_bpe.get_config()
    builder = builders(config)[config.data.name]
    start = time.perf_counter()
    tokenizer = tokenizers.train_sentencepiece(texts(builder.as_data_source()["train"]), 2000, "bpe")
    assert time.perf_counter() - start < 60
    assert tokenizer.vocab_size == 2000
    text = open(corpora.path("tinyshakespeare"), encoding="utf-8").read()
    validation = text[int(len(text) * 0.9):]  # the text as is: newlines, blank lines, punctuation
    ids = tokenizer.encode(validation)
    assert tokenizer.decode(ids) == validation
    assert 2.5 < len(validation) / len(ids) < 4  # BPE compresses; characters would give 1.0
    assert ids.min() > tokenizer.eos_id  # no <pad>/<eos>/<unk> inside text
    again = tokenizers.from_json(tokenizer.to_json())  # what a run's workdir stores
    assert again.encode(validation).tolist() == ids.tolist()


def test_sentencepiece_vocabulary_larger_than_the_corpus_supports_is_one_clear_error(tmp_path):
    from lm.configs import shakespeare_bpe
    config = shakespeare_bpe.get_config()
    config.data.sentencepiece.vocab_size = 500_000
    with pytest.raises(CorpusError, match=r"vocab_size=500000.*more than this corpus supports.*Fix: set "
                                          r"the vocab size to at most \d+"):
        prepare(config, str(tmp_path / "tokenizer.json"))


def test_sampled_text_shows_each_end_of_document_as_a_paragraph_break():
    from lm.inference.text import decode_documents
    tok = tokenizers.CharTokenizer("abc")
    ids = np.concatenate([tok.encode("ab"), [tok.eos_id], tok.encode("c")])
    assert decode_documents(tok, ids) == "ab\n\nc"


def test_sampling_never_draws_an_objectives_extra_ids_which_are_not_text():
    import flax.linen as nn
    import jax

    from lm.inference.decode import generate_windowed
    from lm.inference.sampling import Sampling
    from lm.model import ModelConfig, build
    text_vocab = 11  # the model has 10 more ids: task tokens and sentinels of a mixture
    model = build(ModelConfig(vocab_size=text_vocab + 10, max_len=8, num_layers=1, num_heads=2, d_model=16,
                              head_dim=8, d_ff=32, init_std=2.0))  # large weights: flat, wild logits
    params = nn.meta.unbox(model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    draw = lambda limit: generate_windowed(model, params, np.array([3, 4], np.int32), 0, max_new_tokens=300, window=8,
                                           sampling=Sampling(temperature=2.0), seed=1, text_vocab_size=limit)
    assert draw(0).max() >= text_vocab  # unrestricted, the model does draw extra ids
    assert draw(text_vocab).max() < text_vocab


def test_packed_rows_read_from_many_threads_at_an_epoch_boundary_match_a_sequential_read():
    from concurrent.futures import ThreadPoolExecutor
    tokens, documents, _ = packed_corpus()
    sequential = rows.PackedRows(tokens, documents, 31, 4, 1, 0)
    first_epoch = len(sequential.epoch(0))
    indices = list(range(first_epoch - 20, first_epoch + 20)) * 4  # straddle the boundary, repeatedly
    expected = {i: sequential[i]["tokens"] for i in indices}
    for _ in range(5):
        concurrent = rows.PackedRows(tokens, documents, 31, 4, 1, 0)
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda i, rows_of=concurrent: (i, rows_of[i]["tokens"]), indices[::-1]))
        assert all(np.array_equal(row, expected[i]) for i, row in got)
        assert concurrent.epoch_ends == sequential.epoch_ends[:len(concurrent.epoch_ends)]


def test_incremental_decoding_emits_each_character_once_complete_and_adds_up_to_the_whole_decode():
    tokenizer = tokenizers.train_sentencepiece(iter(["The quick brown fox jumps over the lazy dog. " * 40]), 300)
    text = "naïve café 東京, the fox — ok 🙂 dog"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # byte fallback: some characters span several ids
    decoder = tokenizers.IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == text
    assert "" in deltas and not any("\ufffd" in d for d in deltas)  # held back until whole, never garbled
    cut = ids[:max(k for k in range(len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))]  # mid-character
    decoder = tokenizers.IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in cut) + decoder.flush() == tokenizer.decode(cut)


def test_a_sentencepiece_model_that_is_missing_or_not_one_is_a_usage_error_naming_the_file(tmp_path):
    (tmp_path / "garbage.model").write_bytes(b"not a model\n")
    (tmp_path / "empty.model").write_bytes(b"")
    for name, problem in [("garbage.model", "is not a SentencePiece model"),
                          ("empty.model", "is not a SentencePiece model"),
                          ("missing.model", r"cannot read the SentencePiece model .* \(No such file or directory\)")]:
        with pytest.raises(tokenizers.TokenizerError, match=problem) as error:
            tokenizers.SentencePieceTokenizer.from_file(str(tmp_path / name))
        assert str(tmp_path / name) in str(error.value) and "Fix: give a .model file" in str(error.value)
    assert issubclass(tokenizers.TokenizerError, UsageError)


def test_tokenizer_train_refuses_an_output_path_that_exists_or_cannot_be_a_file_before_training(tmp_path):
    from lm.files.paths import check_new_file

    (tmp_path / "old.model").write_bytes(b"keep me")
    check_new_file(str(tmp_path / "new" / "bpe.model"), "--output")  # missing directories are made
    for output, problem in [(tmp_path / "old.model", "exists, and this command never replaces a file"),
                            (tmp_path, "is a directory"),
                            (tmp_path / "old.model" / "bpe.model",
                             f"{tmp_path / 'old.model'} is a file, not a directory")]:
        with pytest.raises(UsageError, match=problem):
            check_new_file(str(output), "--output")
    result = run_cli("lm.tokenizer", "train", "--config=configs/shakespeare_bpe.py",
                     f"--output={tmp_path / 'old.model'}", check=False)
    assert result.returncode == 2 and result.stderr.startswith("lm: error: --output="), result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "old.model").read_bytes() == b"keep me"
