"""``loramix tune``: search LoRA rank, router top-k, learning rates and recipe with Ray Tune.

Behaviour (config section ``tune``, see ``loramix config-help``):

- ``tune.space`` names a module of ``tune_spaces/``; its keys are dotted config paths, checked
  before anything starts (bad keys or values that break the schema are a ConfigError).
- Each trial is a Tune function trial: it applies its values to the config, gets its experts
  from the :class:`ExpertCacheActor` (each distinct expert set is one Ray Train ``TorchTrainer``
  per domain, trained once and shared), then trains the router in-process and reports the
  validation ``accuracy`` ``tune.evals_per_trial`` times; ASHA stops weak trials at those rungs.
- ``tune.searcher: optuna`` uses OptunaSearch; ``num_samples``, ``max_concurrent_trials``,
  ``cpus_per_trial``/``gpus_per_trial`` come from the config.
- Rerunning the same command resumes (``Tuner.restore``): finished trials are not rerun and
  finished experts are reused from disk.
- Writes ``OUTPUT/tune/results.json`` (every trial), ``OUTPUT/tune/best.yaml`` (a full config
  for ``loramix run``; the best trial is the argmax of its final reported accuracy) and
  ``OUTPUT/tune/metric.png``.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import ray
from ray import tune

import tune_spaces
from actors.expert_cache import ExpertCacheActor
from actors.progress import ProgressActor
from actors.stage_tasks import launch
from loramix import plan
from loramix.config import ConfigError, LoramixConfig, apply_values, build_config
from loramix.demo import ensure_demo_data
from loramix.lock import output_lock
from loramix.tuning import METRIC, router_trial
from pipelines.run import connect, stage_data
from pipelines.tune_report import write_results

logger = logging.getLogger(__name__)


def _wait(cache, digest: str, answer: dict):
    if "result" in answer:
        return answer["result"]
    try:
        return ray.get(answer["ref"])
    except Exception:
        cache.forget.remote(digest)  # let the next trial retry rather than inherit the failure
        raise


def trial(params: dict, *, cfg_dict: dict, base: plan.BaseResult, cache) -> None:
    """One Tune trial: its LoRA stages from the shared cache (asked for at once, so new ones train
    concurrently), then router training with validation reports."""
    cfg = build_config(apply_values(cfg_dict, params), source=f"tune trial {params}")
    ctx = plan.Context.create(cfg)
    stages_ = {s.name: s for s in plan.build_plan(cfg)}
    hashes = plan.digests(list(stages_.values()), ctx)
    results: dict = {"base": base}

    def ask(name: str) -> dict:
        stage = stages_[name]
        return ray.get(cache.get.remote(stage, ctx, hashes[name], [results[d] for d in stage.deps]))

    for stage in stages_.values():  # experts brought as adapters: checked and copied here, nothing trains
        if isinstance(stage, plan.AdapterStage):
            results[stage.name] = stage.run(ctx, {"base": base})
    names = [s.name for s in stages_.values() if s.kind == "lora" and not s.budget_from]
    if "universal" in names:  # MoDULA-Res experts read it: it comes first
        results["universal"] = _wait(cache, hashes["universal"], ask("universal"))
        names.remove("universal")
    asked = {name: ask(name) for name in names}
    results |= {name: _wait(cache, hashes[name], answer) for name, answer in asked.items()}
    router_trial(cfg, results, report=tune.report)


def _prepare(cfg: LoramixConfig, progress) -> plan.BaseResult:
    """The base, shared by every trial (prepared once, reused by a resumed search)."""
    ctx = plan.Context.create(cfg)
    stage = plan.BaseStage("base")
    digest = plan.digests([stage], ctx)["base"]
    done = ctx.store.done("base", digest)
    if done is not None:
        return plan.BaseResult.from_json(done)
    return ray.get(launch(stage, ctx, digest, progress, []))


def check_fits(cfg: LoramixConfig, cpus: float) -> None:
    """Trials hold their CPUs while they wait for the expert trainers they launched: on a cluster
    nothing grows, running trials plus one trainer must fit, or the search waits forever."""
    t, r = cfg.tune, cfg.resources
    trials = t.max_concurrent_trials * t.cpus_per_trial
    trainer = r.num_workers * r.cpus_per_worker
    if trials + trainer > cpus:
        raise ConfigError(
            f"{t.max_concurrent_trials} concurrent trials x {t.cpus_per_trial:g} CPUs (`tune.max_concurrent_trials` x "
            f"`tune.cpus_per_trial`) + one expert trainer's {trainer:g} (`resources.num_workers` x "
            f"`resources.cpus_per_worker`) need {trials + trainer:g} CPUs; this cluster has {cpus:g} and nothing will "
            "add more, so the trials would wait forever for their experts. Lower those settings."
        )


def _tuner(cfg: LoramixConfig, space: dict, trainable, storage: Path) -> tune.Tuner:
    path = storage / "search"
    if tune.Tuner.can_restore(str(path)):
        logger.warning("resuming the search in %s (finished trials are kept)", path)
        return tune.Tuner.restore(str(path), trainable, resume_errored=True)
    t = cfg.tune
    scheduler = (
        tune.schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=t.evals_per_trial,
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
        )
        if t.scheduler == "asha"
        else tune.schedulers.FIFOScheduler()
    )
    searcher = None
    if t.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # optional: only with `tune.search: optuna`

        searcher = OptunaSearch(seed=cfg.seed)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=t.num_samples,
            max_concurrent_trials=t.max_concurrent_trials,
            scheduler=scheduler,
            search_alg=searcher,
        ),
        run_config=tune.RunConfig(
            name="search",
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            verbose=1,
        ),
    )


def run_tune(cfg: LoramixConfig, output: str | Path | None = None, address: str | None = None) -> dict:
    """Run (or resume) the search; returns the summary written to ``results.json``."""

    ensure_demo_data(cfg)
    space = tune_spaces.load(cfg)
    out = Path(output or cfg.output).resolve()
    shared = out / "tune" / "shared"
    # Stages (base, experts) write under the shared folder; trials never copy weights around.
    cfg = cfg.model_copy(update={"output": str(shared)})
    plan.check_data(cfg)
    with output_lock(out):
        # Trials run in their own directories (and maybe on other nodes): absolute, shared data paths.
        cfg = stage_data(cfg, shared)
        if connect(address):
            check_fits(cfg, ray.cluster_resources().get("CPU", 0.0))
        t0 = time.perf_counter()
        progress = ProgressActor.remote()
        base = _prepare(cfg, progress)
        cache = ExpertCacheActor.remote(str(shared))
        trainable = tune.with_resources(
            partial(trial, cfg_dict=cfg.model_dump(mode="json"), base=base, cache=cache),
            {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial},
        )
        grid = _tuner(cfg, space, trainable, out / "tune" / "ray").fit()
        launched = ray.get(cache.stats.remote())["launched"]
        best_cfg = cfg.model_copy(update={"output": str(out / "best")})
        return write_results(grid, best_cfg, out / "tune", launched, seconds=time.perf_counter() - t0)
