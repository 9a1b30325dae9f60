"""Tiny Shakespeare with a SentencePiece BPE vocabulary and packed documents.

    python -m lm.main --config=configs/shakespeare_bpe.py --workdir=/tmp/shakespeare_bpe

The character recipe's model (4 layers, 4 heads, d_model 128, RoPE) and optimizer, on
the same text cut into paragraphs (speeches), split 90/10 by document hash. A 2,000-piece
BPE vocabulary is trained on the train split the first time (under a second; cached),
and documents are packed into rows of 128 tokens, each speech attending only to itself.
Compare runs by validation bits per byte, which does not depend on the tokenizer.
"""

from lm.configs import shakespeare_char


def get_config():
    config = shakespeare_char.get_config()
    d = config.data
    d.unit = "paragraph"
    d.split = "hash"
    d.tokenizer = "sentencepiece"
    d.sentencepiece.model_type = "bpe"
    d.sentencepiece.vocab_size = 2000
    d.packing = "pack"
    d.seq_len = 128
    config.train.batch_size = 12
    config.sample.prompt = "ROMEO:"
    return config
