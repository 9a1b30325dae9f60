"""Evaluation metrics against the reference implementations, and fairness metrics
against values computed by hand."""

import numpy as np
import pytest

from lm.evaluation import fairness, metrics

LABELS = [0, 1, 2, 2, 1, 0, 1, 2, 0, 1]
PREDICTIONS = [0, 2, 2, 2, 1, 0, 0, 1, 0, 1]


def test_classification_metrics_are_scikit_learns():
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    got = metrics.classification(LABELS, PREDICTIONS)
    assert got["accuracy"] == accuracy_score(LABELS, PREDICTIONS) == 0.7
    assert got["precision"] == pytest.approx(precision_score(LABELS, PREDICTIONS, average="macro"))
    assert got["recall"] == pytest.approx(recall_score(LABELS, PREDICTIONS, average="macro"))
    assert got["f1"] == pytest.approx(f1_score(LABELS, PREDICTIONS, average="macro"))
    # by hand: class 0 recalls 3 of 3 labels, class 1 2 of 4, class 2 2 of 3
    assert got["recall"] == pytest.approx((1 + 2 / 4 + 2 / 3) / 3)


def test_exact_match_and_token_f1_follow_squads_normalisation():
    assert metrics.exact_match("The Cat!", ["cat", "dog"]) == 1.0
    assert metrics.exact_match("a black cat", ["cat"]) == 0.0
    # "black cat sat" vs "the cat sat down": common {cat, sat}, P = 2/3, R = 2/3 ("the" dropped)
    assert metrics.token_f1("black cat sat", ["the cat sat down"]) == pytest.approx(2 / 3)
    assert metrics.qa(["Paris", "in 1999"], [["paris"], ["1999", "in 2000"]]) == {
        "exact_match": 0.5, "token_f1": pytest.approx((1 + 2 * 1 * 0.5 / 1.5) / 2)}


def test_bleu_and_rouge_are_sacrebleus_and_rouge_scores():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat", "a quick brown fox jumps"]
    references = [["the cat is on the mat", "there is a cat on the mat"], ["the quick brown fox jumps", "a fox"]]
    expected = sacrebleu.corpus_bleu(predictions, [[r[0] for r in references], [r[1] for r in references]]).score
    assert metrics.bleu(predictions, references) == pytest.approx(expected) and 0 < expected < 100
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    got = metrics.rouge(predictions, [r[0] for r in references], types=("rougeL",))
    want = np.mean([scorer.score(r[0], p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
    assert got["rougeL"] == pytest.approx(want)


def test_fairness_metrics_match_hand_computed_values_on_a_small_table():
    #                 privileged "m" rows | unprivileged "f" rows
    attribute = ["m", "m", "m", "m", "f", "f", "f", "f", "f"]
    labels = [1, 1, 0, 0, 1, 1, 1, 0, 0]
    predictions = [1, 1, 1, 0, 1, 0, 0, 0, 0]
    # positive rates: m 3/4, f 1/5; true-positive rates: m 2/2, f 1/3
    assert fairness.demographic_parity_difference(predictions, attribute, "m") == pytest.approx(1 / 5 - 3 / 4)
    assert fairness.disparate_impact_ratio(predictions, attribute, "m") == pytest.approx((1 / 5) / (3 / 4))
    assert fairness.equal_opportunity_difference(predictions, labels, attribute, "m") == pytest.approx(1 / 3 - 1)
    with pytest.raises(ValueError, match="both the privileged value 'x' and others"):
        fairness.demographic_parity_difference(predictions, attribute, "x")
