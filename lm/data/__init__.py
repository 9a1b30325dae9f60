"""The data library, in the order data flows through it.

documents.py   reading text files: corpus files -> documents (and every other user text file)
cleaning.py    documents -> kept documents: quality rules, deduplication, the report
text_files.py  corpus files -> a TFDS dataset of cleaned train and validation documents
build/         the same dataset as datatrove stages in bounded memory (local, Slurm, Ray)
tokenizers.py  text <-> ids: char, byte, SentencePiece and Hugging Face tokenizers
corpus.py      the datasets, the fitted tokenizer and each split's cached token stream
rows.py        token streams -> rows: seeded windows or packed documents; validation rows
batches.py     rows -> this process's slice of each global batch, and the global arrays
corpora/       the bundled corpora (tiny Shakespeare)
"""
