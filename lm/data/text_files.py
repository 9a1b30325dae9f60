"""A TFDS builder over local UTF-8 text files, written as array_record (no TensorFlow).

Each file's text is split at a character index: the first `1 - validation_fraction`
goes to `train`, the rest to `validation` (nanoGPT's split of tiny Shakespeare). Each
split is stored in order as records of whole lines, at most `CHUNK_CHARS` long, so a
reader can rebuild the exact text stream or read it in pieces.

The dataset's config name carries a fingerprint of the files' contents and the split,
so changing a file builds a new dataset instead of reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging

CHUNK_CHARS = 1 << 16


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    validation_fraction: float = 0.1


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Local text files as a TFDS dataset with `train` and `validation` splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Tail-fraction validation split; records of whole lines."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Built from `builder=self` directly: `dataset_info_from_configs` looks for
        # package metadata a builder outside a registered package does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local UTF-8 text files, split by character position.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # records stay in text order
        )

    def _split_generators(self, dl_manager) -> dict:
        return {"train": self._generate_examples("train"),
                "validation": self._generate_examples("validation")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        for file_index, path in enumerate(self.builder_config.files):
            text = read_text(path)
            cut = int(len(text) * (1.0 - self.builder_config.validation_fraction))
            part = text[:cut] if split == "train" else text[cut:]
            for chunk_index, chunk in enumerate(line_chunks(part, CHUNK_CHARS)):
                yield f"{file_index:06d}-{chunk_index:09d}", {"text": chunk}


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 8]!r}). "
                         "Fix: convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`.") from None


def line_chunks(text: str, max_chars: int) -> Iterator[str]:
    """Splits `text` into consecutive pieces of whole lines (a longer line is cut)."""
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline >= start else end
        yield text[start:end]
        start = end


def fingerprint(files: Sequence[str], validation_fraction: float) -> str:
    digest = hashlib.sha256(repr(validation_fraction).encode())
    for path in files:
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:12]


class _DropCustomConfigWarning(logging.logging.Filter):
    """TFDS warns on every run that our (content-named) builder config is custom."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


logging.get_absl_logger().addFilter(_DropCustomConfigWarning())


def builder(name: str, files: Sequence[str], validation_fraction: float, data_dir: str) -> TextFiles:
    """The builder of corpus `name`; `download_and_prepare()` writes it once per content."""
    files = tuple(os.path.abspath(f) for f in files)
    config = TextFilesConfig(name=f"{name}_{fingerprint(files, validation_fraction)}",
                             files=files, validation_fraction=validation_fraction)
    return TextFiles(config=config, data_dir=data_dir, file_format="array_record")
