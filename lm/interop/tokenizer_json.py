"""`lm` tokenizers written as Hugging Face `tokenizer.json`, so an exported model is usable
by `tokenizers` and `transformers` users (and imported back by `lm.convert import`).

Each kind becomes the Hugging Face model that reproduces its ids exactly:

- char: a BPE model without merges whose vocabulary is `<pad>`, `<eos>`, `<unk>` and the
  characters (ids 3...); each character missing from it becomes one `<unk>`.
- byte: a byte-level BPE without merges: GPT-2's byte-to-character table, byte b at id 3 + b.
- sentencepiece: read from the model proto (`sentencepiece_model_pb2`). Unigram keeps
  the normal pieces and their scores (Viterbi over the same lattice); see
  `unigram_scores` and `unknown_char_split` for the pieces SentencePiece never matches
  in text (control, `<unk>`, byte pieces), which Hugging Face's Unigram would. BPE gets merges derived
  from the vocabulary: every split of a normal piece into two normal pieces, ranked by
  the piece's score, which is the order in which SentencePiece's BPE merges pairs.
  Spaces become "▁" (lm trains with identity normalisation, no dummy prefix, whitespace
  kept); byte pieces are the byte fallback; user-defined symbols are added tokens that
  are text (not special), as in SentencePiece.
- huggingface: the tokenizer.json it was imported from.

`<pad>`, the end-of-document token and `<unk>` are added tokens marked special. Nothing
here needs `transformers`.

Text is data, never control, in the export too, with one switch: `tokenizers` matches a
special token's spelling in text ("<eos>", "</s>") unless `encode_special_tokens` is set,
and tokenizer.json cannot store that runtime flag. `tokenizer_config.json` therefore says
`split_special_tokens: true`, which `transformers` honours (PreTrainedTokenizerFast sets
`encode_special_tokens` from it), and a `tokenizers` user sets
`tokenizer.encode_special_tokens = True`, as lm does. With it, every export encodes any
text to lm's own ids.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from lm.data import tokenizers as lm_tokenizers
from lm.errors import UsageError

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
SPECIAL_NAMES = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2 of lm's char and byte tokenizers


def to_hf(tokenizer: lm_tokenizers.Tokenizer) -> Tokenizer:
    """The `tokenizers.Tokenizer` that encodes text to the same ids as `tokenizer`.

    Raises UsageError for a SentencePiece model with settings lm does not train with
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
    raise UsageError(f"no tokenizer.json conversion for the {tokenizer.kind!r} tokenizer.")


def to_json(tokenizer: lm_tokenizers.Tokenizer) -> str:
    """`tokenizer` as the text of a Hugging Face tokenizer.json."""
    if isinstance(tokenizer, lm_tokenizers.HuggingFaceTokenizer):
        return tokenizer.tokenizer_json  # as imported, byte for byte
    return to_hf(tokenizer).to_str(pretty=True)


def tokenizer_config(tokenizer: lm_tokenizers.Tokenizer, max_len: int) -> dict:
    """tokenizer_config.json for `transformers`: load tokenizer.json as it is
    (PreTrainedTokenizerFast) with its end-of-document, padding and unknown tokens named,
    split special tokens' spellings in text as text (`split_special_tokens`), and decode
    without "cleaning up" spaces (which would change the text)."""
    hf = to_hf(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False,
              # Text spelling a special token ("<eos>") is text: transformers sets the
              # tokenizer's encode_special_tokens from this (tokenizer.json cannot hold it).
              "split_special_tokens": True,
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
    unigram = proto.trainer_spec.model_type == _UNIGRAM
    if unigram:
        model = models.Unigram(unigram_scores(pieces), unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        model = models.BPE(vocab={piece: i for i, (piece, _, _) in enumerate(pieces)}, merges=bpe_merges(pieces),
                           unk_token=pieces[unk_id][0], fuse_unk=True, byte_fallback=byte_fallback)
    hf = Tokenizer(model)
    hf.normalizer = normalizers.Replace(" ", SPACE)
    if unigram and (split := unknown_char_split(pieces, byte_fallback)) is not None:
        hf.pre_tokenizer = split
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # User-defined symbols are text SentencePiece keeps whole: added tokens, not special.
    hf.add_tokens([AddedToken(piece, special=False, normalized=True) for piece, _, kind in pieces
                   if kind == _USER_DEFINED])
    return _mark_special(hf, [piece for piece, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)])


_NEVER_IN_TEXT = (_CONTROL, _UNKNOWN, _BYTE)  # pieces SentencePiece never matches in text


def unigram_scores(pieces: list[tuple[str, float, int]]) -> list[tuple[str, float]]:
    """(piece, score) for Hugging Face's Unigram: normal pieces keep SentencePiece's
    scores; control, unknown and byte pieces get one so low that Viterbi never prefers
    them to spelling their text with normal pieces.

    SentencePiece keeps those pieces out of its lattice; Hugging Face's Unigram puts every
    vocabulary entry in it, and their SentencePiece score (0, the best) makes it match
    "</s>" or "<0x41>" in text. A piece of L characters made of known characters has a
    normal path of at most L single characters, each scoring at least the lowest normal
    score m < 0, so any score below (L + 1) * m loses. The scores serve nothing else:
    `<unk>` and byte fallback are emitted by id, not chosen by score. Lowering the minimum
    also lowers Hugging Face's unknown-character score (minimum - 10), by the same amount
    on every path, since only unknown nodes cover an unknown character (for a model
    whose characters are all pieces, as lm trains them: character_coverage=1.0).
    A spelling with a character outside the vocabulary is a different case: every path
    through an unknown node costs 10 more than any score, so `unknown_char_split` cuts it.
    """
    normal = [score for _, score, kind in pieces if kind == _NORMAL]
    longest = max((len(piece) for piece, _, kind in pieces if kind in _NEVER_IN_TEXT), default=1)
    never = (longest + 1) * min(min(normal, default=-1.0), -1.0) - 1.0
    return [(piece, never if kind in _NEVER_IN_TEXT else score) for piece, score, kind in pieces]


def unknown_char_split(pieces: list[tuple[str, float, int]], byte_fallback: bool):
    """A pre-tokenizer that cuts the spelling of every control, unknown and byte piece at
    the characters of it the vocabulary lacks, or None where it has them all.

    Hugging Face's Unigram scores an unknown character 10 below the lowest piece, so text
    like "</s>" whose "<" is outside the vocabulary matches the piece "</s>" whatever its
    score. Cutting the text around unknown characters never changes how text encodes
    otherwise: no normal piece holds an unknown character, so every path already has a
    boundary on either side of it. With byte fallback each unknown character stands alone
    (it becomes its UTF-8 bytes either way); without it a run of unknown characters stays
    one pre-token, since SentencePiece fuses the run into one `<unk>`.

    Raises UsageError when a piece's spelling is made only of unknown characters and no
    cut can isolate it (without byte fallback, or a one-character piece).
    """
    known = {c for piece, _, kind in pieces if kind == _NORMAL for c in piece}
    never = [piece for piece, _, kind in pieces if kind in _NEVER_IN_TEXT]
    unknown = sorted({c for piece in never for c in piece} - known)
    if not unknown:
        return None
    # A cut separates a piece from its spelling unless the piece is one pre-token itself.
    unspellable = [piece for piece in never if not set(piece) & known and (len(piece) == 1 or not byte_fallback)]
    if unspellable:
        raise UsageError(f"the SentencePiece pieces {unspellable} are spelled only in characters outside the "
                          "vocabulary, so a tokenizer.json would read text spelling them as those pieces. Fix: "
                          "train the tokenizer with lm (config.data.sentencepiece.byte_fallback=True).")
    if byte_fallback:
        return pre_tokenizers.Split(Regex(_char_class(unknown)), "isolated")
    return pre_tokenizers.Split(Regex(_char_class(sorted(known), negate=True) + "+"), "isolated")


def _char_class(chars: list[str], negate: bool = False) -> str:
    """A regex character class (Oniguruma syntax, as `tokenizers.Regex` reads it)."""
    return "[" + ("^" if negate else "") + "".join(f"\\x{{{ord(c):X}}}" for c in chars) + "]"


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
        raise UsageError("this SentencePiece model has settings tokenizer.json conversion does not reproduce: "
                          + ", ".join(problems) + ". Fix: train the tokenizer with lm (python -m lm.tokenizer "
                          "train, or data.sentencepiece.model='').")
