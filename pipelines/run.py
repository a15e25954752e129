"""``loramix run``: the plan's stages (:mod:`loramix.plan`) as a Ray DAG, cached per stage by input hash.

Every stage is submitted at once with its upstream results as Ray object references, so Ray runs
each as soon as its inputs exist: the domain experts' ``TorchTrainer`` jobs all together (an
autoscaler sees every pending trainer), then the multitask baseline with the steps they used,
the router, and the evaluations in parallel. Settings that change behaviour are the config's
(:class:`loramix.config.LoramixConfig`; ``loramix config-help``); the ones specific to running
on Ray:

- ``train.zero_stage``: DeepSpeed ZeRO stage 0-3 of every LoRA trainer; ``train.checkpoint_every``:
  steps between resumable checkpoints; ``train.max_failures``: worker failures retried;
  ``train.storage_path``: where Ray Train keeps checkpoints (shared path or cloud URI).
- ``resources.*``: workers per trainer, GPUs, CPUs per worker.

A stage is skipped when ``OUTPUT/stages/<stage>.json`` holds the hash of its current inputs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import ray

from actors.progress import ProgressActor
from actors.stage_tasks import launch
from loramix import plan
from loramix.config import LoramixConfig
from loramix.demo import ensure_demo_data
from loramix.lock import output_lock
from loramix.report import finish_run
from pipelines.progress import wait_with_bars

logger = logging.getLogger(__name__)


def connect(address: str | None = None) -> bool:
    """``--address``, else ``RAY_ADDRESS``, else a new local instance. True when the cluster is a
    local instance this process started (nothing autoscales it)."""
    if ray.is_initialized():
        return not (address or os.environ.get("RAY_ADDRESS"))
    address = address or os.environ.get("RAY_ADDRESS")
    # No runtime_env here: inside `ray job submit` it would clash with the job's own.
    ray.init(address=address, log_to_driver=False)
    return address is None


def submit(cfg: LoramixConfig, progress) -> tuple[dict, list[str]]:
    """Submit every stage that is not cached; returns ``(name -> result or ref, cached names)``."""
    ctx = plan.Context.create(cfg)
    stages = plan.build_plan(cfg)
    hashes = plan.digests(stages, ctx)
    nodes, cached = {}, []
    for stage in stages:
        done = ctx.store.done(stage.name, hashes[stage.name])
        if done is not None:
            nodes[stage.name] = plan.load_result(stage, done)
            cached.append(stage.name)
        else:
            nodes[stage.name] = launch(stage, ctx, hashes[stage.name], progress, [nodes[d] for d in stage.deps])
    return nodes, cached


def run_pipeline(
    cfg: LoramixConfig, output: str | Path | None = None, address: str | None = None, *, note: str = "", extra=None
) -> dict:
    """Run (or reuse) every stage on Ray, then publish the artifact version and write
    ``report.json``/``report.md``/plots and ``config.yaml`` (:func:`loramix.report.finish_run`)."""
    out = Path(output or cfg.output).resolve()
    cfg = cfg.model_copy(update={"output": str(out)})
    ensure_demo_data(cfg)
    for d in cfg.data.domains:  # fail before starting Ray, naming the domain
        for split in ("train", "eval"):
            path = getattr(d, split)
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"domain {d.name!r}: {split} data {path!r} does not exist.")
    with output_lock(out):
        connect(address)
        t0 = time.perf_counter()
        progress = ProgressActor.remote()
        nodes, cached = submit(cfg, progress)
        results = wait_with_bars({k: v for k, v in nodes.items() if isinstance(v, ray.ObjectRef)}, progress)
        results |= {k: v for k, v in nodes.items() if not isinstance(v, ray.ObjectRef)}
        timings = {
            k: 0.0 if k in cached else (getattr(v, "wall_seconds", None) or getattr(v, "seconds", 0.0))
            for k, v in results.items()
        }
        timings["total"] = time.perf_counter() - t0
        return finish_run(out, cfg, results, timings=timings, cached=cached, note=note, extra=extra)
