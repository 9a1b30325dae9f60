"""`lm` tokenizers written as Hugging Face `tokenizer.json`, so an exported model is usable
by `tokenizers` and `transformers` users (and imported back by `lm.convert import`).

Each kind becomes the Hugging Face model that reproduces its ids exactly:

- char: a BPE model without merges whose vocabulary is `<pad>`, `<eos>`, `<unk>` and the
  characters (ids 3...); each character missing from it becomes one `<unk>`.
- byte: a byte-level BPE without merges: GPT-2's byte-to-character table, byte b at id 3 + b.
- sentencepiece: read from the model proto (`sentencepiece_model_pb2`). Unigram keeps
  the pieces and their scores (Viterbi over the same lattice). BPE gets merges derived
  from the vocabulary: every split of a normal piece into two normal pieces, ranked by
  the piece's score, which is the order in which SentencePiece's BPE merges pairs.
  Spaces become "▁" (lm trains with identity normalisation, no dummy prefix, whitespace
  kept); byte pieces are the byte fallback; user-defined symbols are added tokens that
  are text (not special), as in SentencePiece.
- huggingface: the tokenizer.json it was imported from.

`<pad>`, the end-of-document token and `<unk>` are added tokens marked special. Nothing
here needs `transformers`.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from lm.config import ConfigError
from lm.data import tokenizers as lm_tokenizers

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
SPECIAL_NAMES = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2 of lm's char and byte tokenizers


def to_hf(tokenizer: lm_tokenizers.Tokenizer) -> Tokenizer:
    """The `tokenizers.Tokenizer` that encodes text to the same ids as `tokenizer`.

    Raises ConfigError for a SentencePiece model with settings lm does not train with
    (another normalisation, a dummy prefix, word or char models).
    """
    if isinstance(tokenizer, lm_tokenizers.HuggingFaceTokenizer):
        return Tokenizer.from_str(tokenizer.tokenizer_json)
    if isinstance(tokenizer, lm_tokenizers.CharTokenizer):
        return char_tokenizer(tokenizer.chars)
    if isinstance(tokenizer, lm_tokenizers.ByteTokenizer):
        return byte_tokenizer()
    if isinstance(tokenizer, lm_tokenizers.SentencePieceTokenizer):
        return sentencepiece_tokenizer(tokenizer.model_proto)
    raise ConfigError(f"no tokenizer.json conversion for the {tokenizer.kind!r} tokenizer.")


def to_json(tokenizer: lm_tokenizers.Tokenizer) -> str:
    """`tokenizer` as the text of a Hugging Face tokenizer.json."""
    if isinstance(tokenizer, lm_tokenizers.HuggingFaceTokenizer):
        return tokenizer.tokenizer_json  # as imported, byte for byte
    return to_hf(tokenizer).to_str(pretty=True)


def tokenizer_config(tokenizer: lm_tokenizers.Tokenizer, max_len: int) -> dict:
    """tokenizer_config.json for `transformers`: load tokenizer.json as it is
    (PreTrainedTokenizerFast) with its end-of-document, padding and unknown tokens named,
    and decode without "cleaning up" spaces (which would change the text)."""
    hf = to_hf(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False,
              "eos_token": hf.id_to_token(tokenizer.eos_id), "pad_token": hf.id_to_token(tokenizer.pad_id)}
    unk = hf.id_to_token(lm_tokenizers.UNK_ID) if not isinstance(tokenizer, lm_tokenizers.HuggingFaceTokenizer) \
        else None
    if unk is not None:
        config["unk_token"] = unk
    return config


def _mark_special(hf: Tokenizer, names: list[str]) -> Tokenizer:
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    return hf


def char_tokenizer(chars: str) -> Tokenizer:
    """lm's character vocabulary `chars` (sorted, ids from 3) as a merge-less BPE."""
    vocab = {name: i for i, name in enumerate(SPECIAL_NAMES)}
    vocab.update({c: lm_tokenizers.NUM_SPECIAL + i for i, c in enumerate(chars)})
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    hf.decoder = decoders.Fuse()  # characters join without separators
    return _mark_special(hf, list(SPECIAL_NAMES))


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table from bytes to printable characters (the byte-level BPE alphabet):
    printable Latin-1 bytes stand for themselves, the other 68 for U+0100 onwards in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def byte_tokenizer() -> Tokenizer:
    """lm's byte tokenizer (byte b is id 3 + b) as a byte-level BPE without merges."""
    vocab = {name: i for i, name in enumerate(SPECIAL_NAMES)}
    vocab.update({char: lm_tokenizers.NUM_SPECIAL + b for b, char in byte_to_unicode().items()})
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    # No prefix space and no GPT-2 word splitting: the text's bytes, one id each.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return _mark_special(hf, list(SPECIAL_NAMES))


# sentencepiece_model.proto's enums.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


def sentencepiece_tokenizer(model_proto: bytes) -> Tokenizer:
    """A serialized SentencePiece BPE or unigram model trained as lm trains them."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    _check_settings(proto)
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk_id = next(i for i, (_, _, kind) in enumerate(pieces) if kind == _UNKNOWN)
    byte_fallback = any(kind == _BYTE for _, _, kind in pieces)
    if proto.trainer_spec.model_type == _UNIGRAM:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=unk_id,
                               byte_fallback=byte_fallback)
    else:
        model = models.BPE(vocab={piece: i for i, (piece, _, _) in enumerate(pieces)}, merges=bpe_merges(pieces),
                           unk_token=pieces[unk_id][0], fuse_unk=True, byte_fallback=byte_fallback)
    hf = Tokenizer(model)
    hf.normalizer = normalizers.Replace(" ", SPACE)
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # User-defined symbols are text SentencePiece keeps whole: added tokens, not special.
    hf.add_tokens([AddedToken(piece, special=False, normalized=True) for piece, _, kind in pieces
                   if kind == _USER_DEFINED])
    return _mark_special(hf, [piece for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)])


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Merges under which Hugging Face's BPE segments text as SentencePiece's BPE does.

    SentencePiece merges, at each step, the adjacent pair whose concatenation is the
    highest-scoring normal piece; Hugging Face merges the pair of lowest merge rank. So
    each normal piece contributes every split into two normal pieces, ranked by the
    piece's score (ties by id). Control, unknown, byte and user-defined pieces are never
    merged from text, so they are neither results nor parts.
    """
    normal = {piece for piece, _, kind in pieces if kind == _NORMAL}
    order = sorted((i for i, (_, _, kind) in enumerate(pieces) if kind == _NORMAL), key=lambda i: (-pieces[i][1], i))
    merges = []
    for i in order:
        piece = pieces[i][0]
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in normal and piece[k:] in normal]
    return merges


def _check_settings(proto) -> None:
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if spec.model_type not in (_UNIGRAM, _BPE):
        problems.append(f"model_type {spec.model_type} (only BPE and unigram convert)")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        problems.append(f"normalization {norm.name!r} (lm trains with 'identity')")
    if norm.add_dummy_prefix:
        problems.append("add_dummy_prefix=true")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not norm.escape_whitespaces or spec.treat_whitespace_as_suffix:
        problems.append("whitespace not escaped as a '▁' prefix")
    if problems:
        raise ConfigError("this SentencePiece model has settings tokenizer.json conversion does not reproduce: "
                          + ", ".join(problems) + ". Fix: train the tokenizer with lm (python -m lm.data.tokenizer "
                          "train, or data.sentencepiece.model='').")
