"""One registry of families and disorders, one settings loader: the schema, the config files and
the model code agree with them, and every key of config/paper.yaml reaches the disorders it names."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from neurohybrid import registry
from neurohybrid.disorders.base import get_disorder
from neurohybrid.errors import InputError
from neurohybrid.settings import check_keys, defaults, resolve

REPO = Path(__file__).resolve().parents[2]


def _yaml(path):
    return yaml.safe_load((REPO / path).read_text())


def test_schema_and_configs_use_the_registry_names():
    schema = _yaml("workflow/schemas/config.schema.yaml")
    enum = schema["properties"]["models"]["properties"]["families"]["items"]["enum"]
    assert tuple(enum) == registry.FAMILY_NAMES
    assert [d for d in registry.DISORDERS if d in schema["properties"]] == list(registry.DISORDERS)
    for path in ("config/config.yaml", "config/paper.yaml"):
        assert set(_yaml(path)["models"]["families"]) <= set(registry.FAMILY_NAMES)
    # the shared model settings are documented in the schema
    from neurohybrid.settings import SHARED

    assert set(SHARED) <= set(schema["properties"]["models"]["properties"])


@pytest.mark.parametrize("disorder", registry.DISORDERS)
def test_each_disorder_implements_every_registered_family(disorder):
    families = get_disorder(disorder).families
    assert tuple(families) == registry.FAMILY_NAMES
    for name, cls in families.items():
        assert cls.name == name
        assert cls.trains_across_subjects == registry.is_trained(name, disorder), (disorder, name)


def test_shared_keys_have_one_name_in_every_disorder():
    from neurohybrid.settings import SHARED

    for disorder in registry.DISORDERS:
        base, _ = defaults(disorder)
        missing = {"restarts"} if disorder == "stroke" else set()  # stroke's sigma fit is a bounded 1-D search
        assert set(SHARED) - set(base) == missing, disorder


def _other(value):
    """A different value of the same kind (to see whether a key reaches the settings)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, float) and 0 < value < 1:
        return value / 2  # stays a fraction
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return [v * 2 for v in value]
    return {"float32": "float64", "float64": "float32"}.get(value, value + "x")


def test_every_paper_key_reaches_the_settings_of_each_disorder_it_applies_to():
    demo = _yaml("config/config.yaml")
    paper = _yaml("config/paper.yaml")
    merged = {**demo, **paper}
    checked = 0
    for section in ("models", *registry.DISORDERS):
        for key, value in (paper.get(section) or {}).items():
            if key in ("families", "n_folds", "model_voxel_mm"):
                continue  # read by the workflow (tests/workflow)
            targets = [d for d in registry.DISORDERS if key in defaults(d)[0]] if section == "models" else [section]
            assert targets, f"{section}.{key} reaches no disorder"
            for disorder in targets:
                config = copy.deepcopy(merged)
                if section == "models":  # the disorder's own section would hide the shared value
                    config.get(disorder, {}).pop(key, None)
                assert resolve(config, disorder)[key] == pytest.approx(value), (section, key, disorder)
                config[section][key] = _other(value)
                assert resolve(config, disorder)[key] == pytest.approx(_other(value)), (section, key, disorder)
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize("config, fragment", [
    ({"models": {"nfolds": 2}}, "'models.nfolds'"),
    ({"stroke": {"epoch": 2}}, "did you mean 'epochs'"),
    ({"glioma": {"learning_rte": 0.1}}, "'glioma.learning_rte'"),
    ({"alzheimer": {"sol_unroll": 3}}, "'alzheimer.sol_unroll'"),  # the old glioma/stroke name
])
def test_unknown_keys_stop_with_their_name(config, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        check_keys(config)


def test_values_take_the_type_of_their_default():
    with pytest.raises(InputError, match="'stroke.epochs': expected int"):
        resolve({"stroke": {"epochs": "four"}}, "stroke")
    with pytest.raises(InputError, match="expected int"):
        resolve({"models": {"epochs": 2.5}}, "glioma")
    assert resolve({"models": {"epochs": 7}, "glioma": {"epochs": 9}}, "glioma")["epochs"] == 9
    assert resolve({"models": {"epochs": 7}, "glioma": {"epochs": 9}}, "stroke")["epochs"] == 7


def test_sloppy_applies_fast_values_only_where_the_config_is_silent():
    _, fast = defaults("glioma")
    assert fast, "glioma has fast values"
    key = next(iter(fast))
    assert resolve({"sloppy": True}, "glioma")[key] == fast[key]
    base = defaults("glioma")[0][key]
    assert resolve({"sloppy": True, "glioma": {key: base}}, "glioma")[key] == base


@pytest.mark.parametrize("config, fragment", [
    ({"glioma": {"epochs": -3}}, "'glioma.epochs': must be >= 1"),
    ({"models": {"epochs": 0}}, "'models.epochs': must be >= 1"),
    ({"models": {"learning_rate": 0.0}}, "'models.learning_rate': must be > 0"),
    ({"stroke": {"val_fraction": 1.5}}, "'stroke.val_fraction': must be in [0, 1)"),
    ({"alzheimer": {"sol_coarse_dt": -1.0}}, "'alzheimer.sol_coarse_dt': must be > 0"),
])
def test_out_of_range_values_stop_at_parse_time(config, fragment):
    with pytest.raises(InputError) as err:
        check_keys(config)
    assert fragment in str(err.value)


@pytest.mark.parametrize("disorder", registry.DISORDERS)
def test_code_defaults_and_fast_values_are_in_range(disorder):
    from neurohybrid.settings import _check_range

    base, fast = defaults(disorder)
    for key, value in {**base, **fast}.items():
        _check_range(key, value, disorder)


def test_count_settings_property():
    """Any integer count >= 1 passes and comes back as an int; 0, negatives and fractions stop."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(value=st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                           st.sampled_from([float("inf"), -float("inf"), float("nan"), 0.5, 2.0])))
    def check(value):
        config = {"models": {"epochs": value}}
        valid = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # inf/nan: not
        if valid and value >= 1:
            out = resolve(config, "glioma")["epochs"]
            assert out == value and isinstance(out, int)
        else:
            with pytest.raises(InputError, match="'models.epochs'"):
                check_keys(config)

    check()
