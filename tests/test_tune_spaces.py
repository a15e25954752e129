"""Tune without Ray running: spaces are checked against the schema, a trial's body reports at
its rungs, and the results pick the argmax and write a config `loramix run` accepts."""

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from ray import tune

import tune_spaces
from loramix.config import ConfigError, apply_values, build_config, load_config
from loramix.plan import BaseResult
from loramix.synthetic import demo_artifact, write_demo_data
from loramix.tuning import eval_steps, router_trial
from pipelines.tune_report import write_results

ROOT = Path(__file__).resolve().parents[1]


def two_domains(**tune_section):
    domains = [{"name": n, "train": f"{n}.train.jsonl", "eval": f"{n}.eval.jsonl"} for n in ("reverse", "sort")]
    return build_config({"data": {"domains": domains}, "tune": tune_section})


@pytest.mark.parametrize("name", tune_spaces.names())
def test_every_space_fits_the_quickstart(name):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"tune.space={name}"])
    space = tune_spaces.load(cfg)
    assert space and all(isinstance(k, str) for k in space)
    assert set(tune_spaces.names()) >= {"rank_topk", "full", "recipes", "demo"}


@pytest.mark.parametrize(
    "space, match",
    [
        ({"expert.rnk": tune.choice([4])}, "`expert.rnk` is not a config key"),
        ({"data.max_length": tune.choice([16])}, "fixed for a whole search"),
        ({"router.top_k": tune.grid_search([1, 2, 3])}, r"`router.top_k` = 3 gives an invalid config"),
        ({"expert.rank": tune.randint(0, 4)}, r"`expert.rank` = 0 gives an invalid config"),
        ({"router.lr": tune.uniform(-1.0, 1.0)}, r"`router.lr` = -1.0"),
        ({"recipe": tune.choice(["moa", "switch"])}, r"`recipe` = 'switch'"),
    ],
)
def test_invalid_space_is_a_clear_error(space, match):
    with pytest.raises(ConfigError, match=match):
        tune_spaces.check(space, two_domains())


def test_unknown_space_and_searcher_limits():
    with pytest.raises(ConfigError, match=r"`tune.space` 'nope' is not a space; choose from \['demo'"):
        tune_spaces.load(two_domains(space="nope"))
    with pytest.raises(ConfigError, match="optuna.*grid_search"):
        tune_spaces.load(two_domains(space="demo", searcher="optuna"))


def test_eval_steps_are_spread_and_end_at_the_last_step():
    assert eval_steps(10, 4) == [2, 5, 8, 10]
    assert eval_steps(3, 3) == [1, 2, 3]
    assert eval_steps(100, 1) == [100]


def test_router_trial_reports_at_its_rungs(tmp_path):
    art = demo_artifact(tmp_path / "artifact", router_steps=1)
    data = write_demo_data(tmp_path / "data", ["reverse", "sort", "shift"], train_size=32, eval_size=4)
    cfg = build_config(
        {
            "model": {"base": str(tmp_path / "artifact-base")},
            "data": {"max_length": 32, "domains": data["domains"]},
            "router": {"steps": 6, "batch_size": 8},
            "tune": {"evals_per_trial": 3},
        }
    )
    adapters = {n: str(tmp_path / "artifact-adapters" / n) for n in ("reverse", "sort", "shift")}
    results = {"base": BaseResult(cfg.model.base, str(art / "tokenizer"))}
    results |= {f"expert/{n}": SimpleNamespace(path=p) for n, p in adapters.items()}
    reports = []
    last = router_trial(cfg, results, report=reports.append)
    assert [r["router_step"] for r in reports] == [2, 4, 6]
    assert last == reports[-1]
    for r in reports:
        assert 0 <= r["accuracy"] <= 1 and r["val_loss"] > 0
        assert r["accuracy"] == pytest.approx(sum(r[f"accuracy/{n}"] for n in adapters) / 3)
    assert reports[0]["val_loss"] != reports[-1]["val_loss"], "the router trained between rungs"


def fake_result(i, params, accs, losses, error=None):
    df = pd.DataFrame({"accuracy": accs, "val_loss": losses})
    metrics = {
        "trial_id": f"t{i}",
        "accuracy": accs[-1],
        "val_loss": losses[-1],
        "training_iteration": len(accs),
        "router_step": 10 * len(accs),
        "time_total_s": 1.5,
    }
    return SimpleNamespace(config=params, metrics=metrics, metrics_dataframe=df, error=error, path=f"/x/t{i}")


def test_results_pick_the_argmax_and_write_a_runnable_config(tmp_path):
    cfg = two_domains(evals_per_trial=2)
    grid = [
        fake_result(0, {"expert.rank": 2, "router.top_k": 1}, [0.2, 0.5], [2.0, 1.5]),
        fake_result(1, {"expert.rank": 4, "router.top_k": 2}, [0.3, 0.5], [1.9, 1.2]),  # same accuracy, lower loss
        fake_result(2, {"expert.rank": 8, "router.top_k": 1}, [0.1], [3.0]),  # stopped at the first rung
    ]
    summary = write_results(grid, cfg, tmp_path, ["expert/reverse@a"], seconds=3.0)
    assert summary["best"]["trial_id"] == "t1"
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed", "early_stopped"]
    best = load_config(tmp_path / "best.yaml")
    assert (best.expert.rank, best.router.top_k) == (4, 2)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "metric.png").stat().st_size > 1000
    with pytest.raises(RuntimeError, match="every trial failed; first error: boom"):
        write_results([_errored()], cfg, tmp_path, [], seconds=1)


def _errored():
    r = fake_result(0, {}, [0.1], [1.0], error="boom")
    r.metrics = {}
    return r


def test_more_rungs_than_router_steps_is_refused():
    cfg = two_domains(space="demo", evals_per_trial=4).model_copy(
        update={"router": two_domains().router.model_copy(update={"steps": 3})}
    )
    with pytest.raises(ConfigError, match=r"`tune.evals_per_trial` \(4\) exceeds `router.steps` \(3\)"):
        tune_spaces.load(cfg)


def test_searcher_and_scheduler_come_from_the_config(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.tune import _tuner

    cfg = two_domains(space="full", searcher="optuna", num_samples=3, max_concurrent_trials=2, evals_per_trial=5)
    tuner = _tuner(cfg, tune_spaces.load(cfg), lambda params: None, tmp_path)
    tc = tuner._local_tuner._tune_config  # no public getter in Ray 2.60
    assert isinstance(tc.search_alg, OptunaSearch) and isinstance(tc.scheduler, ASHAScheduler)
    assert (tc.num_samples, tc.max_concurrent_trials, tc.metric, tc.mode) == (3, 2, "accuracy", "max")
    assert tc.scheduler._max_t == 5
    fifo = _tuner(two_domains(space="demo", scheduler="fifo"), {}, lambda params: None, tmp_path / "b")
    assert isinstance(fifo._local_tuner._tune_config.scheduler, FIFOScheduler)


def test_optuna_samples_the_full_space_into_valid_configs():
    from ray.tune.search.optuna import OptunaSearch

    cfg = two_domains(space="full", searcher="optuna")
    space = tune_spaces.load(cfg)
    searcher = OptunaSearch(seed=0)
    assert searcher.set_search_properties("accuracy", "max", space)
    for i in range(5):
        params = searcher.suggest(f"t{i}")
        assert set(params) == set(space)
        trial = build_config(apply_values(cfg.model_dump(mode="json"), params))
        assert trial.recipe in ("moa", "mole", "modula") and 1 <= trial.router.top_k <= 2
        assert 1e-4 <= trial.expert.lr <= 1e-2 and trial.expert.rank in (4, 8, 16, 32)
