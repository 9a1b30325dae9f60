"""Corpus files -> a TFDS dataset of cleaned train and validation documents (array_record,
no TensorFlow needed): the dataset builder, its options and its cleaning report.

Building reads the files as documents (`lm.data.documents` for `.txt` and `.jsonl`(`.gz`)
with the default text column and no filter; `lm.data.sources` for `.jsonl.zst`, Parquet,
`datasets` folders, `data.text_column` and `data.where`), assigns each to `train` or
`validation`, cleans them (`lm.data.cleaning`: quality rules, exact and near
deduplication across both splits) and stores one record per document, in order. The
cleaning report is saved in the dataset's metadata (`builder.info.metadata["report"]`).

Validation is either the tail of each file (`split="tail"`: the last
`validation_fraction` of a text file's characters, or of any other input's documents;
nanoGPT's split of tiny Shakespeare) or chosen by document hash (`split="hash"`: stable
under reordering, adding or removing other documents).

The dataset's config name carries a fingerprint of the files' contents, of every
option and of the reader's version (`documents.READER_VERSION`), so a change builds a
new dataset (and token cache) instead of reusing a stale one. TFDS writes
into a temporary directory and renames it only on success, so a failed build leaves
nothing that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from lm.data import cleaning, documents, sources
from lm.data.documents import CorpusError, Document


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    options: str = "{}"  # JSON of the cleaning options (`corpus_options`)


def corpus_options(data: ml_collections.ConfigDict, source: str = "") -> dict:
    """The part of `config.data` that decides the built dataset's contents; with `source`
    (a key of `data.sources`), that source's own text_column and where where it has them.
    Those two are present only when not the defaults ("text", no filter), so corpora built
    before they existed keep their fingerprints (and token caches)."""
    options = {"unit": data.unit, "normalize": data.normalize, "split": data.split,
               "validation_fraction": data.validation_fraction,
               "filters": data.filters.to_dict(), "dedup": data.dedup.to_dict()}
    own = data.sources[source] if source else {}
    text_column, where = own.get("text_column", data.text_column), own.get("where", data.where)
    if text_column != "text":
        options["text_column"] = text_column
    if where.strip():
        options["where"] = where
    return options


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """A local corpus's info, never looked up in TFDS's bucket of published datasets: tfds
    (4.9) looks there for every dataset not yet built and, finding nothing, leaves behind
    the empty temporary folder it made for the files (one in /tmp per corpus and run)."""

    def initialize_from_bucket(self) -> None:
        pass


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Local corpus files as a TFDS dataset with `train` and `validation` splits."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Tail-fraction validation split; records of whole lines.",
                     "2.0.0": "One record per document; cleaning, deduplication, hash split."}

    def _info(self) -> tfds.core.DatasetInfo:
        # Built from `builder=self` directly: `dataset_info_from_configs` looks for
        # package metadata a builder outside a registered package does not have.
        return _LocalDatasetInfo(
            builder=self,
            description="Local text/JSONL files as cleaned, deduplicated documents.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # records stay in corpus order
            metadata=tfds.core.MetadataDict(),
        )

    def _log_download_bytes(self) -> None:  # TFDS's "Downloading ... Unknown size" line
        print(f"building corpus {self.builder_config.name} from {len(self.builder_config.files)} file(s) "
              f"(once; reused until the files or data options change)", flush=True)

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager) -> dict:
        kept = self._clean()
        return {split: self._generate_examples(kept[split]) for split in ("train", "validation")}

    def _generate_examples(self, docs: list[Document]) -> Iterator[tuple[str, dict]]:
        for i, doc in enumerate(docs):
            yield f"{i:012d}", {"text": doc.text}

    def _clean(self) -> dict[str, list[Document]]:
        options = json.loads(self.builder_config.options)
        report = cleaning.Report()
        by_split: dict[str, list[Document]] = {"train": [], "validation": []}
        rules = ml_collections.ConfigDict(options["filters"])
        dedup = ml_collections.ConfigDict(options["dedup"])
        tagged = _documents_with_splits(self.builder_config.files, options)
        for doc, split in cleaning.clean(tagged, rules, dedup, report, text=lambda pair: pair[0].text):
            by_split[split].append(doc)
        check_kept(self.builder_config.files, options, report.read.documents,
                   {split: len(docs) for split, docs in by_split.items()})
        self.info.metadata["report"] = {**report.to_json(), "splits": {
            s: {"documents": len(d), "chars": sum(len(x.text) for x in d)} for s, d in by_split.items()}}
        return by_split


def check_kept(files: Sequence[str], options: dict, read: int, kept: dict[str, int]) -> None:
    """Raises CorpusError (both builds: one message) when no document, or none of a split,
    survived cleaning; `kept`: split -> documents kept. The fix names `data.where` when set."""
    if not sum(kept.values()):
        where = "config.data.where / " if options.get("where") else ""
        raise CorpusError(f"no document of {', '.join(files)} survived cleaning ({read} read). Fix: check the "
                          f"files have text, or relax {where}config.data.filters / config.data.dedup.")
    for split, count in kept.items():
        if not count:
            raise CorpusError(f"the {split} split is empty ({sum(kept.values())} documents kept in all). Fix: "
                              "use more documents, or change config.data.validation_fraction or config.data.split.")


def _file_documents(path: str, options: dict) -> Iterator[Document]:
    """One input's documents: `.txt` and `.jsonl`(`.gz`) read as always, without a text
    column or filter option; other inputs, or with those, through `lm.data.sources`."""
    text_column, where = options.get("text_column", "text"), options.get("where", "")
    if path.endswith(documents.SUFFIXES) and text_column == "text" and not where:
        yield from documents.read_documents(path, options["unit"], options["normalize"])
        return
    for text, _ in sources.read(path, text_column, where, unit=options["unit"], normalize=options["normalize"],
                                columns=()):
        yield Document(text, path)


def _documents_with_splits(files: Sequence[str], options: dict) -> Iterator[tuple[Document, str]]:
    fraction = options["validation_fraction"]
    sources.check_schemas(files, options.get("text_column", "text"), options.get("where", ""))
    for path in files:
        if options["split"] == "hash":
            for doc in _file_documents(path, options):
                yield doc, "validation" if _unit_hash(doc.text) < fraction else "train"
        elif not path.endswith((".txt", ".txt.gz")) or options.get("where"):
            # Documents of a JSONL, Parquet or datasets input: its last fraction is validation.
            docs = list(_file_documents(path, options))
            cut = int(len(docs) * (1.0 - fraction))
            yield from ((doc, "train" if i < cut else "validation") for i, doc in enumerate(docs))
        else:
            text = documents.normalize(documents.read_text(path), options["normalize"])
            cut = int(len(text) * (1.0 - fraction))
            for split, part in (("train", text[:cut]), ("validation", text[cut:])):
                yield from ((Document(t, path), split) for t in documents.split_units(part, options["unit"]))


def _unit_hash(text: str) -> float:
    """A document's hash as a number in [0, 1): its split depends on nothing else."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2 ** 64


def fingerprint(files: Sequence[str], options: dict) -> str:
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files:  # a file's SHA-256, or a datasets folder's (`documents.file_digest`)
        digest.update(bytes.fromhex(documents.file_digest(path)))
    return digest.hexdigest()[:12]


class _DropCustomConfigWarning(logging.logging.Filter):
    """TFDS warns on every run that our (content-named) builder config is custom."""

    def filter(self, record) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


logging.get_absl_logger().addFilter(_DropCustomConfigWarning())


def builder(name: str, files: Sequence[str], options: dict, data_dir: str) -> TextFiles:
    """The builder of corpus `name`; `download_and_prepare()` writes it once per content."""
    files = tuple(os.path.abspath(f) for f in files)
    # The reader's version names the build (and so its token cache), not the corpus: a
    # run's record of its corpus (content fingerprints) stays valid across reader changes.
    built_by = {**options, "reader": documents.READER_VERSION}
    config = TextFilesConfig(name=f"{name}_{fingerprint(files, built_by)}", files=files,
                             options=json.dumps(options, sort_keys=True))
    return TextFiles(config=config, data_dir=data_dir, file_format="array_record")


def is_built(builder: TextFiles) -> bool:
    """Whether the builder's dataset is in place (either build writes its info last)."""
    return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def report(built: TextFiles) -> dict:
    """The cleaning report of a built dataset."""
    return dict(built.info.metadata.get("report", {}))
