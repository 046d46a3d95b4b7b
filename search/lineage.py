"""Which trials may be compared, and where a model came from: hashes of the annotation files and the epoch budget."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from trainers.words import counted

# On the parent run and on every trial run: a trial is compared only with trials of the same data and epoch budget.
DATA_HASH_TAG = "effsearch.data_hash"
EPOCHS_TAG = "effsearch.epochs"
SPLIT_HASH_TAG = "effsearch.data.{split}.sha256"  # on the parent run, per split, for a model version's lineage


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Comparable:
    """Trials with the same annotation files (train and val) and the same epoch budget: only these share a frontier.
    AP on other validation data, or after another number of epochs, is not the same measurement."""

    data_hash: str
    epochs: int

    @classmethod
    def of(cls, split_hashes: dict[str, str], epochs: int) -> "Comparable":
        joined = ",".join(f"{split}={split_hashes[split]}" for split in sorted(split_hashes))
        return cls(hashlib.sha256(joined.encode()).hexdigest()[:16], int(epochs))

    @classmethod
    def from_tags(cls, tags: dict) -> "Comparable | None":
        if DATA_HASH_TAG not in tags or EPOCHS_TAG not in tags:
            return None  # a run recorded before these tags existed
        return cls(tags[DATA_HASH_TAG], int(tags[EPOCHS_TAG]))

    def tags(self) -> dict[str, str]:
        return {DATA_HASH_TAG: self.data_hash, EPOCHS_TAG: str(self.epochs)}

    def filter(self) -> str:
        return f"tags.`{DATA_HASH_TAG}` = '{self.data_hash}' and tags.`{EPOCHS_TAG}` = '{self.epochs}'"

    def describe(self) -> str:
        return f"data {self.data_hash}, {counted(self.epochs, 'epoch')}"


def training_key(comparable: Comparable, settings: dict) -> str:
    """What a trial's results depend on beyond its configuration: the data, the epochs and the job's other
    training and model settings (JSON-able). A repeated proposal reuses a trial's results only under the same key."""
    payload = json.dumps({"data": comparable.data_hash, "epochs": comparable.epochs, **settings}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def split_hashes(annotation_files: dict[str, str]) -> dict[str, str]:
    return {split: file_sha256(path) for split, path in annotation_files.items()}
