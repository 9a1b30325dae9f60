"""Tiny Shakespeare with a SentencePiece BPE vocabulary and packed documents.

    python -m lm.main --config=configs/shakespeare_bpe.py --workdir=/tmp/shakespeare_bpe

The character recipe's model (4 layers, 4 heads, d_model 128, RoPE) and optimizer, on
the same text cut into paragraphs (speeches), split 90/10 by document hash. A 2,000-piece
BPE vocabulary is trained on the train split the first time (under a second; cached),
and documents are packed into rows of 128 tokens, each speech attending only to itself.
Compare runs by validation bits per byte, which does not depend on the tokenizer.
Expected: 1.04M parameters, about 11 minutes on a 2-core CPU, validation loss 3.92 per
token = 1.92 bits per byte at step 2000 (the character recipe: 2.56 bits per byte, on
its own validation tail; this one holds out 10% of the speeches by hash), and a sample
of speeches separated by blank lines.
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
