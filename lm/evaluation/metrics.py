"""Task metrics as pure functions of predictions and references.

Classification metrics are scikit-learn's; BLEU is sacrebleu's corpus BLEU and ROUGE is
rouge-score's F-measure (both the references the field reports against); exact match
and token F1 follow the SQuAD evaluation script's normalisation.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np


def classification(labels: Sequence, predictions: Sequence, average: str = "macro") -> dict[str, float]:
    """Accuracy, and precision, recall and F1 averaged over classes (`average` as in
    scikit-learn: "macro", "micro", "weighted", or "binary" for two classes)."""
    from sklearn import metrics  # imported on use: scikit-learn is slow to load

    if len(labels) != len(predictions) or not len(labels):
        raise ValueError(f"{len(labels)} labels and {len(predictions)} predictions; they must be equal and non-zero")
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(labels, predictions, average=average,
                                                                        zero_division=0)
    return {"accuracy": float(metrics.accuracy_score(labels, predictions)), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """The best F1 over references of the normalised tokens both share (SQuAD)."""
    def f1(reference: str) -> float:
        predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
        if not predicted or not wanted:
            return float(predicted == wanted)
        common = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
        if not common:
            return 0.0
        precision, recall = common / len(predicted), common / len(wanted)
        return 2 * precision * recall / (precision + recall)

    return max(f1(r) for r in references)


def qa(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1 over questions, each with one or more answers."""
    return {"exact_match": float(np.mean([exact_match(p, r) for p, r in zip(predictions, references, strict=True)])),
            "token_f1": float(np.mean([token_f1(p, r) for p, r in zip(predictions, references, strict=True)]))}


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation); `references[i]` are prediction i's."""
    import sacrebleu

    streams = [list(stream) for stream in zip(*references, strict=True)]  # sacrebleu: one stream per reference
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(predictions: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """Mean ROUGE F-measures (rouge-score, with stemming) over the pairs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
    return {t: float(np.mean([s[t].fmeasure for s in scores])) for t in types}
