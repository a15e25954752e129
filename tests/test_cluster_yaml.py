"""cluster.yaml and cluster-local.yaml validate against the schema shipped inside `ray`."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_config_matches_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(config))  # merged with the provider defaults, as `ray up` does


def test_gpu_group_scales_to_zero_and_head_trains_nothing():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    nodes = config["available_node_types"]
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] >= 1
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}


def test_schema_rejects_a_typo():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


def test_an_open_dashboard_says_how_to_reach_it_safely():
    """The dashboard's Jobs API runs any code it is sent: binding it to 0.0.0.0 comes with the
    warning and the safe way in (a tunnel)."""
    text = (ROOT / "cluster.yaml").read_text()
    if "--dashboard-host=0.0.0.0" in text:
        before = text[: text.index("--dashboard-host=0.0.0.0")]
        assert "must NOT open" in before and "ray dashboard cluster.yaml" in before
