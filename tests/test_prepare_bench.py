"""The corpus-build benchmark: its synthetic corpus (lm.data.synthetic) keeps its promises,
and bench/prepare_scaling.py runs and prints its figures."""

import collections
import filecmp
import importlib.util
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from lm.data import cleaning, synthetic
from tests.helpers import REPO, cli_env

# More planted documents than the bench's default, so a 400 KB corpus has every kind.
MIX = synthetic.Mix(exact=0.05, near=0.35, bad=0.03)
NO_NEAR = ml_collections.ConfigDict(dict(exact=True, near_threshold=0.0, num_perm=128, shingle_words=5))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    truth = synthetic.generate(out, 400_000, seed=3, shards=2, mix=MIX)
    return out, truth, list(synthetic.read(out, truth))


def test_the_corpus_is_written_in_shards_with_its_ground_truth(corpus):
    out, truth, docs = corpus
    assert synthetic.load(out) == truth
    assert truth["files"] == ["part-00000.jsonl", "part-00001.jsonl"]
    assert sum(os.path.getsize(p) for p in synthetic.files(out, truth)) == truth["bytes"] >= 400_000
    assert len(docs) == truth["documents"] and len({doc_id for doc_id, _ in docs}) == len(docs)


def test_planted_near_duplicates_have_the_jaccard_similarity_they_claim(corpus):
    _, truth, docs = corpus
    text = dict(docs)
    position = {doc_id: i for i, (doc_id, _) in enumerate(docs)}
    pairs = truth["near_duplicates"]
    assert len(pairs) >= 10
    for copy, pair in pairs.items():
        measured = synthetic.jaccard(cleaning.shingles(text[copy], truth["shingle_words"]),
                                     cleaning.shingles(text[pair["of"]], truth["shingle_words"]))
        assert abs(measured - pair["target"]) <= 0.02, (copy, measured, pair)
        assert measured == pytest.approx(pair["jaccard"], abs=1e-6)
        assert 0.5 <= measured <= 0.95
        assert position[pair["of"]] < position[copy]  # the original comes first: in-order dedup keeps it
    similarities = [pair["jaccard"] for pair in pairs.values()]
    assert min(similarities) < 0.65 and max(similarities) > 0.8  # both sides of a usual threshold


def test_each_planted_bad_document_is_dropped_by_the_rule_it_names_and_the_rest_pass(corpus):
    _, truth, docs = corpus
    checks = cleaning.quality_rules(ml_collections.ConfigDict(truth["rules"]))
    planted = truth["dropped_by"]
    assert set(planted.values()) == {name for name, _ in checks}  # one kind (or more) per rule
    for doc_id, text in docs:
        assert synthetic.first_failure(text, checks) == planted.get(doc_id), doc_id
    # lm's own cleaning drops exactly those, each under its rule, and the planted exact copies
    report = cleaning.Report()
    kept = list(cleaning.clean(docs, ml_collections.ConfigDict(truth["rules"]), NO_NEAR, report,
                               text=lambda doc: doc[1]))
    assert {rule: tally.documents for rule, tally in report.dropped.items()} == collections.Counter(planted.values())
    assert report.exact_duplicates.documents == len(truth["exact_duplicates"]) > 0
    assert {doc_id for doc_id, _ in kept} == {doc_id for doc_id, _ in docs} - planted.keys() - \
        truth["exact_duplicates"].keys()


def test_score_counts_recall_and_false_positives_against_the_ground_truth(corpus):
    _, truth, docs = corpus
    threshold = 0.75
    above = {copy for copy, pair in truth["near_duplicates"].items() if pair["jaccard"] >= threshold}
    ideal = [text for doc_id, text in docs if doc_id not in
             truth["dropped_by"].keys() | truth["exact_duplicates"].keys() | above]
    score = synthetic.score(truth, docs, ideal, threshold)
    assert (score["recall"], score["false_positives"], score["bad_kept"], score["copies_kept"]) == (1.0, 0, {}, 0)
    assert score["above"] == len(above) > 0 and score["above"] + score["below"] == len(truth["near_duplicates"])
    text = dict(docs)
    missed = min(above)  # a pair at or above the threshold, now with both kept
    bad, rule = next(iter(truth["dropped_by"].items()))
    copy = next(iter(truth["exact_duplicates"]))
    lost = min(score["kept_ids"] - set(truth["exact_duplicates"].values()))  # a clean document, now removed
    worse = [t for t in ideal if t != text[lost]] + [text[missed], text[bad], text[copy]]
    score = synthetic.score(truth, docs, worse, threshold)
    assert score["recall"] == pytest.approx(1 - 1 / len(above))
    assert (score["false_positives"], score["bad_kept"], score["copies_kept"]) == (1, {rule: 1}, 1)
    with pytest.raises(ValueError, match="not in the corpus"):
        synthetic.score(truth, docs, ["a text no generator wrote"], threshold)


def test_the_same_seed_writes_the_same_corpus(tmp_path):
    first, again, other = (str(tmp_path / name) for name in ("first", "again", "other"))
    truth = synthetic.generate(first, 60_000, seed=1, mix=MIX)
    assert synthetic.generate(again, 60_000, seed=1, mix=MIX) == truth
    synthetic.generate(other, 60_000, seed=2, mix=MIX)
    name = truth["files"][0]
    assert filecmp.cmp(os.path.join(first, name), os.path.join(again, name), shallow=False)
    assert not filecmp.cmp(os.path.join(first, name), os.path.join(other, name), shallow=False)


def run_bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "prepare_scaling.py"), "--quick", *flags],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.bench
def test_quick_bench_prints_its_table_and_recall_for_the_in_memory_build():
    result = run_bench("--build=memory")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| build | size | MB | documents | wall s | MB/s | MB/s/core | CPU s | peak RSS MiB |" in out
    number = r"[\d.,]+"
    rows = re.findall(rf"^\| memory \| (\dx) \| {number} \| {number} \| {number} \| ({number}) \| {number} \| "
                      rf"{number} \| ({number}) \|", out, re.MULTILINE)
    assert [size for size, _, _ in rows] == ["1x", "2x"]
    assert all(float(rate) > 0 and int(peak.replace(",", "")) > 50 for _, rate, peak in rows)
    recalls = re.findall(r"near dedup at 0\.80: recall ([\d.]+|nan) \(\d+ of \d+ planted pairs at or above\), "
                         r"false positives \d+", out)
    assert len(recalls) == 2
    assert out.count("planted bad documents kept: 0; exact copies kept: 0") == 2


@pytest.mark.bench
def test_quick_bench_with_the_datatrove_build_compares_it_with_the_in_memory_one():
    result = run_bench("--build=datatrove")
    if importlib.util.find_spec("lm.data.build") is None:  # before issue 22's build is merged
        assert result.returncode != 0 and "--build=datatrove runs lm.data.build" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same documents after the rule filters and exact dedup: yes" in result.stdout
