r"""Evaluate a model, or score predictions; results to JSON and a printed table.

    # perplexity and bits per byte of the run's own corpus split, or of any text file
    python -m lm.evaluate --workdir=runs/shakespeare_char --split=validation
    python -m lm.evaluate --workdir=runs/shakespeare_char --text_file=notes.txt
    # multiple choice by log-likelihood, zero- and k-shot ({"context", "choices", "answer"} rows)
    python -m lm.evaluate --workdir=runs/shakespeare_char --multiple_choice=tasks/mc.jsonl --num_shots=0,3
    # generation: greedy continuations of {"prompt", "references"} rows, scored by EM/F1, BLEU, ROUGE
    python -m lm.evaluate --workdir=runs/shakespeare_char --generation=tasks/gen.jsonl --max_new_tokens=32
    # WEAT on the token embeddings ({"X": [...], "Y": [...], "A": [...], "B": [...]})
    python -m lm.evaluate --workdir=runs/shakespeare_char --weat=tasks/weat.json
    # predictions of any system ({"label", "prediction"[, "group"]} rows): classification and fairness
    python -m lm.evaluate --predictions=preds.jsonl --protected_column=group --privileged_value=m \
        --positive_label=1

`--workdir` takes a run, an export, a fine-tuned `merged/` export or an imported
Hugging Face model. Several evaluations may be asked for at once; `--output` writes them
all to one JSON file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import app, flags

from lm.config import parse_flags
from lm.data import documents
from lm.errors import UsageError, exit_with_error, quiet_logging, reject_positional
from lm.evaluation import fairness, metrics, scoring, tasks, weat
from lm.files import atomic, paths
from lm.parallel import runtime
from lm.runs import artifacts
from lm.training import optim

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir or an export (not needed for --predictions).")
_STEP = flags.DEFINE_integer("step", None, "A workdir's checkpoint; default the latest.", lower_bound=0)
_SPLIT = flags.DEFINE_enum("split", None, ["train", "validation"], "Perplexity of the run's corpus split.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "Perplexity of this UTF-8 text file.")
_MAX_WINDOWS = flags.DEFINE_integer("max_windows", 0, "Score at most this many context windows; 0 = all.",
                                    lower_bound=0)
_MC = flags.DEFINE_string("multiple_choice", None, "JSONL of {context, choices, answer} rows.")
_SHOTS = flags.DEFINE_list("num_shots", ["0"], "Multiple choice: examples shown before each question.")
_FEWSHOT_FILE = flags.DEFINE_string("fewshot_file", None, "Multiple choice: draw shots from here (default: the "
                                    "task file, never the question itself).")
_GENERATION = flags.DEFINE_string("generation", None, "JSONL of {prompt, references} rows.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Generation: tokens per continuation.", lower_bound=1)
_STOP = flags.DEFINE_string("stop", "\n", "Generation: a continuation ends at this text.")
_WEAT = flags.DEFINE_string("weat", None, "JSON with word sets X, Y, A, B.")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "JSONL of {label, prediction[, group]} rows.")
_PROTECTED = flags.DEFINE_string("protected_column", None, "Predictions: the protected attribute's column.")
_POSITIVE = flags.DEFINE_string("positive_label", "1", "Predictions: the favourable outcome, for fairness.")
_PRIVILEGED = flags.DEFINE_string("privileged_value", None, "Predictions: the protected column's privileged "
                                  "value (compared with the others).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results here as JSON.")
_SEED = flags.DEFINE_integer("seed", 0, "Which few-shot examples are drawn.")


def read_inputs() -> dict[str, Any]:
    """Every file and list the evaluations asked for, read and checked before any model
    loads (and before any scoring), so a wrong one fails in a second."""
    inputs: dict[str, Any] = {}
    if _TEXT_FILE.value:
        if not os.path.exists(_TEXT_FILE.value):
            raise UsageError(f"--text_file={_TEXT_FILE.value} does not exist. Fix: give a UTF-8 text file.")
        inputs["text"] = documents.read_text(_TEXT_FILE.value)  # CRLF, CR, a byte-order mark: the same text
    if _MC.value:
        inputs["multiple_choice"] = tasks.read_rows(_MC.value, "--multiple_choice", "multiple-choice")
        inputs["fewshot"] = (tasks.read_rows(_FEWSHOT_FILE.value, "--fewshot_file", "multiple-choice")
                             if _FEWSHOT_FILE.value else None)
        bad = [shots for shots in _SHOTS.value if not shots.isdigit()]
        if bad:
            raise UsageError(f"--num_shots has {bad[0]!r}. Fix: a list of counts, e.g. --num_shots=0,5.")
    if _GENERATION.value:
        inputs["generation"] = tasks.read_rows(_GENERATION.value, "--generation", "generation")
    if _WEAT.value:
        inputs["weat"] = tasks.read_word_sets(_WEAT.value)
    if _PREDICTIONS.value:
        inputs["predictions"] = tasks.read_rows(_PREDICTIONS.value, "--predictions", "predictions")
    return inputs


def perplexity_of(loaded: artifacts.Loaded, text: str | None) -> dict[str, dict]:
    out = {}
    if _SPLIT.value:
        tokens, num_bytes = scoring.corpus_split(loaded, _WORKDIR.value, _SPLIT.value)
        out[f"perplexity/{_SPLIT.value}"] = scoring.perplexity(loaded, tokens, num_bytes,
                                                               max_windows=_MAX_WINDOWS.value)
    if text is not None:
        out[f"perplexity/{os.path.basename(_TEXT_FILE.value)}"] = scoring.perplexity(
            loaded, loaded.tokenizer.encode(text), len(text.encode("utf-8")), max_windows=_MAX_WINDOWS.value)
    return out


def multiple_choice_of(loaded: artifacts.Loaded, rows: list[dict], fewshot: list[dict] | None) -> dict[str, dict]:
    out = {}
    for shots in _SHOTS.value:
        result = scoring.multiple_choice(loaded, rows, int(shots), _SEED.value, fewshot)
        out[f"multiple_choice/{shots}_shot"] = result
    return out


def generation_of(loaded: artifacts.Loaded, rows: list[dict]) -> dict[str, dict]:
    from lm.inference import decode

    predictions = []
    for row in rows:
        text = decode.sample_text(loaded.model, loaded.params, loaded.tokenizer, row["prompt"],
                                  max_new_tokens=_MAX_NEW_TOKENS.value, max_len=loaded.config.data.seq_len,
                                  temperature=0.0, top_k=0)
        predictions.append(text.split(_STOP.value)[0] if _STOP.value else text)
    references = [row["references"] if isinstance(row["references"], list) else [row["references"]] for row in rows]
    result: dict[str, Any] = {**metrics.qa(predictions, references), "bleu": metrics.bleu(predictions, references),
                              **metrics.rouge(predictions, [r[0] for r in references])}
    result["predictions"] = predictions
    return {"generation": result}


def weat_of(loaded: artifacts.Loaded, sets: dict[str, list[str]]) -> dict[str, dict]:
    embedding_VD = np.asarray(loaded.params["embed"]["embedding"], np.float32)
    vectors = {name: weat.word_vectors(embedding_VD, loaded.tokenizer.encode, sets[name]) for name in "XYAB"}
    return {"weat": weat.weat(vectors["X"], vectors["Y"], vectors["A"], vectors["B"])}


def predictions_of(rows: list[dict]) -> dict[str, dict]:
    labels = [str(r["label"]) for r in rows]
    predicted = [str(r["prediction"]) for r in rows]
    out: dict[str, dict] = {"classification": metrics.classification(labels, predicted)}
    if _PROTECTED.value:
        if _PRIVILEGED.value is None:
            raise UsageError("--protected_column needs --privileged_value (e.g. --privileged_value=m).")
        groups = [str(r[_PROTECTED.value]) for r in rows]
        privileged = _PRIVILEGED.value
        positive = _POSITIVE.value
        y_true = [int(label == positive) for label in labels]
        y_pred = [int(p == positive) for p in predicted]
        out["fairness"] = {
            "demographic_parity_difference": fairness.demographic_parity_difference(y_pred, groups, privileged),
            "equal_opportunity_difference": fairness.equal_opportunity_difference(y_pred, y_true, groups, privileged),
            "disparate_impact_ratio": fairness.disparate_impact_ratio(y_pred, groups, privileged)}
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| evaluation | metric | value |", "|---|---|---|"]
    for name, values in results.items():
        for metric, value in values.items():
            if isinstance(value, (int, float)):
                lines.append(f"| {name} | {metric} | {value:.4f} |" if isinstance(value, float)
                             else f"| {name} | {metric} | {value} |")
    return "\n".join(lines)


def run() -> dict[str, dict]:
    results: dict[str, dict] = {}
    model_evaluations = (_SPLIT.value, _TEXT_FILE.value, _MC.value, _GENERATION.value, _WEAT.value)
    if not any(model_evaluations) and not _PREDICTIONS.value:
        raise UsageError("nothing to evaluate. Fix: pass --split, --text_file, --multiple_choice, --generation, "
                          "--weat or --predictions.")
    if any(model_evaluations) and not _WORKDIR.value:
        raise UsageError("--workdir is required to evaluate a model. Fix: --workdir=<run or export>.")
    if _OUTPUT.value:
        paths.check_output_file(_OUTPUT.value, "--output")
    inputs = read_inputs()
    if any(model_evaluations):
        loaded = artifacts.load(_WORKDIR.value, _STEP.value, eval_params=optim.eval_params_reader)
        if loaded.model_cfg.family != "decoder":
            raise UsageError(f"{_WORKDIR.value} holds a {loaded.model_cfg.family!r} model; these evaluations score "
                              "a decoder's next-token probabilities. Fix: point --workdir at a decoder.")
        results.update(perplexity_of(loaded, inputs.get("text")))
        if _MC.value:
            results.update(multiple_choice_of(loaded, inputs["multiple_choice"], inputs["fewshot"]))
        if _GENERATION.value:
            results.update(generation_of(loaded, inputs["generation"]))
        if _WEAT.value:
            results.update(weat_of(loaded, inputs["weat"]))
    if _PREDICTIONS.value:
        results.update(predictions_of(inputs["predictions"]))
    return results


def main(argv: list[str]) -> None:
    reject_positional(argv)
    quiet_logging()
    runtime.enable_compilation_cache()
    try:
        results = run()
    except (UsageError, ValueError) as e:
        exit_with_error(str(e))
    except KeyError as e:
        exit_with_error(f"a row or word set lacks the field {e}. Fix: see the formats in "
                        "`python -m lm.evaluate --help`.")
    print(table(results), flush=True)
    if _OUTPUT.value:
        atomic.write_json(_OUTPUT.value, results, indent=2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
