"""Hugging Face export of every tokenizer lm trains: the tokenizer.json that
`lm.convert export` writes is loaded by the `tokenizers` library, encodes text to lm's
ids, and `lm.convert import` of the export needs no flag and scores the same."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from lm import convert
from lm.data import corpora, tokenizers
from lm.errors import UsageError
from lm.evaluation import scoring
from lm.interop import tokenizer_json
from lm.model import ModelConfig, build
from lm.runs import artifacts
from tests.helpers import tiny_config

SEQ_LEN = 48
SHAPES = {  # model fields that make the tiny Shakespeare decoder exportable
    "gpt2": dict(positions="learned", norm="layernorm", activation="gelu_tanh", use_bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", activation="swiglu"),
}
USER_SYMBOLS = ("<sep>", "[X]")
# Beyond the validation text: user-defined symbols, spaces in runs, text outside the
# training characters (byte fallback); and text spelling control, unknown and byte pieces,
# which `tokenizers` users see as those tokens (its default) but lm's import as text.
PROBE = "a <sep> b  [X]\n\n\tcafé ✓ 日本  "
SPELLINGS = "<eos> </s><pad><unk><0x41>x<unk>"


@pytest.fixture(scope="module")
def shakespeare() -> tuple[str, str]:
    """(train split, validation text of a few KB) of the embedded corpus."""
    with open(corpora.path("tinyshakespeare"), encoding="utf-8") as f:
        text = f.read()
    return text[:-4_000], text[-4_000:]


def make_tokenizer(kind: str, train_text: str) -> tokenizers.Tokenizer:
    if kind == "char":
        return tokenizers.CharTokenizer.train([train_text])
    if kind == "byte":
        return tokenizers.ByteTokenizer()
    model_type = kind.removeprefix("sentencepiece_")
    return tokenizers.train_sentencepiece(iter(train_text[:100_000].split("\n\n")), 500, model_type, byte_fallback=True,
                                          user_defined_symbols=USER_SYMBOLS)


def write_run(path: str, tokenizer: tokenizers.Tokenizer, shape: str) -> None:
    """A tiny random-weight decoder of `shape` with `tokenizer`, as an lm export."""
    config = tiny_config(data__seq_len=SEQ_LEN, **{f"model__{k}": v for k, v in SHAPES[shape].items()})
    model_cfg = ModelConfig.from_config(config.model, tokenizer.vocab_size, SEQ_LEN)
    params = nn.meta.unbox(build(model_cfg).init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))["params"])
    artifacts.write_export(path, jax.tree.map(np.asarray, params), config, tokenizer,
                      {"step": 0, "dtype": "float32", "parameters": 0})


@pytest.mark.parametrize("kind,shape", [("char", "gpt2"), ("byte", "llama"), ("sentencepiece_bpe", "llama"),
                                        ("sentencepiece_unigram", "gpt2")])
def test_an_export_holds_a_tokenizer_json_with_lms_ids_and_imports_back_with_the_same_perplexity(
        kind, shape, shakespeare, tmp_path):
    train_text, validation = shakespeare
    tokenizer = make_tokenizer(kind, train_text)
    lm_dir, hf_dir, back_dir = (str(tmp_path / d) for d in ("lm", "hf", "back"))
    write_run(lm_dir, tokenizer, shape)

    assert convert.export_hf(lm_dir, hf_dir)["tokenizer"] == tokenizer.kind
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "hf").iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the rest (not 0600)
    hf = HFTokenizer.from_file(f"{hf_dir}/tokenizer.json")
    ids = tokenizer.encode(validation)
    assert hf.encode(validation, add_special_tokens=False).ids == ids.tolist()
    assert hf.decode(ids.tolist()) == validation
    if kind != "char":  # the probe holds characters outside the char vocabulary
        assert hf.encode(PROBE, add_special_tokens=False).ids == tokenizer.encode(PROBE).tolist()
    special = {i: t.content for i, t in hf.get_added_tokens_decoder().items() if t.special}
    assert {tokenizer.pad_id, tokenizer.eos_id} <= set(special)
    with open(f"{hf_dir}/config.json", encoding="utf-8") as f:
        hf_config = json.load(f)
    assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (tokenizer.eos_id, tokenizer.pad_id)
    with open(f"{hf_dir}/tokenizer_config.json", encoding="utf-8") as f:
        names = json.load(f)
    assert (names["eos_token"], names["pad_token"]) == (special[tokenizer.eos_id], special[tokenizer.pad_id])
    assert names["split_special_tokens"] is True  # transformers then reads "<eos>" in text as text

    convert.import_hf(hf_dir, back_dir)  # no --tokenizer: the export carries its own
    original, imported = artifacts.load(lm_dir), artifacts.load(back_dir)
    assert imported.tokenizer.kind == "huggingface"
    assert imported.tokenizer.encode(validation).tolist() == ids.tolist()
    assert imported.tokenizer.decode(ids) == validation
    if kind != "char":
        for text in (PROBE, SPELLINGS, PROBE + SPELLINGS):
            assert imported.tokenizer.encode(text).tolist() == tokenizer.encode(text).tolist(), text
    num_bytes = len(validation.encode("utf-8"))
    before = scoring.perplexity(original, ids, num_bytes, max_windows=4)
    after = scoring.perplexity(imported, imported.tokenizer.encode(validation), num_bytes, max_windows=4)
    assert after["tokens"] == before["tokens"] > 0
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=1e-5)

    convert.export_hf(back_dir, str(tmp_path / "again"))  # an imported tokenizer exports as it came
    assert (tmp_path / "again/tokenizer.json").read_text() == (tmp_path / "hf/tokenizer.json").read_text()


# Every character of lm's control, <unk> and byte pieces' spellings: a corpus holding them
# leaves no character of a spelling outside the vocabulary (Shakespeare lacks "<", digits).
SPELLING_CHARS = "<>/padsunkeo0123456789ABCDEFx"


def never_text_spellings(tokenizer: tokenizers.Tokenizer) -> list[str]:
    """The spelling of each piece that stands for no text of its own: control tokens,
    `<unk>` and SentencePiece's 256 byte pieces (and "</s>", "<eos>" for every kind)."""
    names = ["<pad>", "<eos>", "</s>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
        names += [tokenizer.processor.id_to_piece(i) for i in sorted(tokenizer.control_ids)]
    return names


@pytest.mark.parametrize("kind,extra_text,byte_fallback", [
    ("char", "", True), ("byte", "", True), ("sentencepiece_bpe", "", True), ("sentencepiece_bpe", "", False),
    ("sentencepiece_unigram", "", True), ("sentencepiece_unigram", SPELLING_CHARS, True),
    ("sentencepiece_unigram", "", False), ("sentencepiece_unigram", SPELLING_CHARS, False)])
def test_an_exported_tokenizer_json_reads_text_spelling_control_unknown_and_byte_pieces_as_lm_does(
        kind, extra_text, byte_fallback, shakespeare):
    train_text = shakespeare[0][:100_000] + extra_text
    if kind.startswith("sentencepiece"):
        tokenizer = tokenizers.train_sentencepiece(iter(train_text.split("\n\n")), 500, kind.split("_")[1],
                                                   byte_fallback=byte_fallback, user_defined_symbols=USER_SYMBOLS)
    else:
        tokenizer = make_tokenizer(kind, train_text)
    hf = HFTokenizer.from_str(tokenizer_json.to_json(tokenizer))
    hf.encode_special_tokens = True  # as the README tells `tokenizers` users (transformers: split_special_tokens)
    names = never_text_spellings(tokenizer)
    texts = [" ".join(names), "".join(names), "a<sep>" + "x".join(names) + "é✓ 日本", *names]
    for text in texts:
        ids = tokenizer.encode(text).tolist()
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert not set(ids) & tokenizer.control_ids, text
    batch = hf.encode_batch(texts, add_special_tokens=False)  # the batched path alike
    assert [e.ids for e in batch] == [tokenizer.encode(t).tolist() for t in texts]
    validation = shakespeare[1]  # and ordinary text is untouched by the fix
    assert hf.encode(validation, add_special_tokens=False).ids == tokenizer.encode(validation).tolist()


def test_sentencepiece_bpe_merges_follow_piece_scores_and_skip_pieces_text_cannot_form():
    normal, control, byte, user = 1, 3, 6, 4
    pieces = [("<pad>", 0.0, control), ("<0x61>", 0.0, byte), ("<s", 0.0, user), ("a", -5.0, normal),
              ("b", -6.0, normal), ("c", -7.0, normal), ("bc", -1.0, normal), ("ab", -2.0, normal),
              ("abc", -3.0, normal), ("<", -8.0, normal)]
    # bc outranks ab (higher score); abc has two splits; nothing forms a control, byte or user piece.
    assert tokenizer_json.bpe_merges(pieces) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_a_sentencepiece_model_with_settings_lm_does_not_train_is_refused_with_the_setting_named(
        shakespeare, tmp_path):
    import sentencepiece as spm

    path = tmp_path / "nfkc"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shakespeare[0][:100_000].split("\n\n")),
                                   model_prefix=str(path),
                                   vocab_size=400, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    tokenizer = tokenizers.SentencePieceTokenizer.from_file(f"{path}.model")
    with pytest.raises(UsageError, match=r"normalization 'nmt_nfkc'.*add_dummy_prefix=true.*"
                                          r"remove_extra_whitespaces=true.*Fix: train the tokenizer with lm"):
        tokenizer_json.to_json(tokenizer)


def gpt2_layout_json() -> str:
    """A byte-level BPE laid out as GPT-2's: "!" is id 0 and "<|endoftext|>", its one
    special token, comes last."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["Hello world! To be, or not to be"] * 10, trainer)
    hf.add_special_tokens(["<|endoftext|>"])
    assert hf.id_to_token(0) == "!"
    return hf.to_str()


@pytest.fixture()
def gpt2_dir(tmp_path):
    """A Hugging Face directory with GPT-2's layout whose config files name neither eos nor pad."""
    (tmp_path / "tokenizer.json").write_text(gpt2_layout_json(), encoding="utf-8")
    return tmp_path


def write_json(path, content: dict) -> None:
    path.write_text(json.dumps(content), encoding="utf-8")


@pytest.mark.parametrize("file,fields", [
    (None, {}),  # the tokenizer's one special token spelled like an end of text
    ("config.json", {"eos_token_id": 275}),
    ("generation_config.json", {"eos_token_id": [275, 3]}),
    ("tokenizer_config.json", {"eos_token": "<|endoftext|>"}),
    ("tokenizer_config.json", {"eos_token": {"content": "<|endoftext|>", "special": True}})])
def test_an_import_finds_eos_where_checkpoints_keep_it_and_encodes_every_character(file, fields, gpt2_dir):
    if file:
        write_json(gpt2_dir / file, fields)
    hf_config = fields if file == "config.json" else {}
    tokenizer = convert.hf_tokenizer(str(gpt2_dir), hf_config, None)
    assert tokenizer.eos_id == tokenizer.pad_id == 275  # no padding declared: pads with eos, as GPT-2
    ids = tokenizer.encode("Hello!")  # "!" is id 0, which an eos defaulting to 0 made a control id
    assert 0 in ids.tolist() and tokenizer.decode(ids) == "Hello!"


@pytest.mark.parametrize("sources,message", [
    ({}, r"names no end-of-text token: no eos_token_id in config.json.*special tokens: 275 '<\|marker\|>'.*"
         r"Fix: set eos_token_id in config.json"),
    ({"config.json": {"eos_token_id": 0}}, r"config.json's eos_token_id gives eos id 0, which is not a special "
                                           r"token.*Fix: set eos_token_id in config.json"),
    ({"config.json": {"eos_token_id": 275, "pad_token_id": 0}}, r"config.json's pad_token_id gives pad id 0.*"
                                                                r"Fix: set pad_token_id"),
    ({"tokenizer_config.json": {"eos_token": "</s>"}}, r"tokenizer_config.json's eos_token '</s>' is not a special "
                                                       r"token.*Fix: set eos_token to one of them")])
def test_an_import_without_a_special_eos_or_pad_is_refused_naming_the_field(sources, message, tmp_path):
    hf = HFTokenizer.from_str(gpt2_layout_json())
    if not sources:  # no special token spelled like an end of text either
        hf = HFTokenizer.from_str(gpt2_layout_json().replace("<|endoftext|>", "<|marker|>"))
    (tmp_path / "tokenizer.json").write_text(hf.to_str(), encoding="utf-8")
    for name, fields in sources.items():
        if name != "config.json":
            write_json(tmp_path / name, fields)
    with pytest.raises(UsageError, match=message):
        convert.hf_tokenizer(str(tmp_path), sources.get("config.json", {}), None)
