"""Glioma radiotherapy: the per-subject treatment table, its fraction schedule and the LQ kill.

Table (BIDS-style, beside the sessions table): ``<bids>/sub-S/sub-S_treatment.tsv``, one row per
course of fractionated external-beam radiotherapy, described by ``sub-S_treatment.json``:

==================== ==========================================================================
start_day            day of the first fraction on the sessions table's ``day`` clock (days since
                     the subject's first session), or a session label ``ses-L``: the course
                     starts on that session's day (after its imaging)
fractions            number of fractions (integer >= 1)
dose_per_fraction_gy dose per fraction in Gy (> 0, <= 30)
fractions_per_week   fractions per week (integer 1..7): fraction k (0-based) is given on day
                     start + 7 (k // n) + (k % n), i.e. n consecutive days then a pause
                     (5: Monday to Friday when the course starts on a Monday)
target_mask          the irradiated volume: a mask in the subject's T1w space, a path relative
                     to the BIDS root of the form ``derivatives/lesions/sub-S/ses-L/anat/
                     sub-S_ses-L_space-T1w_desc-RTtarget_mask.nii.gz`` (preprocessing maps it
                     onto the model grid like the lesion masks), or ``n/a``: every voxel
==================== ==========================================================================

The linear-quadratic kill (``solvers.glioma.Radiotherapy``): each fraction multiplies the tumour cell
density inside the target by exp(-(alpha d + beta d^2)). The subject's radiosensitivity is not in the
table (no clinic measures it): the models use the population value of the settings (``rt_alpha``,
``rt_alpha_beta_gy``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from neurohybrid.errors import InputError

COLUMNS = ("start_day", "fractions", "dose_per_fraction_gy", "fractions_per_week", "target_mask")
TARGET_DESC = "RTtarget"
MAX_DOSE_PER_FRACTION_GY = 30.0
SIDECAR = {
    "start_day": {"Description": "day of the first fraction on the sessions table's day clock (days since the "
                                 "subject's first session), or a session label ses-<label> (the course starts on "
                                 "that session's day, after its imaging)",
                  "Units": "day"},
    "fractions": {"Description": "number of radiotherapy fractions of the course"},
    "dose_per_fraction_gy": {"Description": "physical dose per fraction", "Units": "Gy"},
    "fractions_per_week": {"Description": "fractions per week: n consecutive daily fractions, then a pause to the "
                                          "next week (fraction k on day start + 7 floor(k / n) + k mod n)"},
    "target_mask": {"Description": "irradiated volume: path, relative to the dataset root, of a mask in the "
                                   "subject's T1w space (derivatives/lesions/sub-<label>/ses-<label>/anat/"
                                   f"sub-<label>_ses-<label>_space-T1w_desc-{TARGET_DESC}_mask.nii.gz); n/a: the "
                                   "whole brain"},
}
_TARGET_RE = re.compile(r"^derivatives/lesions/sub-(?P<sub>[^/]+)/ses-(?P<ses>[^/]+)/anat/"
                        r"sub-(?P<sub2>[^_/]+)_ses-(?P<ses2>[^_/]+)_space-T1w_desc-" + TARGET_DESC + r"_mask\.nii\.gz$")


@dataclasses.dataclass(frozen=True)
class Course:
    """One course of radiotherapy. start_day: days since the first session; target_session: the
    session whose folder holds the target mask (None: whole brain)."""

    start_day: float
    fractions: int
    dose_gy: float
    per_week: int
    target_mask: str | None = None
    target_session: str | None = None

    def fraction_days(self) -> list[float]:
        n = int(self.per_week)
        return [float(self.start_day) + 7.0 * (k // n) + (k % n) for k in range(int(self.fractions))]

    def row(self) -> dict:
        return {"start_day": float(self.start_day), "fractions": int(self.fractions),
                "dose_per_fraction_gy": float(self.dose_gy), "fractions_per_week": int(self.per_week),
                "target_mask": self.target_mask or "n/a"}


def table_path(bids, subject: str) -> Path:
    return Path(bids) / f"sub-{subject}" / f"sub-{subject}_treatment.tsv"


def target_path(subject: str, session: str) -> str:
    """The target mask's path relative to the BIDS root (the lesion-mask derivatives layout)."""
    return (f"derivatives/lesions/sub-{subject}/ses-{session}/anat/"
            f"sub-{subject}_ses-{session}_space-T1w_desc-{TARGET_DESC}_mask.nii.gz")


def write_table(bids, subject: str, courses: list[Course]) -> Path:
    from neurohybrid.io import write_json, write_tsv

    path = table_path(bids, subject)
    write_tsv(path, pd.DataFrame([c.row() for c in courses], columns=list(COLUMNS)), float_format="%.4f")
    write_json(path.with_suffix(".json"), SIDECAR)
    return path


def read_table(bids, subject: str, sessions: list[tuple[str, float]]) -> list[Course]:
    """The subject's courses (none when it has no table). sessions: (label, day) from the sessions
    table, for ``ses-L`` start days and target folders. Every bad row is an InputError naming the
    subject, the file, the row and the problem."""
    path = table_path(bids, subject)
    if not path.exists():
        return []
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several parser errors
        raise InputError(f"cannot read the treatment table ({type(exc).__name__}: {exc})", file=path,
                         subject=subject) from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"treatment table lacks column(s) {', '.join(missing)} (needs {', '.join(COLUMNS)})",
                         file=path, subject=subject)
    days = {f"ses-{s}": float(d) for s, d in sessions}
    courses = []
    for i, r in enumerate(frame.to_dict("records")):
        where = f"treatment table row {i + 2}"

        def bad(problem, where=where):
            return InputError(f"{where}: {problem}", file=path, subject=subject)

        start = str(r["start_day"]).strip()
        if start.startswith("ses-"):
            if start not in days:
                raise bad(f"start_day {start} is not a session of the sessions table ({', '.join(days)})")
            start_day = days[start]
        else:
            start_day = _number(start, "start_day", bad)
        fractions = _integer(r["fractions"], "fractions", 1, 1000, bad)
        per_week = _integer(r["fractions_per_week"], "fractions_per_week", 1, 7, bad)
        dose = _number(r["dose_per_fraction_gy"], "dose_per_fraction_gy", bad)
        if not 0 < dose <= MAX_DOSE_PER_FRACTION_GY:
            raise bad(f"dose_per_fraction_gy must lie in (0, {MAX_DOSE_PER_FRACTION_GY:g}] Gy, got {dose:g}")
        target = str(r["target_mask"]).strip()
        session = None
        if target in ("", "n/a"):
            target = None
        else:
            m = _TARGET_RE.match(target)
            if not m or m["sub"] != subject or m["sub2"] != subject or m["ses"] != m["ses2"]:
                raise bad(f"target_mask {target!r} must be n/a or {target_path(subject, '<session>')}")
            session = m["ses"]
            if f"ses-{session}" not in days:
                raise bad(f"target_mask lies in ses-{session}, which is not in the sessions table")
            if not (Path(bids) / target).exists():
                raise bad(f"target_mask file {target} not found")
        courses.append(Course(start_day, fractions, dose, per_week, target, session))
    return courses


def _number(value, name, bad) -> float:
    try:
        v = float(str(value).strip())
    except ValueError:
        raise bad(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise bad(f"{name} must be finite, got {value!r}")
    return v


def _integer(value, name, lo, hi, bad) -> int:
    v = _number(value, name, bad)
    if v != int(v) or not lo <= v <= hi:
        raise bad(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return int(v)


# ------------------------------------------------------------------------------------------------
# on the model's crop: what the inputs carry and the solver gets
# ------------------------------------------------------------------------------------------------

def survival(dose_gy: float, alpha: float, alpha_beta_gy: float) -> float:
    """Surviving fraction of one fraction, exp(-(alpha d + beta d^2)), beta = alpha / (alpha/beta)."""
    return math.exp(-(alpha * dose_gy + alpha / alpha_beta_gy * dose_gy * dose_gy))


def fraction_events(meta: dict, targets: np.ndarray | None) -> list[tuple[float, float, np.ndarray | None]]:
    """(day since the first session, dose in Gy, target mask or None) of every fraction in the
    inputs' ``treatment`` metadata, sorted by day; targets: the ``rt_target`` array (C, X, Y, Z)."""
    out = []
    for c in meta.get("treatment") or []:
        target = None if c["target_index"] is None else np.asarray(targets[c["target_index"]], bool)
        out.extend((float(t), float(c["dose_per_fraction_gy"]), target) for t in c["fraction_days"])
    return sorted(out, key=lambda e: e[0])


class Treatment:
    """A subject's fractions on the model crop, in days since its first session (empty: untreated).

    ``radiotherapy(offset, start, stop, box)``: the solver's ``Radiotherapy`` for a run whose clock
    reads ``offset`` at day 0 (the mechanistic model's t0) over the fractions in (start, stop], on
    ``box``; ``segments`` cuts a run where consecutive fractions differ in dose or target (one
    ``Radiotherapy`` has one of each). ``kill_factors``: the surviving-fraction fields that the
    hybrids' own integrators apply."""

    def __init__(self, events, alpha: float, alpha_beta_gy: float):
        self.events = list(events)
        self.alpha, self.alpha_beta_gy = float(alpha), float(alpha_beta_gy)

    @classmethod
    def of(cls, inputs, s: dict) -> "Treatment":
        return cls(fraction_events(inputs.meta, inputs.arrays.get("rt_target")), float(s["rt_alpha"]),
                   float(s["rt_alpha_beta_gy"]))

    def __bool__(self) -> bool:
        return bool(self.events)

    def key(self) -> tuple:
        """What identifies the treatment in a memo key (days, doses, target sizes, alpha)."""
        return (tuple((d, g, None if t is None else int(t.sum())) for d, g, t in self.events), self.alpha,
                self.alpha_beta_gy)

    def within(self, start: float, stop: float) -> list[tuple[float, float, np.ndarray | None]]:
        """The fractions in (start, stop]: the solver applies a fraction at a save time before the save,
        so one at the last session's day is in the state at that session, not in the gap after it."""
        return [e for e in self.events if start < e[0] <= stop]

    def kill_factors(self, start: float, stop: float, shape, box=None) -> list[tuple[float, np.ndarray]]:
        """[(day - start, surviving-fraction field on ``shape``)] for the fractions in (start, stop]:
        1 outside the target, the LQ survival inside."""
        out = []
        for day, dose, target in self.within(start, stop):
            f = np.ones(shape, np.float32)
            sv = np.float32(survival(dose, self.alpha, self.alpha_beta_gy))
            if target is None:
                f[...] = sv
            else:
                f[(target[box] if box is not None else target)] = sv
            out.append((day - start, f))
        return out

    def segments(self, start: float, stop: float) -> list[float]:
        """Cut days in (start, stop): before each fraction whose dose or target differs from the
        previous one's (a cut just before it, at the previous fraction's day)."""
        ev = self.within(start, stop)
        return [a[0] for a, b in zip(ev[:-1], ev[1:]) if a[1] != b[1] or a[2] is not b[2]]

    def radiotherapy(self, offset: float, start: float, stop: float, box=None):
        """The ``Radiotherapy`` of the fractions in (start, stop] (None if there are none) on a clock
        that reads ``offset`` at day ``start``; they must share dose and target (see ``segments``)."""
        from neurohybrid.solvers.glioma import Radiotherapy

        ev = self.within(start, stop)
        if not ev:
            return None
        dose, target = ev[0][1], ev[0][2]
        if any(g != dose or t is not target for _, g, t in ev):
            raise InputError("internal: one solver run spans fractions of different dose or target (cut it with segments)")
        beta = self.alpha / self.alpha_beta_gy
        return Radiotherapy([offset + d - start for d, _, _ in ev], dose, self.alpha, beta,
                            None if target is None else (target[box] if box is not None else target))
