"""How well a grouping of images recovers known copies: the figures the copy benchmark reports
and a model's calibration is chosen on.

Ground truth is a source per image (an original and its edits share one); any two images of
different sources are distinct. A method is scored on the groups it acts on, the connected
components of its pairs:
  - pair precision: of the pairs of images inside predicted groups, the share that are copies
    (one false edge between two groups of 15 costs 225 false pairs: chaining is punished);
  - recall of an edit (a family): the share of its images grouped with their original;
  - wrongly merged: distinct originals that share a group with another original's image.
"""

import numpy as np

from curate.copy_model.edits import EASY_FAMILIES, EDITS, FAMILIES, HARD_GEOMETRIC


def _pairs_within(labels: np.ndarray) -> int:
    sizes = np.unique(labels, return_counts=True)[1].astype(np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def originals_of(source: np.ndarray, edit: np.ndarray) -> np.ndarray:
    """Row of each source's original (the row with no edit), indexed by source."""
    original = np.full(int(source.max()) + 1, -1, np.int64)
    unedited = np.flatnonzero(edit == "")
    original[source[unedited]] = unedited
    if (original[np.unique(source)] < 0).any():
        raise ValueError("every source needs its original (a row with no edit)")
    return original


def score_groups(labels: np.ndarray, source: np.ndarray, edit: np.ndarray) -> dict:
    """Every figure of the module docstring for one grouping (`labels`, one per image)."""
    labels = np.asarray(labels, np.int64)
    source = np.asarray(source, np.int64)
    edit = np.asarray(edit, dtype=object)
    family = np.array([_FAMILY.get(name, "") for name in edit], dtype=object)
    both = labels * (int(source.max()) + 1) + source
    predicted, correct, truth = _pairs_within(labels), _pairs_within(both), _pairs_within(source)
    found = labels == labels[originals_of(source, edit)[source]]
    per_edit = {
        e.name: float(found[edit == e.name].mean()) for e in EDITS if (edit == e.name).any()
    }
    per_family = {f: float(found[family == f].mean()) for f in FAMILIES if (family == f).any()}
    easy = np.isin(family, EASY_FAMILIES)
    # The sources of each group; a group holding two of them merged distinct pictures.
    order = np.lexsort((source, labels))
    ranked_labels, ranked_sources = labels[order], source[order]
    first = np.r_[True, ranked_labels[1:] != ranked_labels[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    differs = ranked_sources != ranked_sources[group_start]
    mixed_labels = np.unique(ranked_labels[differs])
    mixed_group = np.isin(ranked_labels, mixed_labels)
    return {
        "pair_precision": correct / predicted if predicted else 1.0,
        "pair_recall": correct / truth if truth else 1.0,
        "predicted_pairs": predicted,
        "true_pairs_found": correct,
        "easy_recall": float(found[easy].mean()) if easy.any() else None,
        "hard_geometric_recall": per_family.get(HARD_GEOMETRIC),
        "per_family_recall": per_family,
        "per_edit_recall": per_edit,
        "wrongly_merged": int(np.unique(ranked_sources[mixed_group]).size),
    }


_FAMILY = {edit.name: edit.family for edit in EDITS}
