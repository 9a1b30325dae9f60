"""The evaluation harness: log-likelihood multiple choice (checked against transformers'
own probabilities), perplexity and bits per byte, WEAT, and the lm.evaluate CLI."""

import itertools
import json
import math
import os
import random

import jax
import numpy as np
import pytest

from lm import convert
from lm.errors import UsageError
from lm.evaluation import scoring, tasks, weat
from lm.runs import artifacts
from tests.helpers import REPO, run_cli
from tests.hf_models import save_hf_model, torch

QUESTIONS = [
    {"context": "ROMEO:\nBut soft, what light through yonder", "choices": [" window", " x", " breaks and the sun"],
     "answer": 0},
    {"context": "KING RICHARD III:\nA horse! a horse! my kingdom for a", "choices": [" horse", " zzzz qqqq"],
     "answer": 0},
    {"context": "To be, or not to be,", "choices": [" that is the question", "!", " and so"], "answer": 1},
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(the transformers model, the path of its lm import)."""
    root = tmp_path_factory.mktemp("gpt2")
    model = save_hf_model("gpt2", str(root / "hf"))
    convert.import_hf(str(root / "hf"), str(root / "lm"))
    return model, str(root / "lm")


def torch_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from transformers, token by token."""
    ids = np.concatenate([tokenizer.encode(context), tokenizer.encode(continuation)])
    n = len(tokenizer.encode(continuation))
    with torch.no_grad():
        log_p = torch.log_softmax(model(torch.from_numpy(ids).long()[None]).logits[0], -1).numpy()
    return float(sum(log_p[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))))


@pytest.mark.interop
def test_multiple_choice_picks_the_highest_total_and_per_byte_log_likelihood(gpt2):
    model, path = gpt2
    loaded = artifacts.load(path)
    result = scoring.multiple_choice(loaded, QUESTIONS, batch_size=4)
    answers = []
    for question, detail in zip(QUESTIONS, result["details"]):
        truth = [torch_log_likelihood(model, loaded.tokenizer, question["context"], c) for c in question["choices"]]
        np.testing.assert_allclose(detail["log_likelihoods"], truth, atol=1e-4)
        per_byte = [t / len(c.encode()) for t, c in zip(truth, question["choices"])]
        assert detail["pick"] == int(np.argmax(truth))
        assert detail["pick_normalized"] == int(np.argmax(per_byte))
        answers.append((int(np.argmax(truth)) == question["answer"], int(np.argmax(per_byte)) == question["answer"]))
    assert result["accuracy"] == pytest.approx(np.mean([a for a, _ in answers]))
    assert result["accuracy_normalized"] == pytest.approx(np.mean([b for _, b in answers]))


def test_multiple_choice_on_an_lm_model_picks_what_full_forward_passes_rank_highest(pretrained):
    """The known answer without torch: each choice's log-likelihood from a forward pass
    over its whole sequence (right-padded, which a causal mask keeps from reaching back)."""
    loaded = artifacts.load(pretrained)
    result = scoring.multiple_choice(loaded, QUESTIONS, batch_size=3)
    sequences, spans = [], []
    for question in QUESTIONS:
        for choice in question["choices"]:
            ids = np.concatenate([loaded.tokenizer.encode(question["context"]), loaded.tokenizer.encode(choice)])
            ids = ids[-(loaded.config.data.seq_len + 1):]  # the context is cut from the left to fit
            sequences.append(ids)
            spans.append(range(len(ids) - len(loaded.tokenizer.encode(choice)), len(ids)))
    padded = np.zeros((len(sequences), loaded.config.data.seq_len), np.int32)
    for row, ids in enumerate(sequences):
        padded[row, :len(ids) - 1] = ids[:-1]
    log_p = np.asarray(jax.nn.log_softmax(jax.jit(loaded.model.apply)({"params": loaded.params}, padded), axis=-1))
    truths = [sum(log_p[row, t - 1, ids[t]] for t in span) for row, (ids, span) in enumerate(zip(sequences, spans))]
    for question, detail in zip(QUESTIONS, result["details"]):
        truth, truths = truths[:len(question["choices"])], truths[len(question["choices"]):]
        np.testing.assert_allclose(detail["log_likelihoods"], truth, atol=1e-4)
        assert detail["pick"] == int(np.argmax(truth))
        per_byte = [t / len(c.encode()) for t, c in zip(truth, question["choices"])]
        assert detail["pick_normalized"] == int(np.argmax(per_byte))


def test_k_shot_prompts_show_k_solved_examples_never_the_question_itself():
    rows = [{"context": f"Q{i}:", "choices": ["a", "b"], "answer": i % 2} for i in range(5)]
    prefix = scoring.few_shot_prefix(rows, 3, exclude=2, rng=random.Random(0))
    assert prefix.count("\n\n") == 3 and "Q2:" not in prefix
    assert all(f"Q{i}:{rows[i]['choices'][rows[i]['answer']]}" in prefix for i in range(5) if f"Q{i}:" in prefix)
    with pytest.raises(UsageError, match="5-shot needs 5 other examples; the file has 4"):
        scoring.few_shot_prefix(rows, 5, exclude=0, rng=random.Random(0))
    with pytest.raises(UsageError, match="answer 2 but 2 choices"):
        scoring.multiple_choice(None, [{"context": "", "choices": ["a", "b"], "answer": 2}])


def test_weat_matches_the_definition_on_hand_made_vectors():
    x = np.array([[1.0, 0.0], [1.0, 0.2]])
    y = np.array([[0.0, 1.0], [0.3, 1.0]])
    a, b = np.array([[1.0, 0.1]]), np.array([[0.1, 1.0]])
    cos = lambda u, v: u @ v / np.linalg.norm(u) / np.linalg.norm(v)
    s = {tuple(w): cos(w, a[0]) - cos(w, b[0]) for w in np.concatenate([x, y])}
    sx, sy = [s[tuple(w)] for w in x], [s[tuple(w)] for w in y]
    result = weat.weat(x, y, a, b)
    assert result["statistic"] == pytest.approx(sum(sx) - sum(sy))
    assert result["effect_size"] == pytest.approx((np.mean(sx) - np.mean(sy)) / np.std(sx + sy, ddof=1))
    everything = sx + sy
    partitions = [sum(everything[i] for i in c) - sum(everything[i] for i in range(4) if i not in c)
                  for c in itertools.combinations(range(4), 2)]
    assert result["p_value"] == pytest.approx(np.mean(np.array(partitions) >= sum(sx) - sum(sy) - 1e-12))
    assert result["p_value"] == pytest.approx(1 / 6)  # only the observed split is as extreme
    with pytest.raises(UsageError, match=r"\|X\|=2, \|Y\|=1"):
        weat.weat(x, y[:1], a, b)


def test_task_files_name_the_flag_the_row_and_the_field_and_weat_json_names_the_file(tmp_path):
    with pytest.raises(tasks.TaskError, match=r"--fewshot_file=\S*nope.jsonl does not exist. Fix: give a JSONL file"):
        tasks.read_rows(str(tmp_path / "nope.jsonl"), "--fewshot_file", "multiple-choice")
    (tmp_path / "gen.jsonl").write_text('{"prompt": "A", "references": "b"}\n{"prompt": 5, "references": ["b"]}\n')
    with pytest.raises(tasks.TaskError, match=r"generation row 1 of \S*gen.jsonl has prompt=5, not text"):
        tasks.read_rows(str(tmp_path / "gen.jsonl"), "--generation", "generation")
    (tmp_path / "mc.jsonl").write_text('{"context": "a", "choices": ["b"], "answer": "0"}\n')
    with pytest.raises(tasks.TaskError, match="answer=\"0\", not a 0-based index"):
        tasks.read_rows(str(tmp_path / "mc.jsonl"), "--multiple_choice", "multiple-choice")
    (tmp_path / "list.jsonl").write_text('["label", "prediction"]\n')
    with pytest.raises(tasks.TaskError, match=r"list.jsonl:1 is not a JSON object"):
        tasks.read_rows(str(tmp_path / "list.jsonl"), "--predictions", "predictions")
    (tmp_path / "weat.json").write_text("{bad")
    with pytest.raises(UsageError, match=r"weat.json is not JSON \(Expecting property name .*line 1 column 2\)\. "
                                         r"Fix: a JSON object of word lists"):
        tasks.read_word_sets(str(tmp_path / "weat.json"))
    (tmp_path / "weat.json").write_text('{"X": ["a", "b"], "Y": ["c", "d"], "A": "e"}')
    with pytest.raises(tasks.TaskError, match="the word set.s. A, B are missing or not lists of words"):
        tasks.read_word_sets(str(tmp_path / "weat.json"))


def test_evaluate_checks_its_output_path_flags_and_files_before_loading_a_model(tmp_path):
    """The workdir does not exist: each bad input is found before the model would load."""
    (tmp_path / "gen.jsonl").write_text('{"prompt": 5, "references": ["b"]}\n')
    for flags, problem in ((["--split=validation", f"--output={tmp_path}"], f"--output={tmp_path} is a directory"),
                           (["--split=validation", f"--output={tmp_path}/missing/r.json"], "its directory"),
                           ([f"--generation={tmp_path}/gen.jsonl"], "generation row 0"),
                           (["--split=validation", "--max_windows=-1"], "-1 is not a non-negative integer")):
        result = run_cli("lm.evaluate", "--workdir=/nonexistent/run", *flags, check=False, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("lm: error: ") and problem in result.stderr
        assert result.stderr.count("\n") == 1 and "Fix:" in result.stderr, result.stderr


@pytest.mark.interop
def test_evaluate_cli_scores_perplexity_multiple_choice_weat_and_predictions(gpt2, tmp_path):
    model, path = gpt2
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 4
    (tmp_path / "text.txt").write_text(text)
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(q) for q in QUESTIONS))
    (tmp_path / "weat.json").write_text(json.dumps({"X": ["rose", "lily"], "Y": ["wasp", "flea"],
                                                    "A": ["love", "joy"], "B": ["hate", "woe"]}))
    rows = [("1", "1", "m"), ("0", "1", "m"), ("1", "1", "f"), ("1", "0", "f"), ("0", "0", "f"), ("1", "1", "m")]
    (tmp_path / "preds.jsonl").write_text("\n".join(json.dumps({"label": y, "prediction": p, "sex": g})
                                                    for y, p, g in rows))
    result = run_cli("lm.evaluate", f"--workdir={path}", f"--text_file={tmp_path}/text.txt",
                     f"--multiple_choice={tmp_path}/mc.jsonl", "--num_shots=0,1", f"--weat={tmp_path}/weat.json",
                     f"--predictions={tmp_path}/preds.jsonl", "--protected_column=sex", "--privileged_value=m",
                     f"--output={tmp_path}/results.json")
    assert "| multiple_choice/1_shot | accuracy |" in result.stdout
    results = json.load(open(tmp_path / "results.json"))

    loaded = artifacts.load(path)
    tokens = loaded.tokenizer.encode(text)
    seq_len = loaded.config.data.seq_len
    windows = (len(tokens) - 1) // seq_len
    with torch.no_grad():
        rows_WL = torch.from_numpy(np.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(windows)])).long()
        log_p = torch.log_softmax(model(rows_WL[:, :-1]).logits, -1)
        loss = -log_p.gather(-1, rows_WL[:, 1:, None]).mean().item()
    scored = results["perplexity/text.txt"]
    assert scored["loss"] == pytest.approx(loss, abs=1e-4)
    assert scored["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert scored["bits_per_byte"] == pytest.approx(loss / math.log(2) * len(tokens) / len(text.encode()), rel=1e-4)

    assert results["multiple_choice/0_shot"]["questions"] == 3
    assert set(results["weat"]) == {"effect_size", "statistic", "p_value"}
    assert results["classification"]["accuracy"] == pytest.approx(4 / 6)
    # positive rate: m 3/3, f 1/3; true-positive rate: m 2/2, f 1/2
    fairness = results["fairness"]
    assert fairness["demographic_parity_difference"] == pytest.approx(1 / 3 - 1)
    assert fairness["disparate_impact_ratio"] == pytest.approx(1 / 3)
    assert fairness["equal_opportunity_difference"] == pytest.approx(1 / 2 - 1)


@pytest.mark.interop
def test_evaluate_cli_rejects_bad_requests_with_the_fix(gpt2, tmp_path):
    _, path = gpt2
    result = run_cli("lm.evaluate", f"--workdir={path}", check=False)
    assert result.returncode == 2 and "nothing to evaluate. Fix: pass --split" in result.stderr
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "choices": ["b"], "answer": 0}\nnot json\n')
    result = run_cli("lm.evaluate", f"--workdir={path}", f"--multiple_choice={tmp_path}/bad.jsonl", check=False)
    assert result.returncode == 2 and "bad.jsonl:2 is not JSON" in result.stderr


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa"])
def test_attention_maps_are_the_weights_the_model_attends_with(kind, tmp_path):
    from lm.evaluation import inspect

    save_hf_model(kind, str(tmp_path / "hf"))
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "lm"))
    loaded = artifacts.load(str(tmp_path / "lm"))
    tokens_BL = np.random.default_rng(0).integers(0, 300, (2, 12))
    maps = inspect.attention_maps(loaded, tokens_BL)  # [layers, B, H, L, L]
    assert maps.shape == (2, 2, 4, 12, 12)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(maps, k=1) == 0)  # causal: no weight on later tokens

    # The weights, applied to the values and the out projection, give the attention layer's output.
    _, state = loaded.model.apply({"params": loaded.params}, tokens_BL, mutable=["intermediates"],
                                  capture_intermediates=lambda m, _: m.name == "attn")
    for i, h_BLD in enumerate(inspect.attention_inputs(loaded, tokens_BL)):
        layer = loaded.params[f"layer_{i}"]
        _, _, v = inspect.queries_keys_values(loaded, layer, h_BLD, np.broadcast_to(np.arange(12), (2, 12)))
        mixed = np.einsum("bhqs,bshk->bqhk", maps[i], v)
        out = np.einsum("bqhk,hkd->bqd", mixed, layer["attn"]["out"]["kernel"]) + layer["attn"]["out"].get("bias", 0)
        np.testing.assert_allclose(out, state["intermediates"][f"layer_{i}"]["attn"]["__call__"][0], atol=1e-5)


@pytest.mark.interop
def test_nearest_tokens_rank_by_cosine_similarity(gpt2):
    from lm.evaluation import inspect

    loaded = artifacts.load(gpt2[1])
    table = np.asarray(loaded.params["embed"]["embedding"])
    neighbours = inspect.nearest_tokens(loaded, 7, k=5)
    cosine = table @ table[7] / np.linalg.norm(table, axis=1) / np.linalg.norm(table[7])
    assert [i for i, _ in neighbours] == [i for i in np.argsort(-cosine) if i != 7][:5]


@pytest.mark.interop
def test_the_inspection_notebook_runs_top_to_bottom_on_a_tiny_checkpoint(gpt2, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    notebooks = os.path.join(REPO, "notebooks")
    notebook = nbformat.read(os.path.join(notebooks, "inspect_model.ipynb"), as_version=4)
    monkeypatch.setenv("LM_WORKDIR", gpt2[1])
    monkeypatch.setenv("LM_PLOTS", str(tmp_path))
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": notebooks}}).execute()
    printed = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.outputs)
    assert "2 layers x 4 heads" in printed and "rows sum to 1.0 .. 1.0" in printed
    assert "mean attention distance per head" in printed and " -> " in printed
    assert os.path.exists(tmp_path / "attention_maps.png")
