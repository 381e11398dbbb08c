"""Subject-level cross-validation folds: no subject is ever in both a fold's training and test set."""

from __future__ import annotations

import hashlib


def assign_folds(subjects, n_folds: int, seed: int = 0) -> dict[str, int]:
    """Deterministic, balanced assignment of subjects to folds 0..n_folds-1.

    Subjects are ordered by a seeded hash of their id (so the assignment does not depend on the
    order they are listed in, and adding a subject moves few others), then dealt round-robin.
    With fewer subjects than folds, the number of folds shrinks to the number of subjects.
    """
    subjects = sorted(set(subjects))
    if n_folds < 2:
        raise ValueError("n_folds must be at least 2")
    n_folds = min(n_folds, len(subjects))

    def key(subject: str) -> str:
        return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()

    ordered = sorted(subjects, key=key)
    return {subject: i % n_folds for i, subject in enumerate(ordered)}


def training_subjects(folds: dict[str, int], fold: int) -> list[str]:
    """The subjects a fold's model is trained on: everyone not in that fold."""
    return sorted(s for s, f in folds.items() if f != fold)


def held_out_subjects(folds: dict[str, int], fold: int) -> list[str]:
    return sorted(s for s, f in folds.items() if f == fold)
