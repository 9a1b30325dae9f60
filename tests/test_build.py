"""The datatrove build (config.data.build="datatrove") against the in-memory one: the same
documents, report and TFDS dataset; near-dedup recall; the Ray and Slurm executors."""

import json
import os
import random
import string
import subprocess
import sys

import pytest
from helpers import REPO, cli_env, run_cli, tiny_config

from lm.config import ConfigError, validate
from lm.data import cleaning, text_files
from lm.data.corpus import builders, prepare, texts
from lm.data.documents import CorpusError

THRESHOLD = 0.7  # near dedup: datasketch's bands for 128 permutations are 14 x 9
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


def _recall_and_false_positives(kept: set[str], pairs) -> tuple[float, int]:
    detected = [(j, not (o in kept and c in kept)) for o, c, j in pairs]
    above = [hit for j, hit in detected if j >= THRESHOLD]
    return sum(above) / len(above), sum(hit for j, hit in detected if j < THRESHOLD)


def test_near_dedup_recall_above_the_threshold_and_false_positives_match_the_in_memory_build(tmp_path, corpus):
    paths, pairs = corpus
    results = {}
    for kind in ("memory", "datatrove"):
        report, splits = dataset(config_for(tmp_path, paths, kind, near=THRESHOLD), workers=1)
        results[kind] = report, _recall_and_false_positives(set(splits["train"] + splits["validation"]), pairs)
        print(f"{kind}: near duplicates removed {report['near_duplicates']['documents']}, recall above "
              f"{THRESHOLD} {results[kind][1][0]:.3f}, false positives below it {results[kind][1][1]}")
    (memory, (_, memory_fp)), (datatrove, (recall, datatrove_fp)) = results["memory"], results["datatrove"]
    assert recall >= 0.95
    assert datatrove_fp <= memory_fp  # the same bands collide; only clusters vs. greedy order differ
    for field in ("read", "dropped", "exact_duplicates"):
        assert datatrove[field] == memory[field]


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
    near = 0.9  # 5 bands: fewer near-dedup tasks (Ray actors) than at THRESHOLD, the same stages
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
