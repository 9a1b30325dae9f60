"""Real corpora: reading .txt/.jsonl(.gz), quality rules, deduplication, hash split, report."""

import gzip
import json
import os
import random
import string

import pytest
from helpers import tiny_config

from lm.config import ConfigError
from lm.data import batches, text_files
from lm.data.corpus import builders, prepare, texts
from lm.data.documents import CorpusError, read_documents

PROSE = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old "
         "wooden fence near the river bank and thinks about the harvest season ahead")
OTHER = ("A gentle rain fell over the quiet village as children ran home from school carrying "
         "their books and laughing about the strange teacher who spoke only in riddles today")
THIRD = ("Scientists at the northern observatory reported a faint signal from a distant galaxy "
         "which they believe could reveal new details about how the first stars were formed")


def fillers(count: int, seed: int = 0) -> list[str]:
    """Distinct, clean documents of random letter-only words (no two near each other)."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
    return [" ".join(word() for _ in range(30)) for _ in range(count)]


def corpus_config(tmp_path, files, **overrides):
    defaults = dict(data__files=tuple(str(f) for f in files), data__name="test", data__split="hash",
                    data__validation_fraction=0.2, data__data_dir=str(tmp_path / "data"))
    return tiny_config(**{**defaults, **overrides})


def built_texts(config) -> tuple[dict, list[str]]:
    builder = builders(config)[config.data.name]
    sources = builder.as_data_source()
    documents = [t for split in ("train", "validation") for t in texts(sources[split])]
    return text_files.report(builder), documents


def test_cleaning_removes_low_quality_exact_and_near_duplicates_and_reports_them(tmp_path):
    near = PROSE.replace("old wooden fence", "old painted fence")  # one word of 28 changed
    docs = [PROSE, OTHER, PROSE, near, "too short", "1234 5678 #### $$$$ %%%% 9999 0000 @@@@ ++++ ====",
            "same line\nsame line\nsame line\nsame line\nanother line here", THIRD] + fillers(40)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    config = corpus_config(tmp_path, [path], data__filters__min_chars=20,
                           data__filters__max_non_alpha_fraction=0.5,
                           data__filters__max_duplicate_line_fraction=0.3,
                           data__dedup__near_threshold=0.7, data__dedup__shingle_words=3)
    report, texts = built_texts(config)
    assert sorted(texts) == sorted([PROSE, OTHER, THIRD] + fillers(40))
    assert report["read"] == {"documents": 48, "chars": sum(map(len, docs))}
    assert report["dropped"] == {
        "min_chars": {"documents": 1, "chars": len("too short")},
        "max_non_alpha_fraction": {"documents": 1, "chars": len(docs[5])},
        "max_duplicate_line_fraction": {"documents": 1, "chars": len(docs[6])}}
    assert report["exact_duplicates"] == {"documents": 1, "chars": len(PROSE)}
    assert report["near_duplicates"] == {"documents": 1, "chars": len(near)}
    assert report["kept"]["documents"] == 43
    assert sum(s["documents"] for s in report["splits"].values()) == 43


def test_gopher_style_rules_each_catch_their_pattern():
    from lm.data import cleaning
    assert cleaning.duplicate_line_fraction("a\nb\na\na") == 0.5
    assert cleaning.non_alpha_fraction("ab 12") == 0.5
    assert cleaning.top_bigram_fraction("buy now buy now buy now") == 1.0
    assert cleaning.duplicate_ngram_fraction(" ".join(["x y z w v"] * 3), 5) == 1.0
    assert cleaning.duplicate_ngram_fraction(PROSE, 5) == 0.0


def test_reads_txt_paragraphs_and_gzipped_jsonl_with_unicode_normalisation(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph,\ntwo lines.\n\n\nSecond ﬁne paragraph.\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "Caf\u0065\u0301 in a gzip"}) + "\n\n")
    paragraphs = [d.text for d in read_documents(str(tmp_path / "a.txt"), "paragraph", "NFKC")]
    assert paragraphs == ["First paragraph,\ntwo lines.", "Second fine paragraph."]
    jsonl = [d.text for d in read_documents(str(tmp_path / "b.jsonl.gz"), "file", "NFC")]
    assert jsonl == ["Caf\u00e9 in a gzip"]


def test_hash_split_puts_a_document_in_the_same_split_whatever_else_is_in_the_corpus(tmp_path):
    docs = [f"document number {i} " + PROSE for i in range(200)]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "half.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[::-2]))

    def validation(name):
        config = corpus_config(tmp_path, [tmp_path / name], data__name=name.split(".")[0])
        return set(texts(builders(config)[config.data.name].as_data_source()["validation"]))

    everything, half = validation("all.jsonl"), validation("half.jsonl")
    assert 20 < len(everything) < 60  # about 20% of 200
    assert half == everything & set(docs[::-2])


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"body": "no text field"}\n', r"bad\.jsonl:2 has no string field \"text\""),
    (b'{"text": "fine"}\nnot json\n', r"bad\.jsonl:2 is not JSON"),
    ('{"text": "café"}\n'.encode("latin-1"), r"bad\.jsonl:1 is not valid UTF-8"),
])
def test_malformed_jsonl_names_the_line_and_the_fix(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message + ".*Fix"):
        list(read_documents(str(path)))


def test_a_failed_build_leaves_no_dataset_that_looks_complete(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": PROSE}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": OTHER}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
    config = corpus_config(tmp_path, [good, bad])
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        builders(config)
    built = [root for root, _, files in os.walk(tmp_path / "data") if "dataset_info.json" in files]
    assert built == []


def test_an_empty_corpus_is_one_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(CorpusError, match=r"no document .* survived cleaning.*Fix"):
        builders(corpus_config(tmp_path, [tmp_path / "empty.txt"]))


def test_a_directory_is_read_recursively_and_a_pattern_matching_nothing_is_an_error(tmp_path):
    from lm.config import resolve_files
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("x")
    (tmp_path / "notes.md").write_text("not a corpus file")
    assert resolve_files([str(tmp_path)]) == [str(tmp_path / "sub" / "a.txt")]
    with pytest.raises(ConfigError, match=r"config\.data\.files='.*\*\.jsonl' matches no corpus file"):
        resolve_files([str(tmp_path / "*.jsonl")])


def test_a_mixture_draws_training_rows_in_proportion_to_the_weights_and_validates_on_all(tmp_path):
    import ml_collections
    import numpy as np

    lower, upper = tmp_path / "lower.txt", tmp_path / "upper.txt"
    lower.write_text("\n\n".join(fillers(300, seed=1)))
    upper.write_text("\n\n".join(fillers(300, seed=2)).upper())
    config = corpus_config(tmp_path, [lower], data__unit="paragraph", data__packing="pack",
                           data__seq_len=31, train__batch_size=8)
    config.data.sources = ml_collections.ConfigDict({
        "lower": dict(files=(str(lower),), weight=3.0), "upper": dict(files=(str(upper),), weight=1.0)})
    corpus = prepare(config, str(tmp_path / "tokenizer.json"))
    decode = corpus.tokenizer.decode
    train_batches = batches.train_data(config, corpus)
    rows = [decode(row) for step in range(50) for row in train_batches[step]["tokens"]]
    from_upper = sum(any(c.isupper() for c in row) for row in rows)
    assert all(row.islower() or row.isupper() for row in rows)  # a row comes from one source
    assert from_upper == len(rows) // 4  # weights 3:1
    assert np.array_equal(batches.train_data(config, corpus)[17]["tokens"], train_batches[17]["tokens"])
    validation = decode(corpus.tokens["validation"])
    assert any(c.isupper() for c in validation) and any(c.islower() for c in validation)
    assert set(corpus.reports) == {"test_lower", "test_upper"}


def test_a_mixture_source_without_files_or_weight_is_a_config_error():
    import ml_collections

    from lm import config as config_lib
    config = tiny_config()
    config.data.sources = ml_collections.ConfigDict({"web": dict(files=("x.txt",))})
    with pytest.raises(ConfigError, match=r"config\.data\.sources\.web=.*files and weight.*Fix"):
        config_lib.validate(config)
    config.data.sources = ml_collections.ConfigDict({"web": dict(files=("/no/such.jsonl",), weight=1.0)})
    with pytest.raises(ConfigError, match="matches no corpus file"):
        config_lib.validate(config)


# --- encodings of the same text give the same documents (CRLF, CR, byte-order marks, UTF-16/32, .gz) ---

def shakespeare_slice(chars: int = 12_000) -> str:
    from lm.data import corpora
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        return f.read(chars)


def encodings_of(text: str) -> dict[str, bytes]:
    """The same text as Windows, classic Mac OS and BOM-marked files would hold it."""
    crlf = text.replace("\n", "\r\n")
    return {"lf": text.encode(), "crlf": crlf.encode(), "cr": text.replace("\n", "\r").encode(),
            "utf8_bom": b"\xef\xbb\xbf" + text.encode(), "utf8_bom_crlf": b"\xef\xbb\xbf" + crlf.encode(),
            "utf16le_bom_crlf": crlf.encode("utf-16"), "utf16be_bom": b"\xfe\xff" + text.encode("utf-16-be"),
            "utf32_bom": text.encode("utf-32")}


@pytest.mark.parametrize("unit", ["file", "paragraph", "line"])
def test_a_text_file_gives_the_same_documents_whatever_its_line_endings_or_byte_order_mark(tmp_path, unit):
    text = shakespeare_slice(3_000)
    read = {}
    for name, data in encodings_of(text).items():
        for suffix, compress in ((".txt", bytes), (".txt.gz", gzip.compress)):
            path = tmp_path / f"{name}{suffix}"
            path.write_bytes(compress(data))
            read[path.name] = [d.text for d in read_documents(str(path), unit)]
    expected = read["lf.txt"]
    assert len(expected) == {"file": 1, "paragraph": text.count("\n\n") + 1, "line": len(text.splitlines())
                             - text.count("\n\n")}[unit]
    assert all("\r" not in doc and "\ufeff" not in doc for doc in expected)
    assert {name: docs for name, docs in read.items() if docs != expected} == {}


def test_a_jsonl_file_gives_the_same_documents_whatever_its_line_endings_or_byte_order_mark(tmp_path):
    texts = [p for p in shakespeare_slice(3_000).split("\n\n") if p.strip()]
    lines = lambda docs, end: "".join(json.dumps({"text": t}) + end for t in docs)
    variants = {
        "lf": lines(texts, "\n").encode(),
        "crlf_lines_and_values": lines([t.replace("\n", "\r\n") for t in texts], "\r\n").encode(),
        "cr_lines_and_values": lines([t.replace("\n", "\r") for t in texts], "\r").encode(),
        "utf8_bom": b"\xef\xbb\xbf" + lines(texts, "\n").encode(),
        "utf16_bom_crlf": lines(texts, "\r\n").encode("utf-16"),
    }
    read = {}
    for name, data in variants.items():
        for suffix, compress in ((".jsonl", bytes), (".jsonl.gz", gzip.compress)):
            (tmp_path / f"{name}{suffix}").write_bytes(compress(data))
            read[name + suffix] = [(d.text, d.source.rsplit(":", 1)[1])
                                   for d in read_documents(str(tmp_path / f"{name}{suffix}"))]
    assert [text for text, _ in read["lf.jsonl"]] == texts
    assert {name: docs for name, docs in read.items() if docs != read["lf.jsonl"]} == {}  # line numbers too


def test_utf16_without_a_byte_order_mark_is_named_as_such_not_read_as_text_full_of_nuls(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(shakespeare_slice(500).encode("utf-16-le"))
    with pytest.raises(CorpusError, match=r"notes\.txt looks like UTF-16 or UTF-32 without a byte-order mark.*Fix"):
        list(read_documents(str(path)))


def test_an_invalid_byte_is_reported_at_its_line_in_crlf_and_utf16_files_too(tmp_path):
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\ncaf\xe9\r\n")
    (tmp_path / "utf16.txt").write_bytes("one\ntwo\n".encode("utf-16") + b"\x00\xd8")  # an unpaired surrogate
    with pytest.raises(CorpusError, match=r"crlf\.txt is not valid UTF-8 \(line 3, byte 13.*Fix"):
        list(read_documents(str(tmp_path / "crlf.txt")))
    with pytest.raises(CorpusError, match=r"utf16\.txt is not valid UTF-16 \(line 3, .*Fix"):
        list(read_documents(str(tmp_path / "utf16.txt")))


@pytest.mark.parametrize("unit, split", [("file", "tail"), ("paragraph", "tail"), ("line", "tail"),
                                         ("paragraph", "hash"), ("line", "hash")])
def test_crlf_and_bom_copies_of_a_corpus_build_the_same_documents_report_and_tokens(tmp_path, unit, split):
    """The issue's input: a CRLF .txt with unit="paragraph" was one document, so the hash
    split left "the validation split is empty"; unit="line" kept a \\r on every line."""
    text = shakespeare_slice()
    copies = {"lf": text.encode(), "crlf": text.replace("\n", "\r\n").encode(), "bom": b"\xef\xbb\xbf" + text.encode()}
    built = {}
    for name, data in copies.items():
        (tmp_path / f"{name}.txt").write_bytes(data)
        config = corpus_config(tmp_path, [tmp_path / f"{name}.txt"], data__name=name, data__unit=unit,
                               data__split=split, data__validation_fraction=0.1)
        corpus = prepare(config, str(tmp_path / f"{name}_{unit}_tokenizer.json"))
        report, texts = built_texts(config)
        built[name] = dict(texts=texts, report=report, tokenizer=corpus.tokenizer.to_json(),
                           tokens={split: corpus.tokens[split].tolist() for split in ("train", "validation")})
    lf = built["lf"]
    # The tail split cuts the file in two; paragraphs and lines are many documents (CRLF made one).
    assert len(lf["texts"]) == 2 if unit == "file" else len(lf["texts"]) > 50
    assert lf["report"]["splits"]["validation"]["documents"] >= 1
    assert not any("\r" in t or "\ufeff" in t for t in lf["texts"])
    for name in ("crlf", "bom"):
        for key in ("texts", "report", "tokenizer", "tokens"):
            assert built[name][key] == lf[key], f"{name}: {key}"


def test_fine_tuning_evaluation_and_results_files_are_read_the_same_whatever_their_line_endings(tmp_path):
    from lm.data.documents import read_text
    from lm.finetuning.tasks import read_jsonl
    from lm.scaling.results import read_rows

    rows = [{"prompt": "Speak:\nwho goes there?", "response": "A friend.\n", "choices": ["a\nb", "c"]},
            {"text": "Before we proceed", "label": "citizen"}]
    lf = "".join(json.dumps(r) + "\n" for r in rows)
    windows = "".join(json.dumps(r).replace("\\n", "\\r\\n") + "\r\n" for r in rows)  # CRLF in values too
    table = "parameters,tokens,val_loss\n1000,20000,3.5\n2000,40000,3.1\n"
    for name, data in {"lf": lf.encode(), "bom_crlf": b"\xef\xbb\xbf" + windows.encode(),
                       "utf16": windows.encode("utf-16")}.items():
        (tmp_path / f"{name}.jsonl").write_bytes(data)
        assert read_jsonl(str(tmp_path / f"{name}.jsonl")) == rows, name  # lm.finetune, lm.evaluate's row files
    for name, data in {"lf": table.encode(), "excel": b"\xef\xbb\xbf" + table.replace("\n", "\r\n").encode()}.items():
        (tmp_path / f"{name}.csv").write_bytes(data)
        assert read_rows(str(tmp_path / f"{name}.csv"))[0] == {"parameters": "1000", "tokens": "20000",
                                                               "val_loss": "3.5"}, name
        (tmp_path / f"{name}.txt").write_bytes(data)
        assert read_text(str(tmp_path / f"{name}.txt")) == table  # lm.evaluate --text_file, --weat


def test_building_a_corpus_leaves_nothing_in_the_system_temporary_directory(tmp_path, monkeypatch):
    # tfds's DatasetInfo.initialize_from_bucket makes an empty mkdtemp folder for every
    # dataset not yet built and, with GCS off, never removes it: one per corpus and run.
    scratch = tmp_path / "system_tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in fillers(20)))
    config = corpus_config(tmp_path, [corpus])
    builders(config)  # builds the dataset
    builders(config)  # opens the built one
    assert os.listdir(scratch) == []
