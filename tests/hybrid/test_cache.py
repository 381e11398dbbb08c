"""The in-process memo of per-subject work shared by model families (neurohybrid.hybrid.cache)."""

import numpy as np
import pytest

from neurohybrid.disorders.base import SubjectData
from neurohybrid.hybrid import cache


@pytest.fixture(autouse=True)
def _clean():
    cache.clear()
    yield
    cache.clear()


def _subject(value=1.0, name="s1"):
    return SubjectData(name, "stroke", {"cbf": np.full((3, 3), value, np.float32)}, {"hours_acute": 2.0})


def test_second_call_is_served_from_the_memo_as_an_equal_copy():
    calls = []

    def compute():
        calls.append(1)
        return {"theta": np.array([1.0, 2.0]), "seconds": 0.5}

    first = cache.memo("fit", (_subject(), {"iters": 3}), compute)
    second = cache.memo("fit", (_subject(), {"iters": 3}), compute)  # another object, same content
    assert len(calls) == 1
    assert cache.stats["fit", "miss"] == 1 and cache.stats["fit", "hit"] == 1
    np.testing.assert_array_equal(first["theta"], second["theta"])
    assert first["seconds"] == second["seconds"]  # the measured cost travels with the result
    second["theta"][0] = 99.0  # a caller changing its copy does not change the next caller's
    third = cache.memo("fit", (_subject(), {"iters": 3}), compute)
    assert third["theta"][0] == 1.0 and len(calls) == 1


def test_key_follows_content_settings_and_kind():
    base = cache.key("fit", _subject(), {"iters": 3})
    assert base == cache.key("fit", _subject(), {"iters": 3})
    assert base != cache.key("fit", _subject(value=2.0), {"iters": 3})  # same id, other data
    assert base != cache.key("fit", _subject(name="s2"), {"iters": 3})
    assert base != cache.key("fit", _subject(), {"iters": 4})
    assert base != cache.key("other", _subject(), {"iters": 3})
    assert cache.key("k", [1, 2]) != cache.key("k", (1, 2)) and cache.key("k", 1) != cache.key("k", 1.0)


def test_disabled_recomputes():
    calls = []
    with cache.disabled():
        for _ in range(2):
            cache.memo("fit", (1,), lambda: calls.append(1))
    assert len(calls) == 2
    cache.memo("fit", (1,), lambda: calls.append(1))
    cache.memo("fit", (1,), lambda: calls.append(1))
    assert len(calls) == 3


def test_rng_memo_leaves_the_generators_where_the_computation_would():
    import torch

    def compute():
        return torch.rand(3)

    torch.manual_seed(0)
    first = cache.memo("net", (1,), compute, rng=True)
    after_first = torch.rand(2)
    torch.manual_seed(0)
    second = cache.memo("net", (1,), compute, rng=True)  # served from the memo
    assert cache.stats["net", "hit"] == 1
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(torch.rand(2), after_first)
    torch.manual_seed(1)  # other generator state: another computation
    cache.memo("net", (1,), compute, rng=True)
    assert cache.stats["net", "miss"] == 2


def test_memory_budget_drops_the_oldest(monkeypatch):
    monkeypatch.setattr(cache, "MAX_BYTES", 3 * 800)
    for i in range(4):
        cache.memo("big", (i,), lambda: np.zeros(100))  # 800 bytes each
    cache.memo("big", (0,), lambda: np.zeros(100))  # dropped: computed again
    cache.memo("big", (3,), lambda: np.zeros(100))  # kept
    assert cache.stats["big", "miss"] == 5 and cache.stats["big", "hit"] == 1
    cache.memo("huge", (0,), lambda: np.zeros(1000))  # over the budget on its own: not kept
    cache.memo("huge", (0,), lambda: np.zeros(1000))
    assert cache.stats["huge", "miss"] == 2
