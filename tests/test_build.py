"""The datatrove build (config.data.build="datatrove") against the in-memory one: the same
documents, report and TFDS dataset; near-dedup recall; the Ray and Slurm executors."""

import json
import os
import random
import shutil
import string
import struct
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, cli_env, run_cli, tiny_config

from lm.config import ConfigError, validate
from lm.data import cleaning, synthetic, text_files
from lm.data.build import dedup
from lm.data.corpus import builders, prepare, texts
from lm.data.documents import CorpusError

NEAR_THRESHOLD = 0.8  # the README's example; datasketch's bands for it (9 x 13) find a pair at 0.8 2 times in 5
RULES = dict(min_chars=150, max_chars=6000, min_words=25, max_words=800, max_non_alpha_fraction=0.2,
             max_duplicate_line_fraction=0.3, max_top_bigram_fraction=0.2, max_duplicate_ngram_fraction=0.15)


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def jaccard(a: str, b: str, size: int = 5) -> float:
    x, y = cleaning.shingles(a, size), cleaning.shingles(b, size)
    return len(x & y) / len(x | y)


def near_copy(rng: random.Random, text: str, target: float) -> str:
    """`text` with words replaced one at a time (at least one) while its shingle Jaccard stays at or
    above `target`."""
    words = text.split()
    while True:
        candidate = list(words)
        candidate[rng.randrange(len(words))] = _words(rng, 1)[0]
        if words != text.split() and jaccard(text, " ".join(candidate)) < target:
            return " ".join(words)
        words = candidate


def rule_breakers(rng: random.Random) -> dict[str, str]:
    """A document each quality rule in RULES drops (and no rule checked before it)."""
    line = " ".join(_words(rng, 8))
    phrase = " ".join(_words(rng, 6))
    return {
        "min_chars": "tiny document",
        "max_chars": " ".join(_words(rng, 700)) + " " + "x" * 2000,
        "min_words": " ".join(w * 4 for w in _words(rng, 20)),
        "max_words": " ".join(_words(rng, 900))[:5900],
        "max_non_alpha_fraction": " ".join(f"{w} {rng.randint(10000, 99999)}" for w in _words(rng, 40)),
        "max_duplicate_line_fraction": "\n".join([line] * 6 + [" ".join(_words(rng, 8)) for _ in range(4)]),
        "max_top_bigram_fraction": " ".join(_words(rng, 40)) + " alpha omega" * 20,
        "max_duplicate_ngram_fraction": " ".join(_words(rng, 60)) + (" " + phrase) * 4,
    }


def planted_corpus(directory, seed: int = 0, files: int = 3):
    """JSONL files with clean documents, exact copies, near copies of known Jaccard and
    rule breakers, originals first. Returns (paths, near pairs [(original, copy, jaccard)])."""
    rng = random.Random(seed)
    originals = [" ".join(_words(rng, rng.randint(250, 400))) for _ in range(120)]
    pairs = [(o, c, jaccard(o, c)) for o, target in zip(originals[:60], [0.5, 0.6, 0.85, 0.9, 0.95] * 12)
             for c in [near_copy(rng, o, target)]]
    copies = [c for _, c, _ in pairs] + originals[60:75] + list(rule_breakers(rng).values()) * 2
    rng.shuffle(copies)
    docs = originals + copies
    paths = []
    for i in range(files):  # contiguous parts: the files in order are the corpus in order
        path = directory / f"part-{i}.jsonl"
        part = docs[i * len(docs) // files:(i + 1) * len(docs) // files]
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        paths.append(path)
    return paths, pairs


def config_for(tmp_path, paths, build_kind, near=0.0, data_dir="data"):
    config = tiny_config(data__files=tuple(map(str, paths)), data__name="planted", data__split="hash",
                         data__validation_fraction=0.2, data__data_dir=str(tmp_path / data_dir),
                         data__build=build_kind, data__dedup__near_threshold=near)
    for rule, value in RULES.items():
        config.data.filters[rule] = value
    return config


def dataset(config, **build_options) -> tuple[dict, dict]:
    builder = builders(config, **build_options)[config.data.name]
    sources = builder.as_data_source()
    return text_files.report(builder), {split: list(texts(sources[split])) for split in ("train", "validation")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return planted_corpus(tmp_path_factory.mktemp("planted"))


def test_rules_and_exact_dedup_keep_the_same_documents_and_report_as_the_in_memory_build(tmp_path, corpus, capsys):
    paths, _ = corpus
    memory = dataset(config_for(tmp_path, paths, "memory"))
    datatrove = dataset(config_for(tmp_path, paths, "datatrove"), workers=2)
    assert set(memory[0]["dropped"]) == set(RULES)  # the corpus plants a document for every rule
    assert memory[0]["exact_duplicates"]["documents"] == 15
    assert datatrove == memory  # report, and each split's documents in order
    progress = capsys.readouterr().out
    assert "documents" in progress and "MB/s" in progress


@pytest.fixture(scope="module")
def near_corpus(tmp_path_factory):
    """`lm.data.synthetic`'s corpus with half its fresh documents copied later as near
    duplicates of true Jaccard 0.7 to 0.9: about 100 pairs, half of them at or above
    NEAR_THRESHOLD, many within MinHash's error of it (the pairs a build is likely to miss)."""
    directory = str(tmp_path_factory.mktemp("near"))
    mix = synthetic.Mix(exact=0.0, near=0.5, bad=0.0, jaccard=(NEAR_THRESHOLD - 0.1, NEAR_THRESHOLD + 0.1))
    return directory, synthetic.generate(directory, 700_000, seed=1, shards=2, mix=mix)


def test_near_dedup_recall_above_the_threshold_and_false_positives_match_the_in_memory_build(
        tmp_path, near_corpus, capsys):
    directory, truth = near_corpus
    scores = {}
    for kind in ("memory", "datatrove"):
        config = config_for(tmp_path, synthetic.files(directory, truth), kind, near=NEAR_THRESHOLD, data_dir=kind)
        config.data.normalize = "none"  # synthetic.score finds the kept texts in the corpus
        config.data.filters.update(truth["rules"])
        report, splits = dataset(config, workers=2)
        scores[kind] = synthetic.score(truth, synthetic.read(directory, truth),
                                       splits["train"] + splits["validation"], NEAR_THRESHOLD)
        with capsys.disabled():
            print(f"\n{kind}: near duplicates removed {report['near_duplicates']['documents']}, recall at or above "
                  f"{NEAR_THRESHOLD} {scores[kind]['recall']:.3f} ({scores[kind]['above']} pairs), false positives "
                  f"{scores[kind]['false_positives']} ({scores[kind]['below']} pairs below)")
    memory, datatrove = scores["memory"], scores["datatrove"]
    assert datatrove["above"] >= 40 and datatrove["below"] >= 40  # enough pairs on both sides to mean something
    assert datatrove["recall"] >= 0.95
    assert datatrove["false_positives"] <= memory["false_positives"]
    assert datatrove["kept_ids"] == memory["kept_ids"]  # outside the planted pairs, the same documents


def test_the_exact_jaccard_of_the_shingle_hashes_decides_candidates_just_above_and_just_below_the_threshold(tmp_path):
    from datatrove.utils.binaryio import read_tuples_from_file

    from lm.data.build import near

    rng = np.random.default_rng(0)
    values = rng.choice(2**32, size=400, replace=False).astype(np.uint32)
    first, others = values[:100], values[100:]
    docs = [first, np.concatenate([first[:89], others[:11]]), np.concatenate([first[12:], others[100:112]])]
    exact = [len(set(first) & set(d)) / len(set(first) | set(d)) for d in docs[1:]]
    assert exact[0] >= 0.8 > exact[1] and exact[0] - exact[1] < 0.02  # within MinHash's error (~0.035) of 0.8
    with near.writing_shingles(str(tmp_path / "shingles"), rank=3) as add:
        for doc in docs:
            add(np.sort(doc))
    table = near.ShingleTable(str(tmp_path / "shingles"))
    assert [near.jaccard(table[(3, 0)], table[(3, i)]) for i in (1, 2)] == pytest.approx(exact)
    # One band all three share, in the order 0, 2, 1: datatrove writes the adjacent pairs 0-2 and 2-1 only.
    (tmp_path / "buckets").mkdir()
    (tmp_path / "buckets" / "00000_00.dups").write_bytes(struct.pack("<8I", 3, 0, 3, 2, 3, 2, 3, 1))
    step = near.VerifiedCluster(str(tmp_path / "buckets"), str(tmp_path / "remove"), str(tmp_path / "shingles"), 0.8)
    list(step.run())
    with open(tmp_path / "remove" / "000003.remove", "rb") as f:
        assert [doc for (doc,) in read_tuples_from_file(f, "I")] == [1]  # the copy above; the one below stays
    assert step.stats["compared"].total == 3  # 0-2, and 1 with both: the pair 0-1 the chain hid is checked


def test_a_shingle_task_that_fails_leaves_no_files(tmp_path):
    from lm.data.build import near

    with pytest.raises(RuntimeError), near.writing_shingles(str(tmp_path), rank=0) as add:
        add(np.arange(5, dtype=np.uint32))
        raise RuntimeError("the task died")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_candidate_bands_propose_a_pair_below_the_threshold_almost_always(threshold):
    bands, rows = dedup.candidate_bands(threshold, 128)
    assert bands * rows <= 128
    assert dedup.collision_probability(threshold - dedup.MARGIN, bands, rows) >= dedup.CANDIDATE_RECALL
    datasketch = datasketch_bands(threshold)
    assert dedup.collision_probability(threshold, bands, rows) > dedup.collision_probability(threshold, *datasketch)
    print(f"{threshold}: {bands} bands of {rows} (datasketch: {datasketch[0]} of {datasketch[1]})")


def datasketch_bands(threshold: float) -> tuple[int, int]:
    import datasketch

    lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=128)
    return lsh.b, lsh.r


def test_a_datatrove_build_is_opened_and_tokenized_like_an_in_memory_one(tmp_path, corpus):
    paths, _ = corpus
    config = config_for(tmp_path, paths, "datatrove")
    built = prepare(config, str(tmp_path / "tokenizer.json"))
    report, splits = dataset(config)
    assert built.reports["planted"] == report
    assert len(built.documents["train"]) == len(splits["train"])
    import tensorflow_datasets as tfds

    info = tfds.builder_from_directory(builders(config)["planted"].data_dir).info
    assert info.splits["train"].num_examples == len(splits["train"])
    assert info.features["text"].__class__.__name__ == "Text"


def bad_corpus_config(tmp_path):
    """A datatrove build of two files, the second corrupt at its line 2."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a fine document " * 20}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "another document " * 20}) + "\n" + "{not json\n")
    return tiny_config(data__files=(str(good), str(bad)), data__split="hash", data__build="datatrove",
                       data__data_dir=str(tmp_path / "bad"))


def test_a_failed_build_names_the_file_and_leaves_no_dataset_that_looks_complete(tmp_path):
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        builders(bad_corpus_config(tmp_path), workers=1)
    assert [root for root, _, files in os.walk(tmp_path / "bad") if "dataset_info.json" in files] == []


# datatrove's Ray executor uses Ray's older placement-group options.
@pytest.mark.filterwarnings("ignore:placement_group:DeprecationWarning")
def test_the_ray_executor_builds_the_same_dataset_as_the_local_one_and_names_a_bad_file(tmp_path, corpus, capsys):
    ray = pytest.importorskip("ray")
    paths, _ = corpus
    near = 0.95  # 11 bands of 10: fewer near-dedup tasks (Ray actors) than at 0.8 (17), the same stages
    local = dataset(config_for(tmp_path, paths, "datatrove", near=near, data_dir="local"), workers=1)
    capsys.readouterr()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = dataset(config_for(tmp_path, paths, "datatrove", near=near, data_dir="ray"),
                         executor="ray", workers=2)
        progress = capsys.readouterr().out
        with pytest.raises(CorpusError, match="bad.jsonl:2") as failed:  # Ray logs a task's error and goes on
            builders(bad_corpus_config(tmp_path), executor="ray", workers=2)
    finally:
        ray.shutdown()
    assert on_ray == local
    assert local[0]["near_duplicates"]["documents"] > 0  # every stage ran on Ray
    assert "documents" in progress and "MB/s" in progress  # the progress line, read from the tasks' records
    assert type(failed.value) is CorpusError  # one message, not Ray's wrapper around the task's traceback
    assert [root for root, _, files in os.walk(tmp_path / "bad") if "dataset_info.json" in files] == []


def test_slurm_dry_run_prints_one_sbatch_script_per_stage_and_builds_nothing(tmp_path, corpus):
    paths, _ = corpus
    flags = [f"--config.data.files=({','.join(repr(str(p)) for p in paths)},)",
             f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.dedup.near_threshold=0.8"]
    env = {**cli_env(), "LM_VENV": sys.prefix}  # the jobs source this virtualenv
    result = subprocess.run(["bash", "launch/prepare_slurm.sh", "--partition=cpu", "--account=lm", "--dry_run", "--",
                             "--config=configs/shakespeare_char.py", *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    stages = ["filter", "exact_find", "exact_filter", "near_buckets", "near_cluster", "write", "finish"]
    assert [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("# stage")] == stages
    assert out.count("#SBATCH --partition=cpu") == len(stages) and "#SBATCH --account=lm" in out
    assert out.count(f"source {sys.prefix}/bin/activate") == len(stages)
    assert out.count("launch_pickled_pipeline") == len(stages)
    assert "#SBATCH --array=0-2" in out  # the files' three tasks
    assert not any("dataset_info.json" in files for _, _, files in os.walk(tmp_path / "data"))


def test_prepare_slurm_from_another_directory_reads_relative_paths_from_there(tmp_path, corpus):
    """The launch scripts don't cd: a relative --config, data file or data_dir means what it means in the caller's
    shell (here tmp_path), not the repository root."""
    paths, _ = corpus
    shutil.copy(os.path.join(REPO, "configs", "shakespeare_char.py"), tmp_path / "my_corpus.py")
    files = ",".join(repr(os.path.relpath(p, tmp_path)) for p in paths)
    env = {**cli_env(), "LM_VENV": sys.prefix, "PYTHONPATH": REPO}  # this checkout's lm, as in the repository's venv
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "prepare_slurm.sh"), "--partition=cpu", "--dry_run",
                             "--", "--config=my_corpus.py", f"--config.data.files=({files},)",
                             "--config.data.data_dir=data"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-2" in result.stdout  # the files' three tasks: config and files were found
    assert str(tmp_path / "data") in result.stdout and REPO + "/data" not in result.stdout


def test_the_datatrove_build_with_the_tail_split_is_one_config_error():
    with pytest.raises(ConfigError, match=r"data.split.*data.build='datatrove'.*--config.data.split=hash"):
        validate(tiny_config(data__build="datatrove"))


def test_executor_flags_without_the_datatrove_build_are_one_clear_error():
    result = run_cli("lm.prepare", "--config=configs/shakespeare_char.py", "--executor=ray", check=False)
    assert result.returncode != 0 and "--config.data.build=datatrove" in result.stderr


def test_parquet_zstd_jsonl_and_a_datasets_folder_build_the_jsonl_corpus_dataset_and_a_filter_drops_its_rows(
        tmp_path, corpus):
    pytest.importorskip("lm.data.sources")  # the inputs beyond .txt/.jsonl(.gz)
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paths, _ = corpus
    rows = [[{**json.loads(line), "lang": "en" if i % 7 else "fr"} for i, line in enumerate(p.read_text().splitlines())]
            for p in paths]
    (tmp_path / "pq").mkdir()
    (tmp_path / "zst").mkdir()
    for i, part in enumerate(rows):
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "pq" / f"part-{i}.parquet", row_group_size=50)
        text = "".join(json.dumps(r) + "\n" for r in part).encode()
        (tmp_path / "zst" / f"part-{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
        datasets.Dataset.from_list(part).save_to_disk(str(tmp_path / "hf" / f"part-{i}"))
    expected = dataset(config_for(tmp_path, paths, "datatrove", data_dir="data_jsonl"), workers=1)
    for kind in ("pq", "zst", "hf"):
        inputs = sorted(str(p) for p in (tmp_path / kind).iterdir())
        assert dataset(config_for(tmp_path, inputs, "datatrove", data_dir=f"data_{kind}"), workers=1) == expected, kind
    english = config_for(tmp_path, sorted(map(str, (tmp_path / "pq").iterdir())), "datatrove", data_dir="data_en")
    english.data.where = 'lang == "en"'
    report, _ = dataset(english, workers=1)
    assert report["read"]["documents"] == sum(r["lang"] == "en" for part in rows for r in part)


def _fake_slurm(bin_dir, queue_file, calls_file):
    """`sbatch` that numbers each submission and logs it, and `squeue` that lists what
    `queue_file` holds: stand-ins for a Slurm cluster, which the test machine has none of."""
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls_file}\n'
                                    f'echo "Submitted batch job $((100 + $(wc -l < {calls_file})))"\n')
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat {queue_file} 2>/dev/null\n")
    for name in ("sbatch", "squeue"):
        (bin_dir / name).chmod(0o755)


def test_a_slurm_build_is_not_submitted_again_while_its_jobs_run_and_a_resubmission_names_the_failed_task(
        tmp_path, monkeypatch, capsys):
    queue, calls = tmp_path / "queue", tmp_path / "sbatch_calls"
    _fake_slurm(tmp_path / "bin", queue, calls)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    config = bad_corpus_config(tmp_path)
    with pytest.raises(CorpusError):
        builders(config, workers=1)  # the local attempt fails at bad.jsonl and records it
    slurm = dict(executor="slurm", executor_options={"partition": "cpu"})
    assert builders(config, **slurm) == {}  # queued: no dataset yet
    out = capsys.readouterr().out
    assert "the last attempt's task 1 of stage filter" in out and "bad.jsonl:2" in out
    submitted = calls.read_text().splitlines()
    assert submitted and "submitted" in out
    last_job = out.split("Slurm job arrays (")[1].split(")")[0].split(", ")[-1]
    queue.write_text(f"{last_job}_0\n")  # the assembly job still queued
    builders(config, **slurm)
    out = capsys.readouterr().out
    assert f"Slurm jobs {last_job} are queued or running: not submitting again" in out
    assert calls.read_text().splitlines() == submitted  # nothing submitted twice
    queue.write_text("")  # the jobs are gone (e.g. cancelled): a rerun submits the unfinished tasks again
    builders(config, **slurm)
    assert len(calls.read_text().splitlines()) > len(submitted)
    assert "the last attempt's" not in capsys.readouterr().out  # its failure was reported once


def test_a_build_waits_for_another_holding_the_data_cache_then_reuses_its_dataset(tmp_path):
    import threading

    from lm.data import corpus as corpus_lib

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 30}) + "\n" for i in range(40)))
    config = tiny_config(data__files=(str(path),), data__split="hash", data__data_dir=str(tmp_path / "data"))
    results = {}

    def build(key):
        results[key] = builders(config)[config.data.name].data_dir

    with corpus_lib._exclusive(str(tmp_path / "data")):  # another build holds the cache
        waiting = threading.Thread(target=build, args=("waiting",))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not results  # it waits rather than building beside the other
    waiting.join(timeout=120)
    racing = [threading.Thread(target=build, args=(key,)) for key in ("a", "b")]
    for thread in racing:
        thread.start()
    for thread in racing:
        thread.join(timeout=120)
    assert results["waiting"] == results["a"] == results["b"]
    assert os.path.exists(os.path.join(results["a"], "dataset_info.json"))


@pytest.mark.parametrize("where", ["config", "env"])
def test_a_data_cache_that_is_a_file_is_one_error_naming_where_it_came_from(tmp_path, monkeypatch, where):
    cache = tmp_path / "cache"
    cache.write_text("precious")
    paths = planted_corpus(tmp_path, files=1)[0]
    config = config_for(tmp_path, paths, "memory")
    config.data.data_dir = str(cache) if where == "config" else ""
    monkeypatch.setenv("LM_DATA_DIR", str(cache))
    field = "config.data.data_dir" if where == "config" else r"\$LM_DATA_DIR"
    with pytest.raises(CorpusError, match=rf"^{field}='{cache}' cannot be the data cache: it is a file"):
        builders(config)
    assert cache.read_text() == "precious"


def test_a_ray_address_nothing_answers_is_one_error_naming_the_flag_at_once():
    pytest.importorskip("ray")
    from helpers import free_port

    from lm.data.build import executors
    from lm.errors import UsageError

    for address in (f"127.0.0.1:{free_port()}", f"ray://127.0.0.1:{free_port()}"):
        with pytest.raises(UsageError, match=rf"^--ray_address='{address}': no Ray cluster answers"):
            executors.init_ray(address, timeout=2.0)


@pytest.mark.parametrize("flags, fix", [
    (["--ray_address=127.0.0.1:1"], "--executor=ray --config.data.build=datatrove --config.data.split=hash"),
    (["--slurm_qos=high", "--config.data.build=datatrove", "--config.data.split=hash"], "--executor=slurm"),
    (["--tasks=4"], "--config.data.build=datatrove --config.data.split=hash"),
    (["--dry_run"], "--config.data.build=datatrove --config.data.split=hash --executor=slurm "
                    "--slurm_partition=<partition>"),
])
def test_a_flag_without_effect_is_refused_with_the_whole_fix_in_one_line(tmp_path, flags, fix):
    result = run_cli("lm.prepare", "--config=configs/shakespeare_char.py", f"--config.data.data_dir={tmp_path}",
                     *flags, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("lm: error: ") and f"Fix: add {fix}" in result.stderr
    assert os.listdir(tmp_path) == []  # refused before any work
