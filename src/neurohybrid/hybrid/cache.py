"""In-process memo of per-subject work that several model families repeat.

The workflow forecasts every family of a subject in one process (and trains every family of a
disorder x fold in one process). Several families start from the same per-subject computation:
the mechanistic calibration (stroke: mechanistic, residual, ude, sol, sol_precomputed; glioma:
the same plus the state at the last session), the fine reference solve of the SOL families, the
calibrated labels of the amortised families, the fine-solver training trajectories of sol and
sol_precomputed. ``memo`` computes such a result once per process and hands later callers a
copy of it.

Keys are digests of everything the result depends on, built by ``key``: the kind of computation,
the subject id, the *content* of the arrays it reads (so two subjects that share an id, e.g. in
tests, never share a result), and the full settings dict. Nothing is written to disk, so a
changed input or code version can never be served a stale result across runs.

Cached values keep the seconds they measured when they were computed (e.g. a fit's calibration
time): a family's reported fit time is the cost of its method, not of the process it ran in.

Computations that draw from the global random generators (e.g. initialising a network) use
``memo(..., rng=True)``: the generators' states enter the key, and a hit leaves them where the
computation would have left them, so results do not depend on whether the memo served the call.

The memo holds at most ``MAX_ENTRIES`` results and ``MAX_BYTES`` of arrays, dropping the oldest first.

``clear()`` empties the memo; ``disabled()`` turns it off inside a ``with`` block (or set
NEUROHYBRID_NO_CACHE=1); ``stats`` counts hits and misses per kind.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

MAX_ENTRIES = 256  # a process holds one subject (forecast) or one fold's subjects (training)
MAX_BYTES = 512 * 2**20  # arrays held (e.g. fine trajectories of a paper-scale fold); oldest dropped first

_store: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
_enabled = [os.environ.get("NEUROHYBRID_NO_CACHE", "") in ("", "0")]
stats: collections.Counter = collections.Counter()


def _feed(h, obj) -> None:
    """Feed a canonical, type-tagged encoding of obj into the hash."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, np.ndarray) or type(obj).__module__ == "torch" and hasattr(obj, "detach"):
        arr = obj.detach().cpu().numpy() if hasattr(obj, "detach") else obj
        arr = np.ascontiguousarray(arr)
        h.update(f"nd:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes())
    elif isinstance(obj, np.generic):
        _feed(h, obj.item())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[".encode())
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dc:{type(obj).__qualname__}".encode())
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    else:
        raise TypeError(f"cannot build a cache key from {type(obj).__name__}")


def key(kind: str, *parts) -> str:
    """Digest of ``kind`` and ``parts`` (numbers, strings, arrays, tensors, dicts, lists, dataclasses
    such as ``SubjectData``: its subject id, arrays and metadata all enter the key)."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, kind)
    _feed(h, list(parts))
    return f"{kind}:{h.hexdigest()}"


def _rng_states():
    """States of the global generators a computation may draw from (python, numpy, torch)."""
    import random

    import torch

    states = [random.getstate(), np.random.get_state(), torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state_all())
    return states


def _set_rng_states(states) -> None:
    import random

    import torch

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])
    if len(states) > 3:
        torch.cuda.set_rng_state_all(states[3])


def _nbytes(obj) -> int:
    """Bytes of the arrays and tensors inside obj (the rest is small)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if type(obj).__module__ == "torch" and hasattr(obj, "element_size"):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def memo(kind: str, parts, compute: Callable[[], Any], *, rng: bool = False) -> Any:
    """compute() once per process for the same (kind, parts); later calls get a deep copy.

    rng=True: compute() draws from the global random generators; their states are part of the key
    and a hit restores the states the computation left behind."""
    if not _enabled[0]:
        stats[kind, "miss"] += 1
        return compute()
    k = key(kind, *parts, *(_rng_states() if rng else ()))
    if k in _store:
        stats[kind, "hit"] += 1
        _store.move_to_end(k)
        value, after, _ = _store[k]
        if after is not None:
            _set_rng_states(after)
        return copy.deepcopy(value)
    stats[kind, "miss"] += 1
    value = compute()
    size = _nbytes(value)
    if size > MAX_BYTES:
        return value
    _store[k] = (copy.deepcopy(value), _rng_states() if rng else None, size)
    while len(_store) > MAX_ENTRIES or sum(v[2] for v in _store.values()) > MAX_BYTES:
        _store.popitem(last=False)
    return value


def clear() -> None:
    _store.clear()
    stats.clear()


@contextlib.contextmanager
def disabled():
    saved = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = saved


def describe() -> str:
    """One line of hits/misses per kind (for logs)."""
    kinds = sorted({k for k, _ in stats})
    return json.dumps({k: {"hit": stats[k, "hit"], "miss": stats[k, "miss"]} for k in kinds})
