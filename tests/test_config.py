"""The schema: every shipped YAML validates; overrides; errors name key, value and fix."""

from pathlib import Path

import pytest

from loramix.config import ConfigError, LoramixConfig, build_config, config_help, dump_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, LoramixConfig) and cfg.data.domains
    assert path.read_text().startswith("# Run:")


def test_quickstart_has_four_conflicting_domains():
    cfg = load_config(CONFIGS[[p.name for p in CONFIGS].index("quickstart.yaml")])
    assert len(cfg.data.domains) >= 4 and cfg.model.base == "synthetic"


def test_overrides_dotted_paths():
    cfg = build_config(
        {},
        ["router.top_k=2", "expert.rank=16", "recipe=mole", "data.domains=[{name: a, train: x}, {name: b, train: y}]"],
    )
    assert (cfg.router.top_k, cfg.expert.rank, cfg.recipe) == (2, 16, "mole")
    cfg = build_config(cfg.model_dump(), ["data.domains.1.name=c"])
    assert [d.name for d in cfg.data.domains] == ["a", "c"]


def test_round_trip_through_yaml():
    cfg = build_config({"recipe": "modula", "universal": {"enabled": True}})
    import yaml

    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    "data,overrides,match",
    [
        ({"routr": {}}, [], r"`routr`: unknown key"),
        ({}, ["router.top_k=0"], r"`router.top_k`: Input should be greater than or equal to 1 \(got 0\)"),
        ({}, ["recipe=switch"], r"`recipe`: Input should be 'moa', 'mole' or 'modula' \(got 'switch'\)"),
        (
            {"data": {"domains": [{"name": "a", "train": "x"}]}},
            ["router.top_k=2"],
            r"`router.top_k` must be in \[1, 1\] \(the number of domains\), got 2. Lower top_k or add domains",
        ),
        ({"data": {"domains": [{"name": "a/b", "train": "x"}]}}, [], r"invalid expert name 'a/b'"),
        ({"data": {"domains": [{"name": "a", "train": "x"}, {"name": "a", "train": "y"}]}}, [], r"duplicates \['a'\]"),
        ({}, ["universal.enabled=true"], r"`universal.enabled` trains MoDULA's universal LoRA, but recipe `moa`"),
        ({}, ["model.synthetic.num_heads=3"], r"`model.synthetic.num_heads` \(3\) must divide"),
        (
            {"recipe": "modula", "universal": {"enabled": True}, "data": {"domains": [{"name": "a", "train": "x"}]}},
            ["router.top_k=3"],
            r"`router.top_k` must be in \[1, 2\] \(the domains \+ the universal LoRA\)",
        ),
        (
            {
                "recipe": "modula",
                "universal": {"enabled": True},
                "data": {"domains": [{"name": "universal", "train": "x"}]},
            },
            [],
            r"domain name `universal` is taken by the universal LoRA",
        ),
        (
            {"recipe": "modula", "universal": {"enabled": True, "domain_share": 0.5}},
            [],
            r"`universal.domain_share` mixes domain rows into `universal.train`, which is unset",
        ),
        ({}, ["top_k"], r"override 'top_k' must look like `key.path=value`"),
    ],
)
def test_errors(data, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(data, overrides)


def test_several_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        build_config({"expert": {"rank": 0, "lr": -1}})
    assert "`expert.rank`" in str(err.value) and "`expert.lr`" in str(err.value)


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_every_field_is_documented():
    lines = config_help()
    assert any(line.startswith("router.top_k = 1: Experts kept per route") for line in lines)
    undocumented = [line for line in lines if line.endswith(": ")]
    assert not undocumented, undocumented
