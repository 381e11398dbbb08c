"""The per-subject context (``SharedWork``): families of one process share a result computed once,
keyed by what it depends on, without disturbing the global random generators."""

from __future__ import annotations

import numpy as np
import torch

from neurohybrid.disorders.base import SubjectData, TrainingPairs, shared_work


def _subject():
    return SubjectData("s1", "glioma", {"x": np.arange(3.0)}, {"days": [0, 10]})


def test_a_result_is_computed_once_per_subject_and_settings():
    data, calls = _subject(), []

    def compute():
        calls.append(1)
        return {"theta": len(calls)}

    first = data.shared.get("fit", {"iters": 3}, compute)
    assert data.shared.get("fit", {"iters": 3}, compute) is first
    assert data.shared.get("fit", {"iters": 4}, compute) is not first  # other settings, other result
    assert _subject().shared.get("fit", {"iters": 3}, compute) is not first  # another subject's data
    assert len(calls) == 3 and data.shared.computed["fit"] == 2


def test_seeded_work_leaves_the_global_generators_alone_and_does_not_depend_on_the_caller():
    data = _subject()

    def draw():
        return float(torch.rand(1)) + float(np.random.rand())

    torch.manual_seed(0)
    np.random.seed(0)
    value = data.shared.get("net", None, draw, seed=5)
    after = (float(torch.rand(1)), float(np.random.rand()))
    torch.manual_seed(0)
    np.random.seed(0)
    assert (float(torch.rand(1)), float(np.random.rand())) == after  # as if nothing had been drawn
    torch.manual_seed(123)  # another caller, another global state: the same result
    assert _subject().shared.get("net", None, draw, seed=5) == value


def test_training_pairs_carry_their_own_shared_work():
    pairs = TrainingPairs([(_subject(), _subject())])
    assert isinstance(pairs, list) and len(pairs) == 1
    assert shared_work(pairs) is pairs.shared
    assert shared_work([1, 2]) is not shared_work([1, 2])  # a plain list shares nothing


def test_shared_work_is_not_saved(tmp_path):
    data = _subject()
    data.shared.get("fit", None, lambda: 1)
    data.save(tmp_path / "d.npz")
    again = SubjectData.load(tmp_path / "d.npz")
    assert again.shared.computed["fit"] == 0 and again.meta == data.meta
