"""What every disorder and every model family provides, and how model data is stored.

A disorder module (``neurohybrid.disorders.<name>``) exposes ``DISORDER``, an instance of a
``Disorder`` subclass that knows how to build a subject's model inputs and held-out target from
BIDS + preprocessing outputs, which model families it has, and how to write a forecast in the
field's formats (NIfTI / TSV).

Model data (inputs and targets) are an ``.npz`` of arrays plus a ``.json`` sidecar of metadata,
so models read exactly the arrays they need and nothing of the held-out session.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from neurohybrid.registry import DISORDERS, FAMILY_NAMES as FAMILIES  # noqa: F401  (re-exported)
from neurohybrid.errors import InputError
from neurohybrid.io.atomic import atomic_path, write_json


class SharedWork:
    """Work that several families of one process start from, done once: the per-subject context.

    `neurohybrid train` and `forecast` load each subject's inputs once and hand the same
    ``SubjectData`` to every family, and a fold's training pairs as one ``TrainingPairs``; their
    ``shared`` holds what the families share (the mechanistic calibration, the state at the last
    session, fine-solver trajectories, a parameter network both amortised families use). A result
    is named and keyed by the settings it depends on, lives as long as the subject's data, and is
    the same object for every family (read it, do not modify it).

    ``seed``: the computation runs on its own seeded random generators and leaves the global ones
    untouched, so a result and everything after it are the same whichever family asked first.
    """

    def __init__(self):
        self._results: dict[tuple[str, str], Any] = {}
        self.computed: collections.Counter = collections.Counter()  # per name, for tests and logs

    def get(self, name: str, depends_on, compute: Callable[[], Any], *, seed: int | None = None) -> Any:
        key = (name, json.dumps(depends_on, sort_keys=True, default=_digest))
        if key not in self._results:
            with _own_random_generators(seed):
                self._results[key] = compute()
            self.computed[name] += 1
        return self._results[key]


def _digest(obj) -> str:
    """Arrays enter a SharedWork key by their content (repr would elide most of a large one)."""
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return f"{obj.dtype.str}{obj.shape}:" + hashlib.blake2b(np.ascontiguousarray(obj).tobytes(), digest_size=16).hexdigest()
    if isinstance(obj, np.generic):
        return repr(obj.item())
    return repr(obj)


@contextlib.contextmanager
def _own_random_generators(seed: int | None):
    if seed is None:
        yield
        return
    import random

    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TrainingPairs(list):
    """A fold's (inputs, target) pairs with the work its families share (``SharedWork``)."""

    def __init__(self, pairs=()):
        super().__init__(pairs)
        self.shared = SharedWork()


def shared_work(obj) -> SharedWork:
    """``obj.shared`` (SubjectData, TrainingPairs); a throw-away one for a plain list."""
    return getattr(obj, "shared", None) or SharedWork()


@dataclasses.dataclass
class SubjectData:
    """Arrays + metadata of one subject: either its model inputs or its held-out target, with the
    work the families of one process share on it (``shared``, never saved)."""

    subject: str
    disorder: str
    arrays: dict[str, np.ndarray]
    meta: dict
    shared: SharedWork = dataclasses.field(default_factory=SharedWork, repr=False, compare=False)

    def save(self, npz_path: str | Path) -> None:
        npz_path = Path(npz_path)
        with atomic_path(npz_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **self.arrays)
        write_json(npz_path.with_suffix(".json"), {"subject": self.subject, "disorder": self.disorder, **self.meta})

    @classmethod
    def load(cls, npz_path: str | Path, *, subject: str | None = None) -> "SubjectData":
        npz_path = Path(npz_path)
        sidecar = npz_path.with_suffix(".json")
        for path in (npz_path, sidecar):
            if not path.exists():
                raise InputError("model data file not found", file=path, subject=subject)
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(sidecar.read_text())
        except Exception as exc:
            raise InputError(f"cannot read model data ({type(exc).__name__}: {exc})", file=npz_path, subject=subject) from None
        return cls(subject=meta.pop("subject"), disorder=meta.pop("disorder"), arrays=arrays, meta=meta)


def inputs_path(inputs_dir: str | Path, subject: str) -> Path:
    return Path(inputs_dir) / f"sub-{subject}" / f"sub-{subject}_desc-modelinputs.npz"


def target_path(targets_dir: str | Path, subject: str) -> Path:
    return Path(targets_dir) / f"sub-{subject}" / f"sub-{subject}_desc-target.npz"


@dataclasses.dataclass
class Forecast:
    """A family's forecast of the held-out session, with what was fitted and how long it took."""

    outputs: dict[str, np.ndarray]
    parameters: dict
    fit_seconds: float
    inference_seconds: float
    extra: dict = dataclasses.field(default_factory=dict)


class Family(abc.ABC):
    """One model family for one disorder.

    ``train`` learns the cross-subject component from (inputs, target) pairs of a fold's training
    subjects and returns a checkpoint dictionary (tensors and plain values, saved with torch.save);
    ``forecast`` fits the subject's own parameters on its inputs (earlier sessions) and predicts
    the held-out session. Families without a cross-subject component leave ``train`` unused.
    """

    name: str = ""
    trains_across_subjects: bool = False

    def __init__(self, config: dict, device):
        self.config = config
        self.device = device

    def train(self, pairs: list[tuple[SubjectData, SubjectData]]) -> dict:
        raise NotImplementedError(f"family {self.name} has no cross-subject component")

    @abc.abstractmethod
    def forecast(self, inputs: SubjectData, trained: dict | None) -> Forecast: ...


class Disorder(abc.ABC):
    name: str = ""
    families: dict[str, type[Family]] = {}

    @abc.abstractmethod
    def build_inputs(self, subject: str, bids_dir: Path, preproc_dir: Path, config: dict) -> tuple[SubjectData, SubjectData]:
        """(inputs of every session but the last, target of the last session)."""

    @abc.abstractmethod
    def write_forecast(self, forecast: Forecast, inputs: SubjectData, family: str, out_dir: Path) -> list[Path]:
        """Write the forecast's NIfTI/TSV files (not the fit json); return their paths."""

    def family(self, name: str, config: dict, device) -> Family:
        if name not in self.families:
            raise InputError(f"disorder {self.name} has no model family {name!r} (known: {', '.join(self.families)})")
        return self.families[name](config, device)


def get_disorder(name: str) -> Disorder:
    import importlib

    if name not in DISORDERS:
        raise InputError(f"unknown disorder {name!r}: use glioma, alzheimer or stroke")
    return importlib.import_module(f"neurohybrid.disorders.{name}").DISORDER
