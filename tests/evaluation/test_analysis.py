"""The analysis plan: defaults, config/config.yaml and the schema agree; bad keys stop with their name."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from neurohybrid.errors import InputError
from neurohybrid.evaluation import analysis
from neurohybrid.registry import DISORDERS

REPO = Path(__file__).resolve().parents[2]


def _yaml(path):
    return yaml.safe_load((REPO / path).read_text())


def test_config_states_the_code_defaults_and_the_schema_accepts_them():
    config = _yaml("config/config.yaml")
    assert config["analysis"] == analysis.DEFAULTS
    schema = _yaml("workflow/schemas/config.schema.yaml")
    assert set(schema["properties"]["analysis"]["properties"]) == set(analysis.DEFAULTS)
    assert set(schema["properties"]["analysis"]["properties"]["primary_metrics"]["properties"]) == set(DISORDERS)
    jsonschema.validate(config, schema)
    for path in ("config/paper.yaml", "config/benchmark.yaml"):
        if (REPO / path).exists():
            analysis.check(_yaml(path).get("analysis"))


def test_plan_merges_over_the_defaults():
    plan = analysis.plan({"seed": 5, "analysis": {"primary_metrics": {"stroke": "abs_volume_error_ml_infarct"}}})
    assert plan.primary("stroke") == "abs_volume_error_ml_infarct" and plan.primary("glioma") == "dice_flair"
    assert plan.seed == 5 and plan.alpha == 0.05 and plan.interval == "bca"
    assert analysis.direction("dice_flair") == 1 and analysis.direction("rmse_suvr") == -1
    assert analysis.direction("hd95_mm_flair") == -1 and analysis.direction("volume_error_ml_infarct") == 0


@pytest.mark.parametrize("section, fragment", [
    ({"primary_metric": {}}, "'analysis.primary_metric': unknown key (did you mean 'primary_metrics'?)"),
    ({"primary_metrics": {"glioma": "dice_flar"}}, "did you mean 'dice_flair'"),
    ({"primary_metrics": {"migraine": "dice"}}, "'analysis.primary_metrics.migraine': unknown disorder"),
    ({"primary_metrics": {"stroke": "volume_error_ml_infarct"}}, "signed"),
    ({"alpha": 0.7}, "'analysis.alpha'"),
    ({"holm_scope": "metric"}, "'analysis.holm_scope'"),
    ({"interval": "t"}, "'analysis.interval'"),
    ({"resamples": 10}, "'analysis.resamples'"),
])
def test_bad_plans_stop_with_the_key(section, fragment):
    with pytest.raises(InputError) as err:
        analysis.plan({"analysis": section})
    assert fragment in str(err.value)
