"""One loader for the model settings of every disorder.

A disorder's settings are its code defaults, overridden by the config's ``models:`` section (shared
by all disorders), overridden by the disorder's own section (``glioma:``, ``alzheimer:``,
``stroke:``). ``sloppy: true`` (the tests' fast mode) applies the disorder's fast values to every
key the config did not set. Every key has one name across disorders (``SHARED``); a key that no
disorder knows, in ``models:`` or in a disorder's section, is an error naming it, so a typo never
silently leaves a setting at its default.

Values take the type of their default (an int default makes ``epochs: "four"`` an error); a
default of None accepts a number or None.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from neurohybrid.errors import InputError
from neurohybrid.registry import DISORDERS

# keys with one meaning in every disorder (also listed in workflow/schemas/config.schema.yaml)
SHARED = (
    "epochs", "learning_rate", "batch_size", "hidden", "restarts", "fit_iterations", "sol_steps",
    "residual_penalty", "val_fraction", "patience", "time_limit_s", "torch_threads",
)
# the valid range of the shared keys, and of every key named like them: (lowest, lowest allowed?)
# where None values (no limit / default) pass
_AT_LEAST_ONE = ("epochs", "batch_size", "hidden", "restarts", "fit_iterations", "sol_steps", "patience")
_POSITIVE = ("learning_rate", "time_limit_s")
_SUFFIX_AT_LEAST_ONE = ("_epochs", "_steps", "_iterations", "_samples", "_batch_size")
_SUFFIX_POSITIVE = ("_dt", "_dt_s", "_hours", "_days", "_mm")


def _check_range(key: str, value: Any, where: str) -> None:
    """Counts are >= 1, rates, steps and durations > 0, fractions in [0, 1): an ``epochs: -3``
    would otherwise train nothing and write an untrained model."""
    if value is None or isinstance(value, (bool, str, list, tuple)):
        return
    if key in _AT_LEAST_ONE or key.endswith(_SUFFIX_AT_LEAST_ONE):
        ok, want = value >= 1, ">= 1"
    elif key in _POSITIVE or key.endswith(_SUFFIX_POSITIVE) or key == "dt_s":
        ok, want = value > 0, "> 0"
    elif key == "val_fraction":
        ok, want = 0 <= value < 1, "in [0, 1)"
    elif key in ("residual_penalty", "torch_threads"):
        ok, want = value >= 0, ">= 0"
    else:
        return
    if not ok:
        raise InputError(f"config key '{where}.{key}': must be {want}, got {value!r}")


# keys the workflow itself reads
WORKFLOW_KEYS = {"models": ("families", "n_folds"), "disorder": ("model_voxel_mm",)}

# where each disorder keeps its defaults and fast overrides (module attributes DEFAULTS, SLOPPY)
_DEFAULTS_MODULE = {
    "glioma": "neurohybrid.disorders.glioma.mechanistic",
    "alzheimer": "neurohybrid.disorders.alzheimer.settings",
    "stroke": "neurohybrid.disorders.stroke.mechanistic",
}


def defaults(disorder: str) -> tuple[dict, dict]:
    """(code defaults, sloppy overrides) of a disorder's model settings."""
    module = importlib.import_module(_DEFAULTS_MODULE[disorder])
    return dict(module.DEFAULTS), dict(getattr(module, "SLOPPY", {}))


def _convert(key: str, value: Any, default: Any, where: str) -> Any:
    if value is None or default is None:
        if value is not None and not isinstance(value, (int, float, str, list, tuple)):
            raise InputError(f"config key '{where}.{key}': unsupported value {value!r}")
        return value
    kind = type(default)
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind in (tuple, list):
            return kind(float(v) for v in value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise InputError(f"config key '{where}.{key}': expected {kind.__name__}, got {value!r}") from None


def check_keys(config: dict) -> None:
    """Every key of ``models:`` and of the disorder sections is known to the model code, and every
    disorder resolves its values (types and ranges): run at workflow parse time, before any job."""
    config = config or {}
    known = {d: set(defaults(d)[0]) for d in DISORDERS}
    anywhere = set().union(*known.values())
    sections = [("models", anywhere | set(WORKFLOW_KEYS["models"]))]
    sections += [(d, known[d] | set(WORKFLOW_KEYS["disorder"])) for d in DISORDERS]
    for section, keys in sections:
        for key in config.get(section) or {}:
            if key not in keys and key != "sloppy":
                close = difflib.get_close_matches(str(key), sorted(keys), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise InputError(f"config key '{section}.{key}': unknown model setting{hint}; the settings each "
                                 "disorder reads are the DEFAULTS of its model code (config/README.md)")
    for disorder in DISORDERS:
        _resolve_known(config, disorder)


def resolve(config: dict, disorder: str) -> dict:
    """The disorder's model settings as a dict (see the module docstring); adds ``sloppy`` and ``seed``."""
    config = config or {}
    check_keys(config)
    return _resolve_known(config, disorder)


def _resolve_known(config: dict, disorder: str) -> dict:
    base, fast = defaults(disorder)
    models = config.get("models") or {}
    section = config.get(disorder) or {}
    out = dict(base)
    explicit = set()
    for where, src in (("models", models), (disorder, section)):
        for key in base:
            if key in src:
                out[key] = _convert(key, src[key], base[key], where)
                _check_range(key, out[key], where)
                explicit.add(key)
    sloppy = bool(config.get("sloppy", False) or models.get("sloppy", False) or section.get("sloppy", False))
    if sloppy:
        out.update({k: v for k, v in fast.items() if k not in explicit})
    out["sloppy"] = sloppy
    out["seed"] = int(config.get("seed", 0) or 0)
    return out
