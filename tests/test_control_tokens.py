"""Text is data, never control: for every tokenizer kind, text that spells a control token
(`<|endoftext|>`, `</s>`, `<pad>`, ...) encodes to no control id wherever text enters lm
(the tokenizer, a server prompt, a fine-tuning example, a corpus document), and decodes
back to itself; only code inserts control ids, and decoding drops them and the
objectives' extra ids."""

import json
import urllib.request

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from lm.data import corpora, tokenizers
from lm.data.corpus import prepare
from lm.finetuning import tasks
from lm.interop import tokenizer_json
from lm.model import ModelConfig, build
from lm.runs import artifacts
from tests.helpers import serve_app, tiny_config
from tests.hf_models import save_tokenizer

ENDOFTEXT = "<|endoftext|>"
KINDS = ("char", "byte", "sentencepiece_bpe", "sentencepiece_unigram", "huggingface_gpt2",
         "huggingface_unigram")


def gpt2_style_json(directory) -> str:
    """The interop tests' byte-level BPE (<pad>, <eos> special) with GPT-2's end of text
    added as one more special token, which is its eos."""
    save_tokenizer(str(directory))
    hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    hf.add_special_tokens([ENDOFTEXT])
    return hf.to_str()


@pytest.fixture(scope="module")
def shakespeare() -> str:
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        return f.read()[:100_000]


@pytest.fixture(scope="module")
def all_kinds(shakespeare, tmp_path_factory) -> dict[str, tokenizers.Tokenizer]:
    paragraphs = shakespeare.split("\n\n")
    sp = {t: tokenizers.train_sentencepiece(iter(paragraphs), 500, t, user_defined_symbols=("<sep>",))
          for t in ("bpe", "unigram")}
    gpt2_json = gpt2_style_json(tmp_path_factory.mktemp("gpt2"))
    return {
        # The characters of the spellings are in the vocabulary, so round trips are exact.
        "char": tokenizers.CharTokenizer.train([shakespeare, "<>|_/0x"]),
        "byte": tokenizers.ByteTokenizer(),
        "sentencepiece_bpe": sp["bpe"], "sentencepiece_unigram": sp["unigram"],
        "huggingface_gpt2": tokenizers.HuggingFaceTokenizer(gpt2_json, HFTokenizer.from_str(gpt2_json)
                                                            .token_to_id(ENDOFTEXT), 0),
        # A unigram model matches "</s>" and "<0x41>" itself, not only as added tokens.
        "huggingface_unigram": tokenizers.HuggingFaceTokenizer(tokenizer_json.to_json(sp["unigram"]), 1, 0),
    }


def spellings(tokenizer: tokenizers.Tokenizer) -> list[str]:
    """The text of each of the tokenizer's control tokens (and of `<unk>` and a byte piece,
    which stand for text but are not spelled by it)."""
    if isinstance(tokenizer, tokenizers.HuggingFaceTokenizer):
        special = [t.content for t in tokenizer.processor.get_added_tokens_decoder().values() if t.special]
        return special + ["<unk>", "<0x41>"]
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
        return [tokenizer.processor.id_to_piece(i) for i in sorted(tokenizer.control_ids)] + ["<unk>", "<0x41>"]
    return ["<pad>", "<eos>", "<unk>", ENDOFTEXT]  # char and byte: no token has a spelling


def spelled_text(tokenizer: tokenizers.Tokenizer) -> str:
    names = spellings(tokenizer)
    return "hello " + " ".join(names) + " world" + "".join(names) + "\n" + names[0]


@pytest.mark.parametrize("kind", KINDS)
def test_text_spelling_a_control_token_encodes_to_no_control_id_and_decodes_back(kind, all_kinds):
    tokenizer = all_kinds[kind]
    assert {tokenizer.eos_id, tokenizer.pad_id} <= tokenizer.control_ids
    text = spelled_text(tokenizer)
    ids = tokenizer.encode(text)
    assert not set(ids.tolist()) & tokenizer.control_ids, [i for i in ids if i in tokenizer.control_ids]
    assert tokenizer.decode(ids) == text
    batch = tokenizer.encode_batch([text, "x", text])  # the corpus pipeline's call
    assert batch[0].tolist() == batch[2].tolist() == ids.tolist()
    for name in spellings(tokenizer):  # each on its own, at the start and the end of the text
        assert not set(tokenizer.encode(name).tolist()) & tokenizer.control_ids, name
        assert tokenizer.decode(tokenizer.encode(name)) == name


def test_the_issues_input_keeps_its_text_and_gets_the_endoftext_id_nowhere(all_kinds):
    tokenizer = all_kinds["huggingface_gpt2"]
    ids = tokenizer.encode("hello <|endoftext|> world")
    assert tokenizer.eos_id == tokenizer.processor.token_to_id(ENDOFTEXT) and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == "hello <|endoftext|> world"
    # Code still inserts it: decoding drops it, as it drops every control id.
    assert tokenizer.decode(np.concatenate([ids, [tokenizer.eos_id, tokenizer.pad_id]])) == "hello <|endoftext|> world"


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_drops_control_ids_and_the_objectives_extra_ids(kind, all_kinds):
    tokenizer = all_kinds[kind]
    ids = tokenizer.encode("To be, or not")
    extra = [tokenizer.vocab_size, tokenizer.vocab_size + 7]  # [MASK], sentinels, task tokens
    mixed = [*extra, *ids[:3], tokenizer.eos_id, *ids[3:], tokenizer.pad_id, *extra]
    assert tokenizer.decode(mixed) == tokenizer.decode(ids) == "To be, or not"


def test_sentencepiece_user_defined_symbols_are_text(all_kinds):
    for kind in ("sentencepiece_bpe", "sentencepiece_unigram"):
        tokenizer = all_kinds[kind]
        sep = tokenizer.processor.piece_to_id("<sep>")
        ids = tokenizer.encode("question<sep>answer")
        assert sep in ids.tolist() and sep not in tokenizer.control_ids  # kept whole, and data
        assert tokenizer.decode(ids) == "question<sep>answer"


@pytest.mark.parametrize("kind", ["huggingface_gpt2", "huggingface_unigram", "sentencepiece_bpe"])
def test_a_fine_tuning_example_spelling_control_tokens_holds_only_the_eos_the_code_appends(kind, all_kinds):
    tokenizer = all_kinds[kind]
    text = spelled_text(tokenizer)
    sft = tasks.encode("sft", [{"prompt": text, "response": " " + spellings(tokenizer)[0]}], tokenizer, 256, [])
    length = sft.lengths_N[0]
    assert length < 256  # nothing truncated: the appended eos is the last target
    assert not set(sft.tokens_NL[0, :length].tolist()) & tokenizer.control_ids
    targets = sft.labels[0, :length].tolist()
    assert targets[-1] == tokenizer.eos_id and not set(targets[:-1]) & tokenizer.control_ids
    classification = tasks.encode("classification", [{"text": text, "label": "a"}], tokenizer, 256, ["a", "b"])
    assert not set(classification.tokens_NL[0, :classification.lengths_N[0]].tolist()) & tokenizer.control_ids


def test_a_corpus_document_spelling_control_tokens_holds_no_control_id(all_kinds, tmp_path):
    tokenizer = all_kinds["huggingface_gpt2"]
    paragraphs = [f"Paragraph {i}: {spelled_text(tokenizer)} and so on." for i in range(24)]
    text = "\n\n".join(paragraphs)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    config = tiny_config(data__files=(str(tmp_path / "corpus.txt"),), data__name="control_spellings",
                         data__unit="paragraph", data__validation_fraction=0.25)
    tokenizers.save(tokenizer, str(tmp_path / "tokenizer.json"))  # as a run's workdir holds it
    corpus = prepare(config, str(tmp_path / "tokenizer.json"))
    for split in ("train", "validation"):
        tokens, documents = np.asarray(corpus.tokens[split]), corpus.documents[split]
        assert len(documents) > 1
        for start, length in documents:
            assert not set(tokens[start:start + length].tolist()) & tokenizer.control_ids
            assert tokenizer.decode(tokens[start:start + length]) in text  # the tail split may cut one
        separators = np.setdiff1d(np.arange(len(tokens)), np.concatenate([np.arange(s, s + n) for s, n in documents]))
        assert set(tokens[separators].tolist()) == {tokenizer.eos_id}  # the eos lm inserts between documents


@pytest.fixture(scope="module")
def hf_tokenizer_export(all_kinds, tmp_path_factory) -> str:
    """A tiny random decoder whose tokenizer is the GPT-2-style Hugging Face one, as an export."""
    tokenizer = all_kinds["huggingface_gpt2"]
    config = tiny_config(data__seq_len=48)
    model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size, 48)
    params = nn.meta.unbox(build(model_cfg).init(jax.random.key(0), jnp.zeros((1, 48), jnp.int32))["params"])
    path = str(tmp_path_factory.mktemp("hf_export") / "export")
    artifacts.write_export(path, jax.tree.map(np.asarray, params), config, tokenizer,
                      {"step": 0, "dtype": "float32", "parameters": 0})
    return path


@pytest.fixture(scope="module")
def server(hf_tokenizer_export):
    """lm.serve's application on the export, served by uvicorn on a free local port."""
    from lm.inference.engine import Limits
    from lm.inference.http import make_app

    loaded = artifacts.load(hf_tokenizer_export)
    with serve_app(make_app(loaded, Limits(max_prompt_tokens=40, max_tokens=4), "tiny", None)) as base:
        yield base, loaded


def test_a_server_prompt_spelling_the_end_of_text_is_read_as_text(server):
    base, loaded = server
    prompt = "hello <|endoftext|> world"
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        usage = json.loads(response.read())["usage"]
    # The count of `tokenizers` itself when told that special tokens are text.
    plain = HFTokenizer.from_str(loaded.tokenizer.tokenizer_json)
    plain.encode_special_tokens = True
    as_text = plain.encode(prompt, add_special_tokens=False).ids
    assert loaded.tokenizer.eos_id not in as_text and len(as_text) > 5
    assert usage["prompt_tokens"] == len(as_text) == len(loaded.tokenizer.encode(prompt))
