"""A split of a built benchmark, and scoring a method on it (curate.copy_model.scores: pair
precision of the predicted groups, recall per edit and family, distinct images wrongly merged).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.copy_model.scores import score_groups
from curate.stages.dedup.grouping import connected_components


@dataclass(frozen=True)
class Split:
    """One split of a built benchmark, in manifest order (each original before its edits)."""

    folder: Path
    files: list[str]
    source: np.ndarray  # int64: index of the file's original among the split's originals
    edit: np.ndarray  # object: edit name, "" for an original
    family: np.ndarray  # object: edit family, "" for an original
    category: np.ndarray  # object

    @property
    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.files]

    def __len__(self) -> int:
        return len(self.files)


def load_split(build: Path, name: str) -> Split:
    rows = json.loads((build / "manifest.json").read_text())["splits"][name]
    index = {source: i for i, source in enumerate(sorted({row["source"] for row in rows}))}
    return Split(
        folder=build / name,
        files=[row["file"] for row in rows],
        source=np.array([index[row["source"]] for row in rows], np.int64),
        edit=np.array([row["edit"] for row in rows], dtype=object),
        family=np.array([row["family"] for row in rows], dtype=object),
        category=np.array([row["category"] for row in rows], dtype=object),
    )


def score_labels(labels: np.ndarray, split: Split) -> dict:
    return score_groups(labels, split.source, split.edit)


def score_pairs(left: np.ndarray, right: np.ndarray, split: Split) -> dict:
    """The scores of the connected components of raw pairs."""
    return score_labels(connected_components(len(split), left, right), split)
