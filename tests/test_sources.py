"""Corpus inputs (lm.data.sources): Parquet, .jsonl.zst and datasets folders read as the
same documents, metadata filters, globs over many shards, and one message per bad input."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import datasets
import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from test_corpus import OTHER, PROSE, THIRD, built_texts, corpus_config, encodings_of, fillers, shakespeare_slice

from lm import config as config_lib
from lm.config import ConfigError
from lm.data import sources, text_files
from lm.data.corpus import builders
from lm.data.documents import CorpusError, read_documents

datasets.disable_progress_bars()


def rows_of(texts: list[str]) -> list[dict]:
    """Rows with metadata: a language and a score that filters can name."""
    return [{"text": t, "language": "en" if i % 3 else "fr", "score": i % 5, "url": f"https://x/{i}"}
            for i, t in enumerate(texts)]


def corpus_rows() -> list[dict]:
    near = PROSE.replace("old wooden fence", "old painted fence")
    texts = [PROSE, OTHER, PROSE, near, "too short", "windows\r\nline ends and more words here", THIRD, "   "]
    return rows_of(texts + fillers(40))


def write_as(kind: str, rows: list[dict], path) -> str:
    """`rows` written as one input of `kind`; returns its path."""
    path = str(path)
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path + ".parquet", row_group_size=7)
        return path + ".parquet"
    if kind == "hf":
        datasets.Dataset.from_list(rows).save_to_disk(path, num_shards=3)
        return path
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    compress = {"jsonl": bytes, "jsonl.gz": gzip.compress, "jsonl.zst": zstandard.ZstdCompressor().compress}[kind]
    with open(f"{path}.{kind}", "wb") as f:
        f.write(compress(lines))
    return f"{path}.{kind}"


KINDS = ("jsonl", "parquet", "jsonl.zst", "hf")


@pytest.mark.parametrize("split", ["hash", "tail"])
def test_parquet_zst_and_a_saved_dataset_holding_the_same_documents_build_the_same_dataset_and_report(
        tmp_path, split):
    rows = corpus_rows()
    built = {}
    for kind in KINDS:
        path = write_as(kind, rows, tmp_path / kind.replace(".", "_"))
        config = corpus_config(tmp_path, [path], data__name=kind.replace(".", "_"), data__split=split,
                               data__filters__min_chars=20, data__dedup__near_threshold=0.7,
                               data__dedup__shingle_words=3)
        built[kind] = built_texts(config)
    report, texts = built["jsonl"]  # today's reader: .jsonl is read as it always was
    assert report["exact_duplicates"]["documents"] == 1 and report["near_duplicates"]["documents"] == 1
    assert report["read"]["documents"] == 47  # the blank row is no document
    assert "windows\nline ends and more words here" in texts  # CRLF in a value became LF
    assert {kind: b for kind, b in built.items() if b != built["jsonl"]} == {}


@pytest.mark.parametrize("kind", KINDS)
def test_a_metadata_filter_drops_exactly_the_rows_it_names(tmp_path, kind):
    rows = rows_of(fillers(60))
    path = write_as(kind, rows, tmp_path / "web")
    where = 'language == "en" and score >= 2'
    kept = [(r["text"], {"score": r["score"]}) for r in rows if r["language"] == "en" and r["score"] >= 2]
    assert 0 < len(kept) < len(rows)
    assert list(sources.read(path, where=where, columns=("score",))) == kept
    assert [t for t, _ in sources.read(path, where="score != 0 and score < 1")] == []
    metadata = next(sources.read(path))[1]
    assert metadata == {k: v for k, v in rows[0].items() if k != "text"}
    config = corpus_config(tmp_path, [path], data__where=where)
    config_lib.validate(config)
    assert sorted(built_texts(config)[1]) == sorted(t for t, _ in kept)


def test_each_source_of_a_mixture_takes_its_own_text_column_and_filter(tmp_path):
    web = write_as("parquet", rows_of(fillers(30, seed=1)), tmp_path / "web")
    code = [{"content": t, "stars": i} for i, t in enumerate(fillers(30, seed=2))]
    code_path = write_as("jsonl.zst", code, tmp_path / "code")
    config = corpus_config(tmp_path, [web])
    config.data.sources = ml_collections.ConfigDict({
        "web": dict(files=(web,), weight=1.0, where='language == "fr"'),
        "code": dict(files=(code_path,), weight=1.0, text_column="content", where="stars >= 10")})
    config_lib.validate(config)
    built = builders(config)
    got = {name: sorted(built_texts_of(b)) for name, b in built.items()}
    assert got == {"test_web": sorted(r["text"] for r in rows_of(fillers(30, seed=1)) if r["language"] == "fr"),
                   "test_code": sorted(r["content"] for r in code if r["stars"] >= 10)}
    # A run records a source's own options with its corpus, so a resume cannot change them.
    from lm.training.setup import corpus_fingerprints
    record = corpus_fingerprints(config)
    assert record["code"][2] == {"text_column": "content", "where": "stars >= 10"}
    assert record["web"][2] == {"where": 'language == "fr"'}
    # The options name the dataset: another filter is another build; defaults keep old names.
    names = {b.builder_config.name for b in built.values()}
    config.data.sources.web.where = 'language == "en"'
    assert {b.builder_config.name for b in builders(config).values()} != names
    assert set(text_files.corpus_options(corpus_config(tmp_path, [web]).data)) == {
        "unit", "normalize", "split", "validation_fraction", "filters", "dedup"}


def built_texts_of(builder) -> list[str]:
    from lm.data.corpus import texts
    data = builder.as_data_source()
    return [t for split in ("train", "validation") for t in texts(data[split])]


def test_a_glob_over_many_shards_reads_them_all_in_order(tmp_path):
    docs = fillers(400, seed=3)
    for i in range(200):
        folder = tmp_path / "shards" / f"part{i // 50}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows_of(docs[2 * i:2 * i + 2])), folder / f"{i:05d}.parquet")
    (tmp_path / "shards" / "README.md").write_text("not a shard")
    pattern = str(tmp_path / "shards" / "**" / "*.parquet")
    paths = sources.expand([pattern, str(tmp_path / "shards")])  # the directory names the same shards again
    assert len(paths) == 200 and paths == sorted(paths)
    assert [t for p in paths for t, _ in sources.read(p)] == docs
    config = corpus_config(tmp_path, [pattern])
    assert sorted(built_texts(config)[1]) == sorted(docs)


def test_streamed_jsonl_reads_every_encoding_as_the_whole_file_reader_does(tmp_path):
    texts = [p for p in shakespeare_slice(3_000).split("\n\n") if p.strip()]
    body = "".join(json.dumps({"text": t.replace("\n", "\r\n")}) + "\n" for t in texts)
    for name, data in encodings_of(body).items():
        (tmp_path / f"{name}.jsonl").write_bytes(data)
        (tmp_path / f"{name}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        expected = [d.text for d in read_documents(str(tmp_path / f"{name}.jsonl"))]
        assert expected == texts
        for suffix in (".jsonl", ".jsonl.zst"):
            assert [t for t, _ in sources.read(str(tmp_path / f"{name}{suffix}"))] == expected, name + suffix


# --- bad input: one message each, naming the file and the fix ---

def test_a_parquet_file_without_the_text_column_names_the_columns_it_has(tmp_path):
    path = tmp_path / "web.parquet"
    pq.write_table(pa.table({"content": ["a b c"], "url": ["u"]}), path)
    with pytest.raises(CorpusError, match=r"web\.parquet has no column 'text' \(its columns: content, url\)"
                                          r"\. Fix: set config\.data\.text_column"):
        list(sources.read(str(path)))
    assert [t for t, _ in sources.read(str(path), text_column="content")] == ["a b c"]


def test_a_corrupt_shard_is_named(tmp_path):
    rows = rows_of(fillers(50))
    parquet = write_as("parquet", rows, tmp_path / "cut")
    with open(parquet, "rb") as f:
        data = f.read()
    with open(parquet, "wb") as f:
        f.write(data[:len(data) // 2])
    zst = write_as("jsonl.zst", rows, tmp_path / "cut")
    with open(zst, "rb") as f:
        data = f.read()
    with open(zst, "wb") as f:
        f.write(data[:len(data) // 2])
    (tmp_path / "garbage.jsonl.zst").write_bytes(b"not zstd at all")
    (tmp_path / "garbage.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    (tmp_path / "line.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "x"}\n{"text": \n'))
    cases = {"cut.parquet": r"cannot read .*cut\.parquet",
             "cut.jsonl.zst": r"cannot read .*cut\.jsonl\.zst: the zstd stream ends inside a frame",
             "garbage.jsonl.zst": r"cannot read .*garbage\.jsonl\.zst: .*zstd",
             "garbage.jsonl.gz": r"cannot read .*garbage\.jsonl\.gz",
             "line.jsonl.zst": r"line\.jsonl\.zst:2 is not JSON"}
    for name, message in cases.items():
        with pytest.raises(CorpusError, match=message + ".*Fix"):
            list(sources.read(str(tmp_path / name)))


def test_a_glob_matching_nothing_and_a_bad_filter_are_named(tmp_path):
    with pytest.raises(CorpusError, match=r"'.*/\*\*/\*\.parquet' matches no corpus input.*Fix"):
        sources.expand([str(tmp_path / "**" / "*.parquet")])
    path = write_as("parquet", rows_of(fillers(3)), tmp_path / "web")
    for where, message in (('language = "en"', "is not a filter"), ("score >= 3 or score < 1", "joined by `and`"),
                           ("__import__('os').getcwd() == 1", "column op literal")):
        with pytest.raises(ConfigError, match=r"config\.data\.where=.*" + message + ".*Fix"):
            config_lib.validate(corpus_config(tmp_path, [path], data__where=where))
    with pytest.raises(CorpusError, match=r"web\.parquet has column 'score' of type int64, which the filter "
                                          r"compares with the string '3'"):
        list(sources.read(path, where="score >= '3'"))
    jsonl = write_as("jsonl", rows_of(fillers(3)), tmp_path / "web")
    with pytest.raises(CorpusError, match=r"web\.jsonl:1 has no field 'lang', which the filter names.*Fix"):
        list(sources.read(jsonl, where="lang == 'en'"))
    dataset_dict = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_of(fillers(2)))}).save_to_disk(str(dataset_dict))
    with pytest.raises(ConfigError, match=r"DatasetDict folder with splits train.*e\.g\. .*dd/train"):
        config_lib.resolve_files([str(dataset_dict)])
    assert sources.expand([str(dataset_dict / "train")]) == [str(dataset_dict / "train")]


def test_mixed_schemas_across_shards_name_a_shard_of_each_kind_and_leave_no_dataset(tmp_path):
    good = [write_as("parquet", rows_of(fillers(3, seed=i)), tmp_path / f"a{i}") for i in range(3)]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b_int.parquet")
    with pytest.raises(CorpusError, match=r"shards' schemas differ: .*b_int\.parquet has text column 'text' of "
                                          r"type int64, not string, while .*a0\.parquet reads.*Fix"):
        sources.check_schemas(good + [str(tmp_path / "b_int.parquet")])
    pq.write_table(pa.table({"text": ["no score here"]}), tmp_path / "c_no_score.parquet")
    shards = good + [str(tmp_path / "c_no_score.parquet")]
    with pytest.raises(CorpusError, match=r"c_no_score\.parquet has no column 'score', which the filter names "
                                          r".*while .*a0\.parquet reads .* and the filter.*Fix"):
        sources.check_schemas(shards, where="score >= 1")
    with pytest.raises(CorpusError, match=r"c_no_score\.parquet has no column 'score'"):
        builders(corpus_config(tmp_path, shards, data__where="score >= 1"))
    assert [root for root, _, files in os.walk(tmp_path / "data") if "dataset_info.json" in files] == []


def test_an_input_reached_twice_through_links_or_a_link_loop_is_read_once(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    path = write_as("jsonl", rows_of(fillers(20)), corpus / "sub" / "a")
    os.symlink(corpus, corpus / "sub" / "loop")  # a directory link back up: a loop
    os.symlink(path, tmp_path / "link.jsonl")  # the same file under another name
    patterns = [str(corpus), str(tmp_path / "link.jsonl"), path]
    assert sources.expand(patterns) == [path]
    assert config_lib.resolve_files(patterns) == [path]
    config = corpus_config(tmp_path, patterns)
    report, texts = built_texts(config)
    assert report["read"]["documents"] == 20 and sorted(texts) == sorted(fillers(20))


def _unprivileged(code: str) -> subprocess.CompletedProcess:
    """`code` run by a Python without root's override of file permissions (setpriv drops it
    when this runs as root; otherwise chmod alone makes a file unreadable)."""
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file unreadable to root")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=os.getcwd())


def test_an_input_that_cannot_be_read_or_listed_is_one_error_naming_it(tmp_path):
    unreadable = write_as("jsonl", rows_of(fillers(3)), tmp_path / "secret")
    folder = tmp_path / "closed"
    folder.mkdir()
    write_as("jsonl", rows_of(fillers(3)), folder / "inside")
    os.chmod(unreadable, 0)
    os.chmod(folder, 0)
    try:
        result = _unprivileged(
            "from lm.config import ConfigError, resolve_files\n"
            "from lm.data import sources, text_files\nfrom lm.data.documents import CorpusError\n"
            f"for call in (lambda: text_files.fingerprint([{unreadable!r}], {{}}), "
            f"lambda: sources.expand([{str(folder)!r}]), lambda: resolve_files([{str(folder)!r}])):\n"
            "    try:\n        call()\n    except (CorpusError, ConfigError) as e:\n        print(e)\n")
    finally:
        os.chmod(folder, 0o755)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert lines[0].startswith(f"cannot read {unreadable}: Permission denied. Fix:")
    assert lines[1].startswith(f"cannot read {folder}: Permission denied. Fix:")
    assert "cannot be read" in lines[2] and "Permission denied" in lines[2] and "matches no" not in lines[2]


@pytest.mark.parametrize("build", ["memory", "datatrove"])
def test_a_bad_input_of_any_source_stops_the_build_before_any_source_is_built_and_names_it(tmp_path, build):
    good = write_as("jsonl", rows_of(fillers(30)), tmp_path / "good")
    bad = write_as("parquet", [{"content": t} for t in fillers(5)], tmp_path / "bad")
    config = corpus_config(tmp_path, [good], data__build=build)
    config.data.sources = ml_collections.ConfigDict({"a": dict(files=(good,), weight=1.0),
                                                     "b": dict(files=(bad,), weight=1.0)})
    with pytest.raises(CorpusError, match=r"^config\.data\.sources\.b: .*bad\.parquet has no column 'text'"):
        builders(config, **({"workers": 1} if build == "datatrove" else {}))
    assert not any("dataset_info.json" in files for _, _, files in os.walk(tmp_path / "data"))


@pytest.mark.parametrize("build", ["memory", "datatrove"])
def test_a_filter_that_keeps_nothing_is_named_by_both_builds_in_one_message(tmp_path, build):
    path = write_as("jsonl", rows_of(fillers(10)), tmp_path / "rows")
    config = corpus_config(tmp_path, [path], data__build=build, data__where="score > 100")
    with pytest.raises(CorpusError) as failed:
        builders(config, **({"workers": 1} if build == "datatrove" else {}))
    assert str(failed.value) == (f"no document of {path} survived cleaning (0 read). Fix: check the files have "
                                 "text, or relax config.data.where / config.data.filters / config.data.dedup.")
