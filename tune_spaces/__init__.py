"""Named search spaces for ``loramix tune`` (config ``tune.space``).

One module per space; each exposes ``space(cfg) -> {"dotted.schema.path": tune domain}``.
Keys are paths of the config schema (``expert.rank``, ``router.top_k``, ``recipe``...); a
trial's values are applied to the config and validated by the schema like any override.

Add a space by dropping a module here; ``loramix tune --list-spaces`` lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from pydantic import BaseModel
from ray.tune.search.sample import Categorical, Domain, Float, Function, Integer

from loramix.config import ConfigError, LoramixConfig, apply_values, build_config

# Sections a trial may not change: the base, the data and the search itself are fixed per search.
FIXED = ("model", "data", "tune", "serve", "output", "seed")


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def describe() -> list[str]:
    """``name: first docstring line`` per space."""
    out = []
    for name in names():
        doc = (importlib.import_module(f"tune_spaces.{name}").__doc__ or "").strip().splitlines()
        out.append(f"{name}: {doc[0] if doc else ''}")
    return out


def load(cfg: LoramixConfig) -> dict:
    """The space ``cfg.tune.space`` names, checked against the schema (raises ConfigError)."""
    if cfg.tune.space not in names():
        raise ConfigError(f"`tune.space` {cfg.tune.space!r} is not a space; choose from {names()} (tune_spaces/).")
    space = importlib.import_module(f"tune_spaces.{cfg.tune.space}").space(cfg)
    check(space, cfg)
    return space


def _is_path(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    sub = field.annotation
    return isinstance(sub, type) and issubclass(sub, BaseModel) and _is_path(sub, parts[1:])


def _candidates(domain) -> list:
    """Values that bound what ``domain`` can produce (every choice; a range's ends)."""
    if isinstance(domain, dict) and "grid_search" in domain:
        return list(domain["grid_search"])
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, Integer):
        return [domain.lower, domain.upper - 1]  # randint's upper bound is exclusive
    if isinstance(domain, Float):
        return [domain.lower, domain.upper]
    if isinstance(domain, Domain):  # sample_from: depends on other keys; checked when the trial starts
        return []
    return [domain]  # a constant


def check(space: dict, cfg: LoramixConfig) -> None:
    """Every key a schema path outside the fixed sections; every reachable value valid there."""
    problems = []
    if cfg.tune.evals_per_trial > cfg.router.steps:
        problems.append(
            f"`tune.evals_per_trial` ({cfg.tune.evals_per_trial}) exceeds `router.steps` ({cfg.router.steps}); "
            "validate at most once per router step."
        )
    base = cfg.model_dump(mode="json")
    for key, domain in space.items():
        parts = str(key).split(".")
        if parts[0] in FIXED:
            problems.append(f"`{key}`: `{parts[0]}` is fixed for a whole search; set it in the config instead.")
            continue
        if not _is_path(LoramixConfig, parts):
            problems.append(f"`{key}` is not a config key; see `loramix config-help` for the dotted paths.")
            continue
        if cfg.tune.searcher == "optuna" and (isinstance(domain, (dict, Function))):
            problems.append(f"`{key}`: searcher `optuna` cannot sample grid_search/sample_from; use `random`.")
        for value in _candidates(domain):
            try:
                build_config(apply_values(base, {key: value}), source=f"tune space {cfg.tune.space!r}")
            except ConfigError as err:
                problems.append(
                    f"`{key}` = {value!r} gives an invalid config:\n    " + str(err).replace("\n", "\n    ")
                )
    if problems:
        raise ConfigError(f"invalid tune space {cfg.tune.space!r}:\n  " + "\n  ".join(problems))
