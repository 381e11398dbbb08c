import pytest
import torch

from neurohybrid.errors import InputError
from neurohybrid.hybrid.device import resolve_device
from neurohybrid.hybrid.splits import assign_folds, held_out_subjects, training_subjects


def test_folds_are_disjoint_balanced_and_deterministic():
    subjects = [f"s{i:02d}" for i in range(11)]
    folds = assign_folds(subjects, 3, seed=1)
    assert folds == assign_folds(list(reversed(subjects)), 3, seed=1)  # order-independent
    sizes = sorted(list(folds.values()).count(k) for k in range(3))
    assert sizes == [3, 4, 4]
    for k in range(3):
        train, test = set(training_subjects(folds, k)), set(held_out_subjects(folds, k))
        assert not train & test and train | test == set(subjects)
    assert assign_folds(subjects, 3, seed=2) != folds  # the seed matters


def test_fewer_subjects_than_folds():
    folds = assign_folds(["a", "b"], 5)
    assert sorted(folds.values()) == [0, 1]


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
